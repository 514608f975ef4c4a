"""Device policy: pick device and dtype, and prepare a loaded model for the device it runs on.

The model code (`fastvlm/model/`) is device-blind; everything that only pays off on one kind of
hardware is applied here, once, by `prepare_for_device(model, device)` — as swaps, never as flags
the model has to ask about. On CPU that is:
* allocator tuning (`engine/allocator.py`): big activations reuse heap memory;
* the vision tower in channels_last (oneDNN's convolutions prefer NHWC) and run as micro-batches
  through its high-resolution stages (`CPUFastViTHD`);
* the decoder's fp32 Linears swapped for `kernels.FastLinear` (decode GEMVs in our C kernels)
  when the kernels build on this machine;
* on request, bf16 compute for the vision tower and the prefill GEMMs (`fast_cpu.py`).
CUDA and MPS need nothing beyond the dtype; the engine picks CUDA graphs itself.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import fast_cpu, kernels
from .engine.allocator import tune_malloc
from .model.fastvithd import FastViTHD

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    if dev.type == "mps" and not (torch.backends.mps.is_available()):
        raise ValueError("device='mps' was asked for but MPS is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif dtype in (None, "auto"):
        out = {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    elif str(dtype).lower() in DTYPES:
        out = DTYPES[str(dtype).lower()]
    else:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if device.type == "cpu" and out != torch.float32:
        warnings.warn(
            f"{out} on CPU is very slow on most CPUs (no native bf16/fp16 matmul); "
            "float32 is recommended",
            stacklevel=3,
        )
    return out


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class CPUFastViTHD(FastViTHD):
    """FastViTHD with the CPU execution plan (same parameters, same math, same state dict).

    A batch runs its high-resolution stages `micro_batch` images at a time: one 1024² image
    already keeps every conv GEMM-bound, and a whole batch's multi-GB activations only add
    cache/TLB misses. From the first attention stage's resolution on (a few MB per image) the
    batch runs whole, so its linears see B x more rows. Inputs go to channels_last per
    micro-batch (a cache-sized copy, not one copy of the whole batch up front).
    """

    micro_batch = 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        mb, end = self.micro_batch, len(self.network)
        if pixel_values.is_cpu and not self.training and mb and pixel_values.shape[0] > mb:
            split = self.tail_start()
            parts = [
                self.run_stages(self.patch_embed(_nhwc(c)), 0, split)
                for c in pixel_values.split(mb)
            ]
            return self.conv_exp(self.run_stages(torch.cat(parts), split, end))
        return super().forward(_nhwc(pixel_values))


def prepare_cpu_vision_tower(tower: FastViTHD) -> FastViTHD:
    """Weights to channels_last and the CPU execution plan, in place (idempotent). The class
    swap is the `torch.nn.utils.parametrize` idiom: parameters, names and hooks stay put."""
    tower.to(memory_format=torch.channels_last)
    if type(tower) is FastViTHD:
        tower.__class__ = CPUFastViTHD
    return tower


def prepare_for_device(
    model: nn.Module, device: str | torch.device, *, vision_dtype: str | torch.dtype = "fp32",
    prefill_dtype: str | torch.dtype | None = None,
) -> nn.Module:  # fmt: skip
    """Apply the device's execution policy to a loaded FastVLM model in place; returns it.
    Numerics are unchanged up to float rounding unless `vision_dtype` / `prefill_dtype` ask
    for bf16 compute on CPU (`fast_cpu.prepare_cpu`); idempotent."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return model
    tune_malloc()
    tower = getattr(model, "vision_tower", None)
    if isinstance(tower, FastViTHD):
        prepare_cpu_vision_tower(tower)
    if kernels.available():
        kernels.use_fast_linears(model)
    if isinstance(tower, FastViTHD) and hasattr(model, "lm_head"):
        fast_cpu.prepare_cpu(model, vision_dtype, prefill_dtype)
    return model
