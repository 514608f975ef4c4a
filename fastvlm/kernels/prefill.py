"""Prefill-shaped (many-row) matmuls for the quantized Linears and `FastLinear`: dequantize the
weight in row chunks and run one oneDNN / MKL GEMM per chunk.

Why: `fvk_linear_i8` / `fvk_linear_i4` (gemv.c) are decode kernels. They hold at most 8 rows of
x in registers, so a prompt of M rows re-streams every weight M/8 times through GEMV-shaped
tiles with one OpenMP region per 8 rows; at prefill M (hundreds of rows) that made int8 prefill
several times slower than the fp32 one (and far worse on a busy machine, where every one of
those barriers waits for a descheduled thread). A GEMM library blocks for the caches instead,
and in bf16 it uses AVX512-BF16 / AMX where the CPU has them.

* `MIN_ROWS`: from this many rows on a quantized layer takes `quant_matmul`; fewer rows keep
  the decode kernels (which read each weight byte once per 8 rows, the right trade at small M).
* Exactness: int8 weights are exact in bf16 (|q| <= 127 needs 7 significant bits, bf16 has 8),
  so the bf16 int8 path multiplies x (rounded to bf16) by q exactly and applies the per-row
  scale in fp32 afterwards. int4 weights are dequantized (q * scale + zb) in fp32, then cast.
  The fp32 path is exact math on the dequantized weight (same result as `act_quant=False`).
* Memory: at most `CHUNK_ELEMS` weight elements are dequantized at once (a transient copy of a
  few MB), so a quantized model never holds a float copy of a whole layer.
* `compute_dtype(module)`: a layer's `prefill_dtype` attribute (set by
  `fastvlm.fast_cpu.prepare_cpu`); a quantized layer without one uses bf16 where the CPU
  computes bf16 natively (`native_bf16()`; the decode kernels of those layers are approximate
  too) and fp32 elsewhere, where oneDNN would emulate bf16 slower than fp32.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import capture

MIN_ROWS = 16
CHUNK_ELEMS = 1 << 23
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16; read on Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    return False


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    dt = getattr(module, "prefill_dtype", None)
    if dt is None:
        return torch.bfloat16 if native_bf16() else torch.float32
    return dt if dt in DTYPES else torch.float32


def takes_gemm(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """True when a quantized layer's call is prefill-shaped and this path can run it: x a CPU
    float tensor with at least MIN_ROWS rows, the layer's portable weights on CPU, and no graph
    capture (torch.compile / export keep the module's own traceable path)."""
    k = module.in_features
    if not (x.is_cpu and x.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return False
    if x.numel() // max(k, 1) < MIN_ROWS:
        return False
    q = module.qweight
    if not (q.numel() and q.is_cpu and q.is_contiguous()):
        return False  # e.g. an Int4Linear holding only torch's packed layout
    return not capture.graph_capture()


def _chunks(n: int, k: int):
    step = max(16, CHUNK_ELEMS // max(k, 1))
    for n0 in range(0, n, step):
        yield n0, min(n, n0 + step)


def int8_matmul(
    x2: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y (M, N) fp32 = (x2 @ q.T) * scales + bias; q int8 (N, K), the GEMM in `dtype`."""
    xd = x2.to(dtype)
    parts = [F.linear(xd, q[a:b].to(dtype)) for a, b in _chunks(*q.shape)]
    y = (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).float()
    y.mul_(scales.float())
    return y if bias is None else y.add_(bias.float())


def int4_matmul(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """y (M, N) fp32 = x2 @ W.T + bias, W = (q - 8) * scale + zero dequantized per row chunk
    from the portable nibble form qweight uint8 (N, K/2)."""
    n, k2 = qweight.shape
    k = 2 * k2
    xd = x2.to(dtype)
    parts = []
    for a, b in _chunks(n, k):
        p = qweight[a:b]
        q = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(b - a, k // group_size, group_size)
        s, z = scales[a:b].float()[..., None], zeros[a:b].float()[..., None]
        w = q.float().mul_(s).add_(z - 8 * s).reshape(b - a, k)  # (q - 8) * s + z
        parts.append(F.linear(xd, w.to(dtype)))
    y = (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).float()
    return y if bias is None else y.add_(bias.float())


def dense_matmul(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """F.linear with the GEMM in `dtype` (the weight cast per call, chunked), output x's dtype."""
    if dtype == x.dtype == w.dtype:
        return F.linear(x, w, bias)
    xd = x.to(dtype)
    parts = [F.linear(xd, w[a:b].to(dtype)) for a, b in _chunks(*w.shape)]
    y = (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).to(x.dtype)
    return y if bias is None else y.add_(bias.to(x.dtype))


def quant_matmul(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A prefill-shaped call of an Int8Linear / Int4Linear (x (..., K) on CPU; check with
    `takes_gemm` first) → (..., N) in x's dtype."""
    x2 = x.reshape(-1, module.in_features)
    grad = torch.is_grad_enabled() and x.requires_grad
    dt = torch.float32 if grad else compute_dtype(module)  # gradients: exact math
    if hasattr(module, "group_size"):
        y = int4_matmul(
            x2, module.qweight, module.scales, module.zeros, module.group_size,
            module.bias, dt,
        )  # fmt: skip
    else:
        y = int8_matmul(x2, module.qweight, module.scales, module.bias, dt)
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)
