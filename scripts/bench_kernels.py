"""Microbenchmark: torch vs fastvlm.kernels for decode-shaped Linears (weights out of cache).

For each M in --ms and each kind (fp32, int8, int4-gG), `--mats` distinct (N, K) weight matrices
(default 24 x 4864x896, ~400 MB fp32: far larger than the L3) are multiplied in turn, so every
call streams its weight from DRAM. torch and ours run interleaved in the same process (round r:
torch over all matrices, then ours), and the best round of each is kept, so a noisy shared
machine biases both alike; compare the ratio column. GB/s = weight payload bytes (N*K*bits/8,
scales not counted) / time per matrix.

torch baselines are the paths the model used before the kernels: F.linear for fp32,
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` with the input cast to bf16 (Int8Linear /
Int4Linear's CPU path; fp32 input is ~10x slower in those ops).

"ours" for int8 / int4 is the path the modules take (`act_quant=True`: x quantized per call to
int16 / int8, integer dot products); `--exact` measures the exact-fp32 kernels instead.
`--shapes 0.5b` runs the Qwen2-0.5B decoder's Linear shapes (q/o, k/v, gate/up, down, lm_head).

    OMP_NUM_THREADS=2 python scripts/bench_kernels.py --threads 2
    OMP_NUM_THREADS=1 python scripts/bench_kernels.py --threads 1 --shapes 0.5b --ms 1,4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from fastvlm.config import APPLE_VOCAB_ROWS, TEXT_SHAPES, shape  # noqa: E402


def best_per_call(fn, mats, x, rounds_out: list[float]) -> None:
    t0 = time.perf_counter()
    for m in mats:
        fn(x, m)
    rounds_out.append((time.perf_counter() - t0) / len(mats))


def main(argv: list[str] | None = None) -> int:
    from fastvlm import kernels

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--ms", default="1,2,4,8", help="comma-separated row counts")
    p.add_argument("--kinds", default="fp32,int8,int4-g128", help="fp32,int8,int4-gG,...")
    p.add_argument("--n", type=int, default=TEXT_SHAPES["0.5b"]["intermediate_size"])
    p.add_argument("--k", type=int, default=TEXT_SHAPES["0.5b"]["hidden_size"])
    p.add_argument(
        "--mats",
        type=int,
        default=24,
        help="distinct weight matrices (raised so each kind spans >= 128 MB)",
    )
    p.add_argument("--rounds", type=int, default=15, help="timed rounds; best is kept")
    p.add_argument(
        "--shapes", default="", help="NxK,NxK,... or 0.5b / 1.5b / 7b (overrides --n/--k)"
    )
    p.add_argument("--exact", action="store_true", help="int8/int4: exact fp32 kernel path")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not kernels.available():
        print(f"kernels not available: {kernels.unavailable_reason()}", file=sys.stderr)
        return 1
    if a.shapes in TEXT_SHAPES:
        shapes = linear_shapes(a.shapes)
    elif a.shapes:
        shapes = [tuple(int(v) for v in t.lower().split("x")) for t in a.shapes.split(",")]
    else:
        shapes = [(a.n, a.k)]
    results = []
    for n, k in shapes:
        results += run_shape(a, n, k)
    print(json.dumps({"threads": a.threads, "shapes": shapes, "results": results}))
    return 0


def linear_shapes(name: str) -> list[tuple[int, int]]:
    """(N, K) of a decoder shape's Linears (q/o, k/v, gate/up, down, lm_head over the Apple
    vocabulary rows) from `fastvlm.config`'s shape table."""
    t = shape(name).text
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    inter = t.intermediate_size
    return [(h, h), (kv, h), (inter, h), (h, inter), (APPLE_VOCAB_ROWS[name], h)]


