"""Runtimes behind the `FastVLM` API (see base.py for the protocol every backend implements).

`BACKENDS` maps a `load(backend=...)` name to the function that opens a model folder on that
runtime: `opener(folder, *, tokenizer, **options) -> Backend`. A new runtime is one file here
plus one line in `BACKENDS`; heavy dependencies are imported inside its opener.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import Backend, Generation
from .ort import MANIFEST, open_onnx
from .torch import open_torch

BACKENDS: dict[str, Callable[..., Backend]] = {
    "torch": open_torch,
    "onnxruntime": open_onnx,
}

__all__ = ["BACKENDS", "Backend", "Generation", "open_backend", "refuse_foreign_export"]


def refuse_foreign_export(folder: Path) -> None:
    """A Core ML export has a fastvlm_export.json too, but no runtime here runs it: say so,
    instead of failing later as a broken ONNX folder."""
    try:
        fmt = json.loads((Path(folder) / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return  # no manifest (a checkpoint), or one the ONNX backend will report on
    if fmt not in ("onnx", "tflite"):
        raise ConfigError(
            f"{folder} is a {fmt} export (see its {MANIFEST}): fastvlm runs checkpoints "
            "and ONNX exports; run Core ML packages with Core ML on macOS (see its README.md)"
        )


def choose_backend(folder: Path, backend: str = "auto") -> str:
    """The registry name `open_backend` uses for `folder`: "auto" → an export folder (it has
    fastvlm_export.json) runs on ONNX Runtime, anything else on PyTorch."""
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(
            f"unknown backend {backend!r}: use auto, {', '.join(sorted(BACKENDS))}"
        )
    refuse_foreign_export(folder)
    if backend == "auto":
        return "onnxruntime" if (Path(folder) / MANIFEST).exists() else "torch"
    return backend


def open_backend(
    folder: str | Path, backend: str = "auto", *, tokenizer=None, **options: Any
) -> Backend:
    """Open `folder` on the chosen runtime; `options` go to its opener (device, dtype, engine,
    engine_options, trust_pickle, image_size for torch; intra_op_threads for onnxruntime)."""
    folder = Path(folder)
    return BACKENDS[choose_backend(folder, backend)](folder, tokenizer=tokenizer, **options)
