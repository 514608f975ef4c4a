"""The shared base of the quantized Linears: kernel dispatch (fastvlm.kernels, torch's CPU int
ops, or dequantize-then-matmul) with a cached argument plan per layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import prefill

KERNEL_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


class _QuantLinear(nn.Module):
    in_features: int
    out_features: int
    # torch's CPU int8/int4 ops are slow in fp32: they compute in bf16 (fp32 accumulation).
    cpu_compute_dtype: torch.dtype = torch.bfloat16

    @property
    def weight(self) -> torch.Tensor:
        """A zero-size tensor with the layer's float dtype and device, for code that reads
        `linear.weight.dtype` / `.device`. Not the weights: see `dequantized_weight()`."""
        return self.scales.new_empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if prefill.takes_gemm(self, x):  # many rows: a GEMM, not the decode kernels
            return prefill.quant_matmul(self, x)
        m = kernels.rows_for_kernel(x, self.in_features, max_m=None)
        if m:  # the decode hot path: fp32, contiguous, fastvlm.kernels on (checked cheaply)
            plan = self._plan()
            if plan is not None:
                return self._run(x, m, plan)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x.device.type == "cpu" and x.dtype in KERNEL_INPUT_DTYPES:
            plan = self._plan() if kernels.available() else None
            if plan is not None and not kernels.graph_capture():
                x2 = x2.float().contiguous()
                y = self._run(x2, x2.shape[0], plan).to(x.dtype)
            elif self._kernel_ready():
                y = self._kernel(x2)
            else:
                y = self._dequant(x2)
        else:
            y = self._dequant(x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _plan(self) -> tuple | None:
        """The kernel's arguments (pointers into fp32 copies made once, not per call), or None
        when this layer's weights are not a CPU kernel layout. Rebuilt when a tensor changes
        (new storage or an in-place update: the key holds data_ptr and version counter)."""
        tensors = self._plan_tensors()
        key = tuple((t.data_ptr(), _version(t)) for t in tensors if t is not None)
        cached = self.__dict__.get("_plan_cache")
        if cached is None or cached[0] != key:
            built = self._build_plan()  # (pointers..., ) or None, plus tensors to keep alive
            # holding `tensors` keeps their addresses from being reused by new tensors
            cached = (key, built, tensors)
            self.__dict__["_plan_cache"] = cached
        return cached[1][0] if cached[1] is not None else None

    def _fp32_bias(self) -> torch.Tensor | None:
        b = self.bias
        return None if b is None else b.detach().float().contiguous()

    def _dequant(self, x2: torch.Tensor) -> torch.Tensor:
        """Reference path: dequantize in fp32, cast to the input dtype, dense matmul."""
        w = self.dequantized_weight().to(x2.dtype)
        b = None if self.bias is None else self.bias.to(x2.dtype)
        return F.linear(x2, w, b)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme}"
        )
