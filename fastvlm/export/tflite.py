"""`fastvlm export tflite MODEL OUT`: the vision encoder (+ projector) as a LiteRT (.tflite) model.

Converted with `litert-torch` (the maintained PyTorch → LiteRT converter, torch.export based) and
checked with `ai-edge-litert`'s interpreter against PyTorch (max-abs / cosine of the image
embeddings). Output: OUT/vision_encoder.tflite (pixel_values (1, 3, S, S) float32 NCHW →
image_embeds (1, tokens, D)), config.json, tokenizer.json, fastvlm_export.json, README.md.

Design decisions:
* Only the vision encoder is exported here. The whole model (decoder with KV cache, embedder,
  vision) for apps is `fastvlm export litertlm` (litertlm.py), a LiteRT-LM bundle.
* Precision is applied after conversion with `ai-edge-quantizer` (weight-only: fp16 casting or
  int8 channel-wise); activations stay fp32, so no calibration images are needed.
* litert-torch pulls transformers / jax and pins pydantic, so it is not in the `export` extra;
  install it in its own virtualenv (README "Export") — this module imports it lazily and fails
  with an actionable error when it is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .onnx import ExportResult, add_common_args, load_source, prepare_out, print_result
from .precision import as_precision, describe, resolve_precision
from .wrappers import VisionEncoder

ALLOWED = {
    "vision": ("fp32", "fp16", "int8"),
    "projector": ("fp32", "fp16", "int8"),
    "embed": ("fp32", "fp16", "int8", "int4"),  # not exported: accepted so presets apply
    "llm": ("fp32", "fp16", "int8", "int4"),
}
INSTALL = (
    "TFLite export needs litert-torch and ai-edge-litert, which pin packages (pydantic, "
    "transformers) that may clash with your environment; install them in a virtualenv: "
    "python -m venv --system-site-packages venv-tflite && "
    "venv-tflite/bin/pip install litert-torch ai-edge-litert"
)


def _quantize(path: Path, vision: str) -> None:
    """Weight-only fp16 / int8 of the converted model, in place (ai-edge-quantizer)."""
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = quantizer.Quantizer(str(path))
    algo = AlgorithmName.FLOAT_CASTING if vision == "fp16" else AlgorithmName.MIN_MAX_UNIFORM_QUANT
    bits = 16 if vision == "fp16" else 8
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        try:
            q.add_weight_only_config(".*", op, bits, algorithm_key=algo)
        except ValueError as e:  # an op this algorithm cannot take: leave it float
            print(f"  note: {op} stays fp32 ({e})")
    res = q.quantize(enable_progress_report=False)
    path.write_bytes(bytes(res.quantized_model))


class TFLiteVision:
    """ai-edge-litert interpreter around vision_encoder.tflite (batch 1, looped over images)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=threads)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]

    def __call__(self, pixel_values: torch.Tensor) -> np.ndarray:
        outs = []
        for px in np.asarray(pixel_values, np.float32):
            self.it.set_tensor(self.inp["index"], px[None])
            self.it.invoke()
            outs.append(self.it.get_tensor(self.out["index"]).copy())
        return np.concatenate(outs)


def export_tflite(
    model,
    out: str | Path,
    precision: str | dict[str, str] | None = None,
    tokenizer=None,
    *,
    parity: bool = True,
    log=print,
) -> ExportResult:
    try:
        import litert_torch
    except ImportError as e:
        raise ConfigError(INSTALL) from e
    from . import parity as parity_mod
    from .onnx import write_folder

    prec = as_precision(precision, ALLOWED, "TFLite")
    if prec["projector"] != prec["vision"]:  # one graph, one weight recipe
        log(f"  note: projector follows vision in TFLite ({prec['vision']})")
        prec["projector"] = prec["vision"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    s = model.config.vision.image_size
    t0 = time.perf_counter()
    log(f"exporting TFLite vision encoder ({describe(prec)}) to {out}")
    edge = litert_torch.convert(VisionEncoder(model), (torch.zeros(1, 3, s, s),))
    path = out / "vision_encoder.tflite"
    edge.export(str(path))
    vis = prec["vision"]
    if vis != "fp32":
        _quantize(path, vis)
    write_folder(model, tokenizer, out, prec, opset=0)
    manifest_path = out / "fastvlm_export.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(format="tflite", files={"vision": "vision_encoder.tflite"}, opset=None)
    res = ExportResult(out, prec, seconds=time.perf_counter() - t0)
    res.files["vision_encoder.tflite"] = path.stat().st_size
    if parity:
        run = TFLiteVision(path)
        res.parity = parity_mod.check(
            model, tokenizer, "ai-edge-litert", {"vision": vis, "projector": vis},
            embed_images=run,
        )  # fmt: skip
        res.parity.notes.append("decoder not exported to TFLite (see tflite.py); logits n/a")
        manifest["parity"] = res.parity.to_dict()
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(
        f"# FastVLM vision encoder — LiteRT / TFLite (fastvlm)\n\n"
        f"`vision_encoder.tflite`: pixel_values float32 (1, 3, {s}, {s}) NCHW → image_embeds "
        f"float32 (1, {model.config.num_image_tokens}, {model.config.text.hidden_size}); "
        f"weights {vis}.\n\n```python\nfrom ai_edge_litert.interpreter import Interpreter\n"
        f'it = Interpreter(model_path="vision_encoder.tflite"); it.allocate_tensors()\n```\n\n'
        f"Parity against PyTorch:\n\n```\n{res.parity or '(skipped)'}\n```\n"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastvlm export tflite", description=__doc__.split("\n")[0])
    add_common_args(p)
    a = p.parse_args(argv)
    prec = resolve_precision(a.preset, a.precision, ALLOWED, "TFLite")
    try:
        import litert_torch  # noqa: F401
    except ImportError as e:
        raise ConfigError(INSTALL) from e
    out = Path(a.out)
    prepare_out(out, a.force)
    model, tok, _ = load_source(a)
    res = export_tflite(model, out, prec, tok, parity=not a.no_parity)
    return print_result(res)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
