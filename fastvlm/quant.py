"""Weight-only int8 / int4 quantization: Linear swaps, per-component presets, save format (the
`fastvlm quantize` command is in quant_cli.py).

Quantization is a *module swap* (DESIGN.md "Swaps, not flags"): `quantize_model` replaces chosen
`nn.Linear`s by `Int8Linear` (per-output-channel symmetric int8) or `Int4Linear` (group-wise int4,
asymmetric by default); the model code never knows. Activations stay float; biases stay float.

Components (`--quant llm=int4,projector=int8,vision=none` or a preset name, see `PRESETS`):
* `llm`       — every Linear under `language_model.layers.*`, plus `lm_head`. A tied `lm_head`
                becomes its own quantized copy; the embedding stays float and the config is marked
                untied (`tie_word_embeddings=false`), which is what the model now is.
* `projector` — `mm_projector.0` and `mm_projector.2`.
* `vision`    — the attention `qkv` / `proj` Linears of the FastViTHD tower. Convolutions (all of
                the RepMixer / ConvFFN / stem work) stay float: weight-only Linear kernels do not
                apply to them.

Kernels, in order of preference on CPU:
* `fastvlm.kernels` (our AVX2/FMA C kernels, compiled on first use; `kernels.available()`): the
  quantized layer's portable form is the kernel's layout, inputs of other float dtypes are cast
  to fp32, and each weight byte is read once per 8 input rows. By default (`act_quant`) the
  kernel quantizes x per call (int16 for int8 weights, int8 for int4) and uses integer dot
  products; `act_quant = False` keeps exact fp32 math. Used for every M: at M=64..256 they also
  beat torch's kernels below (one 4864x896 layer, 1 thread, Zen 5 where torch's bf16 kernels use
  AVX-512: int8 M=64 3.5 ms vs 3.7 ms, int4-g128 M=256 12.1 ms vs 13.3 ms; on an AVX2-only EPYC
  the exact fp32 kernels already won: int8 M=64 8 ms vs 13 ms, int4 M=256 36 ms vs 58 ms), so an
  Int4Linear keeps only its nibble form (no second, tinygemm-packed copy).
* Otherwise torch's CPU ops (torch 2.13; looked up with `hasattr`, older torch falls back):
* `aten._weight_int8pack_mm(x (M,K) f32|bf16|f16 with stride(1)==1, w int8 (N,K) contiguous,
  scales (N,) same dtype as x) -> (M,N)`; no shape constraints; w is the plain int8 matrix.
* `aten._convert_weight_to_int4pack_for_cpu(w int32 (N,K) values 0..15, inner_k_tiles) -> uint8
  (N, K/2)`: needs N % 16 == 0 and K even; `inner_k_tiles` is ignored on CPU. The packed layout
  is ISA-specific (blocks of 64 rows with AVX512, 32 otherwise), so it is never written to disk.
* `aten._weight_int4pack_mm_for_cpu(x (M,K) contiguous, packed, group_size in {32,64,128,256},
  scales_and_zeros (K/G, N, 2) same dtype as x) -> (M,N)`, with K % group_size == 0 and the
  tinygemm convention w = (q - 8) * scale + zero.
The fp32/fp16 instantiations of both kernels are slow: one 896x4864 Linear, M=1, one thread on a
2-core AVX2 EPYC: dense fp32 0.9-2.0 ms, int8 kernel 0.56-0.69 ms in bf16 but 5.8-6.8 ms in fp32,
int4-g128 1.0 ms in bf16 but 12-14 ms in fp32. So on CPU the kernels always compute in
`cpu_compute_dtype` (bf16): the input is cast to bf16 (fp32 accumulation inside the kernel) and
the output cast back. Elsewhere (CUDA, MPS, float64 inputs) a dequantize-then-`F.linear` fallback
is used: correct, saves memory, not faster. Layers whose shapes int4 cannot take (out_features %
16, in_features % group_size) stay plain float `nn.Linear`s (listed in the summary); int8 takes
every shape.

Files ("fastvlm" format only): config.json gets `"quantization": {"version": 1, "llm": "int4-g128",
"projector": "int8", "vision": "none"}`; a quantized Linear `X` stores `X.qweight` (int8 (N,K), or
for int4 uint8 (N,K/2) holding two 4-bit values per byte, low nibble = even column, unsigned
0..15), `X.scales` ((N,) or (N,K/G)), `X.zeros` (int4 only, (N,K/G), tinygemm zero: w = (q - 8) *
scale + zero) and `X.bias`. This layout is device-independent; `finalize()` repacks it for the
kernel at load time. `weights.load_model` calls `prepare_for_load` (swap in empty quantized
modules on the meta device, so the strict key check holds) and `finalize` after assignment.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import prefill
from .errors import ConfigError

COMPONENTS = ("llm", "projector", "vision")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
FORMAT_VERSION = 1
PRESETS = {
    "none": "llm=none,projector=none,vision=none",
    "int8": "llm=int8,projector=int8",
    "int4": "llm=int4,projector=int8",  # group size: --group-size, default 128
    "int4-g32": "llm=int4-g32,projector=int8",
    "int4-g64": "llm=int4-g64,projector=int8",
    "int4-g128": "llm=int4-g128,projector=int8",
}
KERNEL_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_aten = torch.ops.aten
HAS_INT8_KERNEL = hasattr(_aten, "_weight_int8pack_mm")
HAS_INT4_KERNEL = hasattr(_aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    _aten, "_convert_weight_to_int4pack_for_cpu"
)


# ---------------------------------------------------------------------- schemes and specs
@dataclass(frozen=True, slots=True)
class Scheme:
    """One component's quantization: bits 0 (float), 8 (per-channel) or 4 (group-wise)."""

    bits: int = 0
    group_size: int = 0
    symmetric: bool = True

    def __str__(self) -> str:
        if self.bits == 0:
            return "none"
        if self.bits == 8:
            return "int8"
        return f"int4-g{self.group_size}" + ("-sym" if self.symmetric else "")

    @classmethod
    def parse(cls, text: str, group_size: int | None = None) -> Scheme:
        """`none | int8 | int4[-gN][-sym]`; `group_size` is the default N for a bare `int4`."""
        t = text.strip().lower()
        if t in ("none", "fp", "float", ""):
            return cls()
        if t == "int8":
            return cls(bits=8)
        parts = t.split("-")
        if parts[0] != "int4":
            raise ConfigError(
                f"unknown quantization scheme {text!r}: use none, int8, int4, int4-g32/g64/g128, "
                "optionally with -sym (e.g. int4-g64-sym)"
            )
        g, sym = group_size or DEFAULT_GROUP_SIZE, False
        for p in parts[1:]:
            if p == "sym":
                sym = True
            elif p.startswith("g") and p[1:].isdigit():
                g = int(p[1:])
            else:
                raise ConfigError(f"unknown int4 option {p!r} in {text!r} (use -gN and/or -sym)")
        if g not in GROUP_SIZES:
            raise ConfigError(f"int4 group size must be one of {GROUP_SIZES}, not {g}")
        return cls(bits=4, group_size=g, symmetric=sym)


