"""Time to first token, split (preprocess / vision / projector / prefill), per compute dtype, on
random 0.5B-shape weights (nothing downloaded). Every configuration is measured in one process,
interleaved round by round (A/B/A/B...), and the median of the rounds is printed, as wall time
and as process CPU time (with --threads 1 the CPU time is the steadier number on a shared box).

Configurations: fp32 (vision + prefill fp32), bf16 (vision + prefill bf16, fast_cpu.prepare_cpu),
int8 / int4 decoders (projector int8) with their prefill GEMM in fp32 (exact) and bf16, and
`int8-kernel`: the int8 decoder through the decode kernels at prefill M (the old path, for the
A/B; off with --no-old-path).

    PYTHONPATH=. python scripts/bench_ttft.py --sizes 1024,768,512 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from fastvlm import fast_cpu, quant
from fastvlm.bench.workload import at_resolution, build_shape, prompt_ids, random_image
from fastvlm.device import prepare_for_device
from fastvlm.kernels import FastLinear, prefill
from fastvlm.processing import Processor


def _set_prefill(model, dtype: torch.dtype) -> None:
    for m in model.modules():
        if isinstance(m, FastLinear) or hasattr(m, "qweight"):
            m.prefill_dtype = dtype


def _clock(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024,768,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quant", default="int8,int4")
    p.add_argument("--no-old-path", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sizes = [int(s) for s in a.sizes.split(",")]
    base = build_shape("0.5b", sizes[0])
    prepare_for_device(base, "cpu")  # channels_last tower, FastLinear decoder, as load() does
    vt32 = base.vision_tower
    vt16 = copy.deepcopy(vt32)
    fast_cpu._vision(vt16, torch.bfloat16)
    decoders = {"fp32": base}
    for q in filter(None, a.quant.split(",")):
        m = copy.copy(base)  # shares the vision tower; own decoder copy
        m.language_model = copy.deepcopy(base.language_model)
        m.lm_head = copy.deepcopy(base.lm_head)
        m.mm_projector = copy.deepcopy(base.mm_projector)
        m.config = copy.deepcopy(base.config)
        quant.quantize_model(m, q)
        decoders[q] = m
    results: dict[str, dict[str, list]] = {}

    def add(key: str, part: str, w: float, c: float) -> None:
        results.setdefault(key, {}).setdefault(part, []).append((w, c))

    with torch.inference_mode():
        for size in sizes:
            model = at_resolution(base, size)
            proc = Processor(model.config, None)
            ids = torch.tensor([prompt_ids(model.config, seed=2)])
            img = random_image(size, seed=1)
            for vt in (vt32, vt16):  # warm-up (allocator, oneDNN primitives)
                model.vision_tower = vt
                model.embed_images(proc.pixels([img])[:, :, :128, :128])
            for r in range(a.rounds):
                px, w, c = _clock(lambda: proc.pixels([img]))
                add(f"{size}", "preprocess", w, c)
                feats = {}
                for name, vt in (("fp32", vt32), ("bf16", vt16)):
                    model.vision_tower = vt
                    feats[name], w, c = _clock(lambda: model.encode_images(px))
                    add(f"{size} vision {name}", "vision", w, c)
                cases = [("fp32", "fp32", torch.float32), ("bf16", "fp32", torch.bfloat16)]
                for q in decoders:
                    if q != "fp32":
                        cases += [(f"{q} prefill-fp32", q, torch.float32),
                                  (f"{q} prefill-bf16", q, torch.bfloat16)]  # fmt: skip
                if "int8" in decoders and not a.no_old_path and size == sizes[0]:
                    cases.append(("int8-kernel", "int8", None))
                for label, q, dt in cases:
                    m = decoders[q]
                    emb, w, c = _clock(lambda m=m: m.mm_projector(feats["fp32"]))
                    add(f"{size} {label}", "projector", w, c)
                    old = prefill.MIN_ROWS
                    if dt is None:
                        prefill.MIN_ROWS = 1 << 30  # every call to the decode kernels
                    else:
                        _set_prefill(m, dt)
                    try:
                        _, w, c = _clock(lambda m=m: m(ids, image_embeds=emb, last_only=True))
                    finally:
                        prefill.MIN_ROWS = old
                    add(f"{size} {label}", "prefill", w, c)
                print(f"[ttft] {size}px round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
    table = {
        k: {part: [round(statistics.median(x[i] for x in v), 3) for i in (0, 1)]
            for part, v in parts.items()}
        for k, parts in results.items()
    }  # fmt: skip
    print(f"threads={a.threads} rounds={a.rounds}  [wall s, cpu s] medians")
    for k, parts in table.items():
        print(f"{k:<28} " + "  ".join(f"{p}={v}" for p, v in parts.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "rounds": a.rounds, "medians": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