def run_shape(a, n: int, k: int) -> list[dict]:
    from fastvlm import kernels
    from fastvlm.quant import pack_nibbles, quantize_int4, quantize_int8

    aten = torch.ops.aten
    ms = [int(v) for v in a.ms.split(",")]
    aq = not a.exact
    g = torch.Generator().manual_seed(0)
    path = "exact fp32" if a.exact else "act_quant"
    print(f"threads={a.threads} N={n} K={k} mats={a.mats} rounds={a.rounds} int8/int4: {path}")
    print(f"{'kind':<10} {'M':>2} {'torch GB/s':>10} {'ours GB/s':>10} {'torch us':>9} "
          f"{'ours us':>9} {'ratio':>6}")  # fmt: skip
    results = []
    for kind in a.kinds.split(","):
        mats_t, mats_o = [], []
        bits = 32 if kind == "fp32" else 8 if kind == "int8" else 4
        n_mats = max(a.mats, -(-(128 << 20) // (n * k * bits // 8)))  # out of any cache
        for _ in range(n_mats):
            w = torch.randn(n, k, generator=g) / k**0.5
            if kind == "fp32":
                mats_t.append(w)
                payload = n * k * 4
            elif kind == "int8":
                q, s = quantize_int8(w)
                mats_t.append((q, s.bfloat16()))
                mats_o.append((q, s))
                payload = n * k
            elif kind.startswith("int4"):
                gs = int(kind.split("-g")[1]) if "-g" in kind else 128
                q, s, z = quantize_int4(w, gs)
                packed = aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
                sz = torch.stack([s, z], -1).transpose(0, 1).bfloat16().contiguous()
                mats_t.append((packed, sz))
                mats_o.append((pack_nibbles(q).contiguous(), s, kernels.int4_zb(s, z)))
                payload = n * k // 2
            else:
                raise SystemExit(f"unknown kind {kind!r}")
        if kind == "fp32":
            mats_o = mats_t
            torch_fn = lambda x, m: F.linear(x, m)  # noqa: E731
            ours_fn = lambda x, m: kernels.linear_fp32(x, m)  # noqa: E731
        elif kind == "int8":
            torch_fn = lambda x, m: aten._weight_int8pack_mm(  # noqa: E731
                x.bfloat16(), m[0], m[1]
            ).float()
            ours_fn = lambda x, m: kernels.linear_int8(x, m[0], m[1], act_quant=aq)  # noqa: E731
        else:
            torch_fn = lambda x, m, gs=gs: aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                x.bfloat16(), m[0], gs, m[1]
            ).float()
            ours_fn = lambda x, m, gs=gs: kernels.linear_int4(  # noqa: E731
                x, m[0], m[1], None, gs, zb=m[2], act_quant=aq
            )
        for mm in ms:
            x = torch.randn(mm, k, generator=g)
            tt, to, tr = [], [], []
            raw = [m if kind == "fp32" else m[0].view(torch.float32) for m in mats_o]
            for r in range(a.rounds + 1):
                best_per_call(torch_fn, mats_t, x, tt)
                best_per_call(ours_fn, mats_o, x, to)
                if kind == "fp32":  # torch.sum over the same bytes: the read-bandwidth yardstick
                    best_per_call(lambda _x, m: m.sum(), raw, x, tr)
                if r == 0:
                    tt.clear(), to.clear(), tr.clear()  # warm-up round
            t, o = min(tt), min(to)
            row = {"kind": kind, "M": mm, "torch_gbs": payload / t / 1e9,
                   "ours_gbs": payload / o / 1e9, "torch_us": t * 1e6, "ours_us": o * 1e6,
                   "ratio": t / o}  # fmt: skip
            if tr:
                row["read_gbs"] = payload / min(tr) / 1e9
            results.append(row)
            print(
                f"{kind:<10} {mm:>2} {row['torch_gbs']:>10.2f} {row['ours_gbs']:>10.2f} "
                f"{row['torch_us']:>9.0f} {row['ours_us']:>9.0f} {row['ratio']:>6.2f}"
                + (f"   (x.sum() read: {row['read_gbs']:.2f} GB/s)" if tr else "")
            )
        del mats_t, mats_o
    return results


if __name__ == "__main__":
    sys.exit(main())
