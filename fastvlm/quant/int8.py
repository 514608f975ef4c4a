"""Per-output-channel symmetric int8 weights: quantize / dequantize and `Int8Linear`."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .layer import _QuantLinear
from .scheme import Scheme

_aten = torch.ops.aten
HAS_INT8_KERNEL = hasattr(_aten, "_weight_int8pack_mm")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → int8 (N, K) in [-127, 127], fp32 scales (N,); |w - q*s| ≤ s/2."""
    w = w.detach().float()
    lo, hi = torch.aminmax(w, dim=1)  # max |w| in one pass, no |w| copy
    scales = torch.maximum(-lo, hi) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero rows: q = 0
    q = w.div(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


class Int8Linear(_QuantLinear):
    """Per-output-channel symmetric int8 weight, float bias; fastvlm.kernels or
    `_weight_int8pack_mm` on CPU.

    `act_quant` (class default True; set it on an instance or the class to compare): the
    kernel quantizes x to int16 per 64 columns and uses integer dot products (_mm256_madd_epi16),
    instead of exact fp32 math; its added error is ~1e-5 relative, far below the
    int8 weight rounding (bound in `kernels.linear_int8`).
    """

    scheme = Scheme(bits=8)
    act_quant: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        q = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("qweight", q)  # (N, K)
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme | None = None) -> Int8Linear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q, s = quantize_int8(w)
        m.qweight, m.scales = q, s.to(w.dtype)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def _kernel_ready(self) -> bool:
        # torch 2.13's CPU kernel crashes the process (SIGSEGV, seen on an AVX-512 Zen 5 CPU)
        # when a weight row does not start on a 64-byte boundary (K % 64 != 0 with M > 1, or a
        # weight mmap'd from a safetensors file at an unaligned offset): only aligned layers use
        # it, the others take the dequantize fallback (`repack` makes loaded weights aligned).
        q = self.qweight
        return HAS_INT8_KERNEL and self.in_features % 64 == 0 and q.data_ptr() % 64 == 0

    def _plan_tensors(self) -> tuple:
        return self.qweight, self.scales, self.bias

    def _build_plan(self) -> tuple | None:
        q = self.qweight
        if q.device.type != "cpu" or q.dtype != torch.int8 or not q.is_contiguous():
            return None
        assert q.shape == (self.out_features, self.in_features)
        s, b = self.scales.float().contiguous(), self._fp32_bias()
        ptrs = (q.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr())
        return ptrs, (s, b)

    def _run(self, x: torch.Tensor, m: int, plan: tuple) -> torch.Tensor:
        return kernels._run_i8(x, m, *plan, self.out_features, self.in_features, self.act_quant)

    def _kernel(self, x2: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        cd = compute_dtype or self.cpu_compute_dtype
        y = _aten._weight_int8pack_mm(x2.to(cd).contiguous(), self.qweight, self.scales.to(cd))
        return self._add_bias(y.to(x2.dtype))

    def repack(self) -> None:
        """Nothing to pack: the kernel takes the plain (N, K) int8 matrix (64-byte aligned: a
        fresh copy if the storage is not, e.g. mmap'd from a file)."""
        if self.qweight.device.type != "meta":
            q = self.qweight.contiguous()
            self.qweight = q.clone() if q.device.type == "cpu" and q.data_ptr() % 64 else q
