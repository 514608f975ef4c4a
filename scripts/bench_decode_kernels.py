"""End-to-end decode with and without fastvlm.kernels on a real-size shape (random weights).

Variants, all through the public Engine (text-only prompt, greedy, batch 1 and N concurrent):
fp32 (torch F.linear), fp32 + `use_fast_linears`, int8 / int4 with torch's kernels (bf16
compute; `kernels.set_enabled(False)`) and with ours; `--unfused` adds ours decoded layer by
layer in torch (`Engine(fused_decode=False)`) next to the default fused C step. Rounds
alternate the variants and the best round of each is kept, so load from other processes on a
shared machine biases all alike; compare the ratios (last columns: vs torch fp32 and vs our
fp32).

    OMP_NUM_THREADS=2 python scripts/bench_decode_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def main(argv: list[str] | None = None) -> int:
    from fastvlm import kernels
    from fastvlm.bench.workload import build_shape, prompt_ids
    from fastvlm.engine.engine import Engine
    from fastvlm.engine.sampling import SamplingParams
    from fastvlm.quant import quantize_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="0.5b")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4, help="N for the aggregate tok/s (0: off)")
    p.add_argument("--quant", default="int8,int4", help="comma-separated quant specs")
    p.add_argument(
        "--unfused",
        action="store_true",
        help="also time each kernel variant with Engine(fused_decode=False) (fused-step A/B)",
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    if not kernels.available():
        print(f"kernels not available: {kernels.unavailable_reason()}", file=sys.stderr)
        return 1
    base = build_shape(a.shape, image_size=256)

    def text_ids(seed: int) -> list[int]:
        ids = prompt_ids(base.config, seed=seed)
        return [t for t in ids if t != base.config.image_token_id][:48]

    ids = text_ids(2)

    def concurrent(eng, n: int) -> float:
        """Aggregate decode tok/s of n streams (measured while all of them decode)."""
        hs = [eng.submit(text_ids(10 + i), None, params) for i in range(n)]
        while not all(h.output_ids for h in hs):
            eng.step()
        t0, k0 = time.perf_counter(), sum(len(h.output_ids) for h in hs)
        while all(not h.done for h in hs):
            eng.step()
        t1, k1 = time.perf_counter(), sum(len(h.output_ids) for h in hs)
        eng.run_until_done()
        return (k1 - k0) / (t1 - t0)

    variants = {}  # name -> (model, kernels on?)
    for q in filter(None, a.quant.split(",")):
        for on in (False, True):
            kernels.set_enabled(on)  # int4 picks its weight layout when quantized
            m = copy.deepcopy(base)
            quantize_model(m, q)
            variants[f"{q} {'ours' if on else 'torch'}"] = (m, on)
    kernels.set_enabled(True)
    fast = copy.deepcopy(base)
    n = kernels.use_fast_linears(fast)
    variants = {"fp32 torch": (base, False), "fp32 ours": (fast, True), **variants}
    # the same models decoded layer by layer in torch between the kernels (no fused C step)
    unfused = {f"{k} unfused": v for k, v in variants.items() if v[1]} if a.unfused else {}
    variants.update(unfused)
    print(f"shape={a.shape} threads={a.threads} tokens={a.tokens} swapped={n}", file=sys.stderr)

    engines = {k: Engine(m, slots=max(1, a.concurrency), max_len=len(ids) + a.tokens + 64,
                         fused_decode=k not in unfused)
               for k, (m, _) in variants.items()}  # fmt: skip
    params = SamplingParams(max_tokens=a.tokens, ignore_eos=True)
    best: dict[str, dict[str, float]] = {k: {} for k in variants}
    for r in range(a.rounds + 1):
        for k, (m, on) in variants.items():  # noqa: B007
            kernels.set_enabled(on)
            eng = engines[k]
            h = eng.submit(ids, None, params)
            h.result()
            if r == 0:
                continue  # warm-up round
            b = best[k]
            b["decode_tok_s"] = max(b.get("decode_tok_s", 0.0), h.stats.decode_tps)
            if a.concurrency > 1:
                agg = concurrent(eng, a.concurrency)
                b[f"agg_tok_s@{a.concurrency}"] = max(b.get(f"agg_tok_s@{a.concurrency}", 0), agg)
            print(f"round {r} {k}: {b}", file=sys.stderr, flush=True)
    kernels.set_enabled(True)
    t_fp32, o_fp32 = best["fp32 torch"]["decode_tok_s"], best["fp32 ours"]["decode_tok_s"]
    cols = list(best["fp32 torch"])
    print(f"{'variant':<14}" + "".join(f"{c:>16}" for c in cols) + f"{'vs torch fp32':>15}"
          f"{'vs ours fp32':>14}")  # fmt: skip
    for k, b in best.items():
        vs = f"{b['decode_tok_s'] / t_fp32:>15.2f}{b['decode_tok_s'] / o_fp32:>14.2f}"
        print(f"{k:<14}" + "".join(f"{b[c]:>16.2f}" for c in cols) + vs)
    print(json.dumps({"shape": a.shape, "threads": a.threads, "tokens": a.tokens, "best": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