def parse_spec(spec: str | dict[str, Any], group_size: int | None = None) -> dict[str, Scheme]:
    """A preset name, `"llm=int4,projector=int8"` or a config.json `quantization` dict → schemes.

    Components left out are not quantized. `group_size` is the default for a bare `int4`.
    """
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size must be one of {GROUP_SIZES}, not {group_size}")
    if isinstance(spec, dict):
        d = dict(spec)
        version = d.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"quantization format version {version} is not supported")
        items = [(str(k), str(v)) for k, v in d.items()]
    else:
        text = PRESETS.get(spec.strip().lower(), spec)
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                raise ConfigError(
                    f"bad quantization spec {spec!r}: expected a preset ({', '.join(PRESETS)}) "
                    "or component=scheme pairs like llm=int4,projector=int8"
                )
            k, v = part.split("=", 1)
            items.append((k.strip().lower(), v))
    out = {c: Scheme() for c in COMPONENTS}
    seen = set()
    for k, v in items:
        if k not in COMPONENTS:
            raise ConfigError(f"unknown component {k!r} in quantization spec: use {COMPONENTS}")
        if k in seen:
            raise ConfigError(f"component {k!r} given twice in quantization spec")
        seen.add(k)
        out[k] = Scheme.parse(v, group_size)
    return out


