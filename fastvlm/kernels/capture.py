"""`graph_capture()`: whether torch is recording the model (its own module so that both the
kernels and kernels/prefill.py can ask without importing each other)."""

from __future__ import annotations

import torch


def graph_capture() -> bool:
    """True while torch.compile / torch.export / TorchScript tracing (ONNX export) records the
    model: a ctypes call is invisible to them (a trace would keep an uninitialised `empty`)."""
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
    )
