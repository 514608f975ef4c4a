"""Group-wise int4 weights: quantize / dequantize, nibble packing (the portable on-disk form)
and `Int4Linear`."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .layer import _QuantLinear
from .scheme import DEFAULT_GROUP_SIZE, Scheme

_aten = torch.ops.aten
HAS_INT4_KERNEL = hasattr(_aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    _aten, "_convert_weight_to_int4pack_for_cpu"
)


def quantize_int4(
    w: torch.Tensor, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float → (q uint8 (N, K) in 0..15, scales (N, K/G), zeros (N, K/G)), fp32.

    tinygemm convention w ≈ (q - 8) * scale + zero. Asymmetric: scale = (max - min) / 15,
    zero = min + 8 * scale. Symmetric: scale = absmax / 7.5, zero = 0. Error ≤ scale / 2.
    """
    n, k = w.shape
    assert k % group_size == 0, "in_features must be a multiple of the group size"
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = torch.aminmax(g, dim=-1)  # one pass; in-place ops below (streamed 7B loads)
    if symmetric:
        scales = (torch.maximum(-lo, hi) / 7.5).clamp_(min=1e-10)
        zeros = torch.zeros_like(scales)
        q = g.div(scales[..., None]).round_().clamp_(-8, 7).add_(8)
    else:
        scales = ((hi - lo) / 15.0).clamp_(min=1e-10)
        zeros = lo + 8 * scales
        q = g.sub(lo[..., None]).div_(scales[..., None]).round_().clamp_(0, 15)
    return q.reshape(n, k).to(torch.uint8), scales, zeros