def spec_to_config(schemes: dict[str, Scheme]) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, **{c: str(schemes[c]) for c in COMPONENTS}}


# ---------------------------------------------------------------------- quantize / dequantize
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → int8 (N, K) in [-127, 127], fp32 scales (N,); |w - q*s| ≤ s/2."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero rows: q = 0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


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
    if symmetric:
        scales = (g.abs().amax(dim=-1) / 7.5).clamp_(min=1e-10)
        zeros = torch.zeros_like(scales)
        q = torch.round(g / scales[..., None]).clamp_(-8, 7) + 8
    else:
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scales = ((hi - lo) / 15.0).clamp_(min=1e-10)
        zeros = lo + 8 * scales
        q = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15)
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


# ---------------------------------------------------------------------- modules
def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


class _QuantLinear(nn.Module):
    in_features: int
    out_features: int
    # The CPU kernels are only fast in bf16 (see the module docstring).
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


class Int8Linear(_QuantLinear):
    """Per-output-channel symmetric int8 weight, float bias; fastvlm.kernels or
    `_weight_int8pack_mm` on CPU.

    `act_quant` (class default True; set it on an instance or the class to compare): the
    kernel quantizes x to int16 per 64 columns and uses integer dot products (_mm256_madd_epi16),
    ~2x faster at M = 2..8 than exact fp32 math; its added error is ~1e-5 relative, far below the
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


class Int4Linear(_QuantLinear):
    """Group-wise int4 weight (asymmetric or symmetric), float bias; fastvlm.kernels or tinygemm
    int4 on CPU.

    Persistent state is the portable nibble form (`qweight` (N, K/2), `scales`, `zeros`), which
    `fastvlm.kernels` runs directly. Without those, `repack()` on CPU converts it to tinygemm's
    packed layout and frees the portable copy (int4 is for memory); `state_dict()` then rebuilds
    the portable form from the packed one.

    `act_quant` (class default True; set it on an instance or the class to compare): the
    kernel quantizes x to int8 in blocks of 8-32 columns and uses integer dot products
    (llama.cpp's Q4 x Q8, ORT MatMulNBits accuracy_level=4), ~3x faster at M = 1 than exact fp32
    math; its added error is ~10x below the int4 weight rounding (bound in
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


QUANT_TYPES = (Int8Linear, Int4Linear)


# ---------------------------------------------------------------------- model-level
def component_linears(model: nn.Module, component: str) -> list[tuple[str, nn.Linear]]:
    """The float Linears (`nn.Linear` or `kernels.FastLinear`) a component covers, by name."""
    out = []
    for name, m in model.named_modules():
        if type(m) not in (nn.Linear, kernels.FastLinear):
            continue
        if component == "llm":
            hit = name.startswith("language_model.layers.") or name == "lm_head"
        elif component == "projector":
            hit = name in ("mm_projector.0", "mm_projector.2")
        elif component == "vision":
            hit = name.startswith("vision_tower.") and name.rsplit(".", 1)[-1] in ("qkv", "proj")
        else:
            raise ConfigError(f"unknown component {component!r}: use {COMPONENTS}")
        if hit:
            out.append((name, m))
    return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _eligible(linear: nn.Linear, scheme: Scheme) -> bool:
    return scheme.bits == 8 or (
        scheme.bits == 4
        and int4_shape_ok(linear.in_features, linear.out_features, scheme.group_size)
    )


def _nbytes(m: nn.Module) -> int:
    if isinstance(m, Int4Linear):
        tensors = [m.portable_qweight(), m.scales, m.zeros]
    elif isinstance(m, Int8Linear):
        tensors = [m.qweight, m.scales]
    else:
        tensors = [m.weight]
    if m.bias is not None:
        tensors.append(m.bias)
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(slots=True)
class ComponentStats:
    scheme: str
    layers: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass(slots=True)
class QuantSummary:
    """What `quantize_model` did, per component (bytes of the swapped layers, before / after)."""

    components: dict[str, ComponentStats] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # layers left float (shape unsupported)
    untied_lm_head: bool = False

    @property
    def bytes_before(self) -> int:
        return sum(c.bytes_before for c in self.components.values())

    @property
    def bytes_after(self) -> int:
        return sum(c.bytes_after for c in self.components.values())

    def __str__(self) -> str:
        rows = [f"{'component':<10} {'scheme':<14} {'layers':>6} {'before':>10} {'after':>10}"]
        for name, c in self.components.items():
            rows.append(
                f"{name:<10} {c.scheme:<14} {c.layers:>6} {_mb(c.bytes_before):>10} "
                f"{_mb(c.bytes_after):>10}"
            )
        rows.append(f"{'total':<10} {'':<14} {'':>6} {_mb(self.bytes_before):>10} "
                    f"{_mb(self.bytes_after):>10}")  # fmt: skip
        if self.untied_lm_head:
            rows.append("lm_head was tied to the embedding: quantized as its own copy "
                        "(counted as 0 bytes before); the embedding stays float")  # fmt: skip
        if self.skipped:
            names = ", ".join(self.skipped[:4]) + (", ..." if len(self.skipped) > 4 else "")
            rows.append(f"kept float, shape not supported by int4 ({len(self.skipped)}): {names}")
        return "\n".join(rows)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    spec: str | dict[str, Any] = "int4",
    *,
    group_size: int | None = None,
    finalize_now: bool = True,
    progress: bool = False,
) -> QuantSummary:
    """Swap the Linears of the chosen components for quantized ones, in place.

    `finalize_now=False` leaves the portable form in place (cheap to save; `fastvlm quantize`
    uses it); otherwise the layers are packed for the model's device right away.
    """
    if getattr(model.config, "quantization", None):
        raise ConfigError("this model is already quantized; quantize the float checkpoint")
    schemes = parse_spec(spec, group_size)
    todo = [
        (comp, name, lin)
        for comp, scheme in schemes.items()
        if scheme.bits
        for name, lin in component_linears(model, comp)
    ]
    summary = QuantSummary({c: ComponentStats(str(s)) for c, s in schemes.items() if s.bits})
    tied = model.config.text.tie_word_embeddings
    from tqdm import tqdm

    for comp, name, lin in tqdm(todo, desc="quantize", unit="layer", disable=not progress):
        scheme = schemes[comp]
        if not _eligible(lin, scheme):
            summary.skipped.append(name)
            continue
        new = (Int8Linear if scheme.bits == 8 else Int4Linear).from_linear(lin, scheme)
        stats = summary.components[comp]
        stats.layers += 1
        stats.bytes_before += 0 if (name == "lm_head" and tied) else _nbytes(lin)
        stats.bytes_after += _nbytes(new)
        _swap(model, name, new)
        if name == "lm_head" and tied:
            model.config.text.tie_word_embeddings = False  # lm_head is its own module now
            summary.untied_lm_head = True
    if any(s.bits for s in schemes.values()):
        model.config.quantization = spec_to_config(schemes)
    if finalize_now:
        finalize(model)
    return summary


def prepare_for_load(model: nn.Module, qcfg: dict[str, Any]) -> nn.Module:
    """On a meta-device model: swap in empty quantized modules so its state_dict keys match a
    quantized checkpoint (called by `weights.load_model` before the strict key check)."""
    schemes = parse_spec(qcfg)
    for comp, scheme in schemes.items():
        if not scheme.bits:
            continue
        for name, lin in component_linears(model, comp):
            if not _eligible(lin, scheme):
                continue
            if name == "lm_head" and model.config.text.tie_word_embeddings:
                raise ConfigError("config.json is inconsistent: a quantized lm_head cannot be tied")
            w = lin.weight
            args = (lin.in_features, lin.out_features, lin.bias is not None)
            if scheme.bits == 8:
                new = Int8Linear(*args, dtype=w.dtype, device=w.device)
            else:
                new = Int4Linear(*args, scheme.group_size, scheme.symmetric, w.dtype, w.device)
            _swap(model, name, new)
    return model


def finalize(model: nn.Module) -> nn.Module:
    """Repack every quantized layer for the device it is on (after loading or moving)."""
    for m in model.modules():
        if isinstance(m, QUANT_TYPES):
            m.repack()
    return model


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """`fastvlm quantize` (in quant_cli.py, which imports this module)."""
    from .quant_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
