"""Export a random-weight FastVLM at the full 0.5B shape to ONNX and measure it.

No weights are downloaded: the model is `FastVLMModel(config_05b())` with `init_weights()`
(FastViTHD at 1024 px → 256 tokens, Qwen2-0.5B decoder, 152000-row vocabulary). Two modes, each
meant to run in its own process so that `peak_rss_gb` is the peak of that one job:

    # export (prints one JSON line: file sizes, seconds, peak RSS, parity numbers)
    OMP_NUM_THREADS=1 python scripts/export_05b.py export $WORK/f05_fp32 --precision quality
    OMP_NUM_THREADS=1 python scripts/export_05b.py export $WORK/f05_int4 \\
        --precision vision=fp16,llm=int4
    # ONNX Runtime decode speed of an export (JSON line: vision / prefill / decode tok/s)
    python scripts/export_05b.py bench $WORK/f05_int4 --threads 2 --tokens 32 --repeats 3

Random weights make flat, noisy logits, so greedy agreement of quantized decoders is a weak
signal here (use the demo model's numbers for that); sizes, memory and speed are what this
measures.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvlm.bench.workload import prompt_ids  # noqa: E402
from fastvlm.config import FastVLMConfig, shape  # noqa: E402


def config_05b() -> FastVLMConfig:
    return shape("0.5b", 1024, chat_template="apple", bos_token_id=151643, eos_token_id=151645)


def random_05b(seed: int = 0):
    from fastvlm.model.fastvlm import FastVLMModel

    torch.manual_seed(seed)
    model = FastVLMModel(config_05b())
    model.init_weights()
    return model.eval()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux → GB


def cmd_export(a) -> dict:
    from fastvlm.export.onnx import export_onnx

    t0 = time.perf_counter()
    model = random_05b()
    res = export_onnx(model, a.out, a.precision, None, parity=not a.no_parity, threads=a.threads)
    p = res.parity
    return {
        "out": str(a.out),
        "precision": res.precision,
        "files_mb": {k: round(v / 1e6, 1) for k, v in res.files.items()},
        "decoder_mb": round(res.size("decoder_model_merged") / 1e6, 1),
        "vision_mb": round(res.size("vision_encoder") / 1e6, 1),
        "export_s": round(res.seconds, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "parity": None if p is None else p.to_dict(),
    }


def cmd_bench(a) -> dict:
    import fastvlm

    opts = {"intra_op_threads": a.threads}
    vlm = fastvlm.load(a.out, backend="onnxruntime", backend_options=opts)
    cfg = vlm.config
    g = torch.Generator().manual_seed(0)
    s = cfg.vision.image_size
    px = torch.rand(1, 3, s, s, generator=g)
    ids = prompt_ids(cfg, seed=2)  # the prompt `fastvlm bench` gives the PyTorch engine
    vlm.generate_ids(ids, px, max_tokens=4, ignore_eos=True)  # warm-up (allocations, caches)
    runs = []
    for _ in range(a.repeats):
        vlm.generate_ids(ids, px, max_tokens=a.tokens, ignore_eos=True)
        runs.append(vlm.last_stats)
    st = sorted(runs, key=lambda r: r.decode_tps)[len(runs) // 2]  # the median-decode run
    return {
        "out": str(a.out),
        "precision": vlm.backend.precision,
        "threads": a.threads,
        "prompt_tokens": st.prompt_tokens,
        "generation_tokens": st.generation_tokens,
        "vision_s": round(st.vision_s, 3),
        "prefill_s": round(st.prefill_s - st.vision_s, 3),  # Stats.prefill_s includes vision
        "ttft_s": round(st.prefill_s, 3),
        "decode_tok_s": round(st.decode_tps, 2),
        "decode_tok_s_runs": [round(r.decode_tps, 2) for r in runs],
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("out", type=Path)
    e.add_argument("--precision", default="quality")
    e.add_argument("--no-parity", action="store_true")
    e.add_argument("--threads", type=int, default=1)
    b = sub.add_parser("bench")
    b.add_argument("out", type=Path)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=1)
    a = p.parse_args(argv)
    print(json.dumps(cmd_export(a) if a.cmd == "export" else cmd_bench(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