def dequantize_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    n, k = q.shape
    g = q.float().reshape(n, k // group_size, group_size) - 8
    return (g * scales.float()[..., None] + zeros.float()[..., None]).reshape(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K) with values 0..15 → (N, K/2): low nibble = even column, high = odd."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)


def _unpack_cpu_int4(packed: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    """Invert `_convert_weight_to_int4pack_for_cpu` through the kernel itself (ISA-independent):
    rows of the identity times the weight with scale 1, zero 8 give q exactly. O(K²N) work."""
    packed = packed.cpu()
    sz = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(k // group_size, n, 2).contiguous()
    out = torch.empty(n, k, dtype=torch.uint8)
    step = 256
    for k0 in range(0, k, step):
        rows = min(step, k - k0)
        eye = torch.zeros(rows, k, dtype=torch.bfloat16)
        eye[torch.arange(rows), torch.arange(k0, k0 + rows)] = 1
        y = _aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, sz)  # (rows, N)
        out[:, k0 : k0 + rows] = y.t().to(torch.uint8)
    return out


def int4_shape_ok(in_features: int, out_features: int, group_size: int) -> bool:
    """Shapes the int4 CPU kernel takes (decided from shapes only, so files load anywhere)."""
    return out_features % 16 == 0 and in_features % group_size == 0


class Int4Linear(_QuantLinear):
    """Group-wise int4 weight (asymmetric or symmetric), float bias; fastvlm.kernels or tinygemm
    int4 on CPU.

    Persistent state is the portable nibble form (`qweight` (N, K/2), `scales`, `zeros`), which
    `fastvlm.kernels` runs directly. Without those, `repack()` on CPU converts it to tinygemm's
    packed layout and frees the portable copy (int4 is for memory); `state_dict()` then rebuilds
    the portable form from the packed one.

    `act_quant` (class default True; set it on an instance or the class to compare): the
    kernel quantizes x to int8 in blocks of 8-32 columns and uses integer dot products
    (llama.cpp's Q4 x Q8, ORT MatMulNBits accuracy_level=4) instead of exact fp32 math; its
    added error is well below the int4 weight rounding (bound in
    `kernels.linear_int4`).
    """

    act_quant: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = DEFAULT_GROUP_SIZE,
        symmetric: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not int4_shape_ok(in_features, out_features, group_size):
            raise ValueError(
                f"int4 needs out_features % 16 == 0 and in_features % {group_size} == 0, got "
                f"({out_features}, {in_features})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        n, ng = out_features, in_features // group_size
        q = torch.zeros(n, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", q)  # (N, K/2) nibbles
        self.register_buffer("scales", torch.ones(n, ng, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(n, ng, dtype=dtype, device=device))
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        # Kernel-side tensors, rebuilt by repack() and never saved.
        empty = torch.empty(0, dtype=torch.uint8, device=device)
        self.register_buffer("packed", empty, persistent=False)  # (N, K/2) CPU layout
        self.register_buffer("scales_and_zeros", empty.to(dtype), persistent=False)  # (K/G, N, 2)

    @property
    def scheme(self) -> Scheme:
        return Scheme(bits=4, group_size=self.group_size, symmetric=self.symmetric)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> Int4Linear:
        w = linear.weight
        m = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            scheme.group_size, scheme.symmetric, w.dtype, w.device,
        )  # fmt: skip
        q, s, z = quantize_int4(w, scheme.group_size, scheme.symmetric)
        m.qweight, m.scales, m.zeros = pack_nibbles(q), s.to(w.dtype), z.to(w.dtype)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return m

    def portable_qweight(self) -> torch.Tensor:
        """The (N, K/2) nibble form, rebuilt from the CPU-packed weight if that is all we hold."""
        if self.qweight.numel():
            return self.qweight
        if self.packed.numel():
            q = _unpack_cpu_int4(self.packed, self.out_features, self.in_features, self.group_size)
            return pack_nibbles(q).to(self.packed.device)
        raise RuntimeError("Int4Linear holds no weights")

    def dequantized_weight(self) -> torch.Tensor:
        q = unpack_nibbles(self.portable_qweight())
        return dequantize_int4(q, self.scales, self.zeros, self.group_size)

    def _kernel_ready(self) -> bool:
        return self.packed.numel() > 0 and self.packed.device.type == "cpu"

    def _plan_tensors(self) -> tuple:
        return self.qweight, self.scales, self.zeros, self.bias

    def _build_plan(self) -> tuple | None:
        q = self.qweight
        if not q.numel() or q.device.type != "cpu" or not q.is_contiguous():
            return None  # tinygemm-packed (no portable copy) or off CPU
        assert q.dtype == torch.uint8 and q.shape == (self.out_features, self.in_features // 2)
        s, b = self.scales.float().contiguous(), self._fp32_bias()
        zb = kernels.int4_zb(self.scales, self.zeros)
        ptrs = (q.data_ptr(), s.data_ptr(), zb.data_ptr(), None if b is None else b.data_ptr())
        return ptrs, (s, zb, b)

    def _run(self, x: torch.Tensor, m: int, plan: tuple) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        return kernels._run_i4(x, m, *plan, n, k, self.group_size, self.act_quant)

    def _dequant(self, x2: torch.Tensor) -> torch.Tensor:
        if not self.qweight.numel():
            raise RuntimeError(
                f"this Int4Linear was packed for the CPU kernel but runs on {x2.device}; after "
                "moving a quantized model call fastvlm.quant.finalize(model)"
            )
        return super()._dequant(x2)

    def _kernel(self, x2: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        cd = compute_dtype or self.cpu_compute_dtype
        sz = self.scales_and_zeros
        sz = sz if sz.dtype == cd else self._scales_and_zeros(cd)
        y = _aten._weight_int4pack_mm_for_cpu(
            x2.to(cd).contiguous(), self.packed, self.group_size, sz
        )
        return self._add_bias(y.to(x2.dtype))

    def _scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """The kernel's (K/G, N, 2) [scale, zero] table, built from the stored (N, K/G) pair."""
        return torch.stack([self.scales, self.zeros], -1).transpose(0, 1).to(dtype).contiguous()

    def repack(self) -> None:
        """Pack for the device the layer is on: the portable form where `fastvlm.kernels` runs
        it (or off CPU), else torch's CPU int4 layout."""
        dev = self.scales.device
        if dev.type == "meta":
            return
        q = self.portable_qweight().to(dev)
        if dev.type == "cpu" and kernels.available():  # our kernel reads the portable form
            self.qweight = q.contiguous()
            self.packed = q.new_empty(0)
            self.scales_and_zeros = self.scales.new_empty(0)
        elif dev.type == "cpu" and HAS_INT4_KERNEL:
            self.packed = _aten._convert_weight_to_int4pack_for_cpu(
                unpack_nibbles(q).to(torch.int32),
                2,  # inner_k_tiles: unused on CPU
            )
            self.scales_and_zeros = self._scales_and_zeros(self.cpu_compute_dtype)
            self.qweight = q.new_empty(0)  # the packed copy replaces it
        else:
            self.qweight = q
            self.packed = q.new_empty(0)
            self.scales_and_zeros = self.scales.new_empty(0)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.qweight.numel():
            destination[prefix + "qweight"] = self.portable_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if not self.qweight.numel():  # packed: restore a portable-shaped slot, repack later
            n, k = self.out_features, self.in_features
            self.qweight = torch.zeros(n, k // 2, dtype=torch.uint8, device=self.scales.device)
            self.packed = self.packed.new_empty(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
