"""`fastvlm export {onnx,coreml,tflite,litertlm,web}`: deployable artefacts, each checked against
PyTorch.

* wrappers.py   the model cut into tensor-in / tensor-out modules (vision, embeddings, decoder)
* precision.py  presets (quality / balanced / small) and per-component `--precision` specs
* parity.py     the check every export ends with (max-abs, cosine, greedy agreement; exit 1)
* onnx.py       ONNX graphs in the onnx-community layout (fastvlm/backends/ort.py runs them)
* coreml.py     Core ML: vision .mlpackage + stateful decoder (KV cache as state)
* tflite.py     LiteRT (TFLite) vision encoder via litert-torch
* onnx_community.py  the transformers.js / onnx-community side files and file names
* web.py        browser folder: the ONNX export + pinned transformers.js (js_deps.py installs it)
* litertlm.py   LiteRT-LM .litertlm bundle (decoder + KV cache, embedder, vision) for Android

Heavy dependencies (onnx, onnxruntime, coremltools, litert-torch) are imported by the target
that needs them: `pip install 'fastvlm[export]'`.
"""

from __future__ import annotations

import importlib
import sys

TARGETS = {
    "onnx": "fastvlm.export.onnx",
    "coreml": "fastvlm.export.coreml",
    "tflite": "fastvlm.export.tflite",
    "litertlm": "fastvlm.export.litertlm",
    "web": "fastvlm.export.web",
}
USAGE = """usage: fastvlm export {onnx,coreml,tflite,litertlm,web} MODEL OUT
                      [--preset quality|balanced|small]
                      [--precision vision=fp16,projector=fp16,llm=int4] [--no-parity] ...

  onnx    vision_encoder / embed_tokens / decoder_model_merged .onnx (ONNX Runtime backend:
          fastvlm.load(OUT) runs the export)
  coreml  vision_encoder.mlpackage + decoder.mlpackage (stateful KV cache); predictions need
          macOS, on Linux the converted programs are validated instead
  tflite  vision_encoder.tflite via litert-torch, checked with ai-edge-litert's interpreter
  litertlm  model.litertlm for LiteRT-LM (decoder + KV cache, embedder, vision encoder,
          tokenizer, template); greedy tokens checked against PyTorch
  web     a static folder (index.html + transformers.js + the ONNX export) that runs the model
          in the browser, offline (WASM, WebGPU where available); needs node + npm to build

`fastvlm export TARGET -h` lists each target's options."""

__all__ = ["main", "TARGETS", "export_onnx", "export_coreml", "export_tflite", "export_litertlm",
           "export_web"]  # fmt: skip


def __getattr__(name: str):
    """`fastvlm.export.export_onnx` etc. without importing every target up front."""
    where = {
        "export_onnx": "onnx",
        "export_coreml": "coreml",
        "export_tflite": "tflite",
        "export_litertlm": "litertlm",
        "export_web": "web",
    }
    if name in where:
        return getattr(importlib.import_module(f"{__name__}.{where[name]}"), name)
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    target = argv[0]
    if target not in TARGETS:
        print(f"error: unknown export target {target!r}\n{USAGE}", file=sys.stderr)
        return 2
    return importlib.import_module(TARGETS[target]).main(argv[1:])
