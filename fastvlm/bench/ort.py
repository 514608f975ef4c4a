"""ONNX Runtime: export the same weights with `fastvlm export onnx`, then time that folder
through the Backend protocol (`open_backend(..., "onnxruntime").submit`), as any user would."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .measure import peak_rss_mb
from .workload import PROMPT_TEXT, prompt_ids, random_image


def bench_onnxruntime(model, processor, args, quant: str, bandwidth: float) -> dict[str, Any]:
    """Export `model` (decoder at `quant`: fp32 | int8 | int4) and time generation on ORT."""
    from ..backends import open_backend
    from ..engine.sampling import SamplingParams
    from ..export.onnx import export_onnx

    llm = {"fp32": "fp32", "none": "fp32", "float32": "fp32"}.get(quant, quant)
    out: dict[str, Any] = {"name": f"onnxruntime {llm}"}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_onnx(model, tmp, f"llm={llm}", None, parity=False, log=lambda *a, **k: None)
        out["export_s"] = time.perf_counter() - t0
        files = {f.name: f.stat().st_size for f in (Path(tmp) / "onnx").iterdir()}
        out["decoder_mb"] = sum(v for k, v in files.items() if k.startswith("decoder")) / 2**20
        backend = open_backend(
            Path(tmp), "onnxruntime", intra_op_threads=torch.get_num_threads()
        )
        size = model.config.vision.image_size
        px = processor.pixels([random_image(size, seed=1)])
        ids = prompt_ids(model.config, seed=2)
        p = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        list(backend.submit(ids[: PROMPT_TEXT[0]], None, SamplingParams(max_tokens=2)))
        gen = backend.submit(ids, px, p)
        list(gen)
        st = gen.stats
        backend.close()
        del backend
    out["vision_s"] = st.vision_s
    out["ttft_s"] = st.prefill_s
    out["prefill_s"] = st.prefill_s - st.vision_s
    out["decode_tok_s"] = st.decode_tps
    out["peak_rss_mb"] = peak_rss_mb()
    return out
