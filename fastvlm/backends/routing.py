"""Which backend runs a model: `choose_backend(requested, folder)`.

`auto` (the default, or $FASTVLM_BACKEND): an ONNX export folder → onnxruntime; Apple silicon
with `mlx` and `mlx_vlm` importable → mlx; else torch (CUDA when present, else CPU). `auto`
never fails because an optional backend is missing; an explicitly requested backend that cannot
run here is a `ConfigError` naming the install command. MLX's CPU backend (Linux x86) is not
its target, so `auto` never routes there: `backend="mlx"` still runs it, for tests.

The platform probes are module functions so tests can monkeypatch the routing table.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError

BACKENDS = ("torch", "onnxruntime", "mlx")
ENV = "FASTVLM_BACKEND"
INSTALL = {
    "mlx": 'pip install "fastvlm[mlx]" (mlx + mlx-vlm)',
    "onnxruntime": 'pip install "fastvlm[export]" (onnxruntime)',
    "torch": "pip install torch",
}
# The manifest `fastvlm export` writes: such a folder runs on ONNX Runtime, not as a checkpoint.
EXPORT_MANIFEST = "fastvlm_export.json"


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _importable(*names: str) -> bool:
    try:
        return all(importlib.util.find_spec(n) is not None for n in names)
    except (ImportError, ValueError):
        return False


def mlx_available() -> bool:
    return _importable("mlx", "mlx_vlm")


def onnxruntime_available() -> bool:
    return _importable("onnxruntime")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def is_onnx_export(folder: str | Path | None) -> bool:
    if folder is None:
        return False
    return (Path(folder) / EXPORT_MANIFEST).is_file()


def normalize(requested: str | None) -> str:
    """'auto' | a backend name, from the argument or $FASTVLM_BACKEND."""
    name = requested if requested not in (None, "") else os.environ.get(ENV) or "auto"
    name = str(name).strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: choose auto, {', '.join(BACKENDS)}")
    return name


def available(name: str) -> bool:
    if name == "mlx":
        return mlx_available()
    if name == "onnxruntime":
        return onnxruntime_available()
    return True


class Route(NamedTuple):
    backend: str  # "torch" | "onnxruntime" | "mlx"
    device: str  # torch: "cuda" | "mps" | "cpu" or the caller's device; else where it runs


def _torch_device(device: str | None) -> str:
    if device not in (None, "auto"):
        return str(device)
    if cuda_available():
        return "cuda"
    return "mps" if mps_available() else "cpu"


def choose_backend(
    requested: str | None, folder: str | Path | None = None, device: str | None = None
) -> Route:
    """The backend (and device) to load `folder` with; see the module docstring for the table.
    An explicit torch `device` ("cpu", "cuda:1", "mps") makes `auto` pick torch."""
    name = normalize(requested)
    onnx = is_onnx_export(folder)
    if name == "auto":
        if onnx:
            if not onnxruntime_available():
                raise ConfigError(
                    f"{folder} is an ONNX export, which runs on ONNX Runtime only: "
                    f"{INSTALL['onnxruntime']}"
                )
            return Route("onnxruntime", "cpu")
        if device in (None, "auto") and is_apple_silicon() and mlx_available():
            return Route("mlx", "gpu")
        return Route("torch", _torch_device(device))
    if not available(name):
        raise ConfigError(f"backend {name!r} was requested but is not installed: {INSTALL[name]}")
    if onnx and name != "onnxruntime":
        raise ConfigError(
            f"{folder} is an ONNX export: it runs on backend 'onnxruntime', not {name!r}"
        )
    if name == "torch":
        return Route("torch", _torch_device(device))
    if name == "mlx":
        if device not in (None, "auto", "gpu", "cpu"):
            raise ConfigError(
                f"not supported on the mlx backend: device {device!r} (use auto, gpu or cpu)"
            )
        if device in ("gpu", "cpu"):
            return Route("mlx", device)
        return Route("mlx", "gpu" if is_apple_silicon() else "cpu")
    return Route(name, "cpu")
