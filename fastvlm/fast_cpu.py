"""Reduced-precision CPU compute for time to first token: the vision tower and the prefill GEMMs
in bf16 (oneDNN; AVX512-BF16 / AMX where the CPU has them), applied by one function,
`prepare_cpu(model, vision_dtype=..., prefill_dtype=...)`, which `device.prepare_for_device`
calls on CPU (so `fastvlm.load` and the torch backend apply it).

* `vision_dtype="bf16"`: the FastViTHD tower's conv / linear weights are cast to bf16 once (half
  the memory) and its forward runs under `torch.autocast("cpu", bfloat16)`: convolutions,
  linears and attention in bf16, everything autocast keeps in fp32 (norms, softmax statistics,
  the layer-scale residual adds, which see fp32 parameters) stays fp32; the output is fp32.
  Done as class swaps (`BF16Tower` over the tower's class; conv → GELU pairs as one oneDNN conv with the GELU
  fused, `_FusedConvFFN` / `_FusedMobileOne`), so the state dict and module names do not change.
* `prefill_dtype="bf16"`: every decoder / lm_head Linear runs prefill-shaped calls (at least
  `kernels.prefill.MIN_ROWS` rows) as a bf16 GEMM (`kernels.prefill`); decode is untouched.
  Quantized layers already default to bf16 there when the CPU has native bf16 (their decode
  kernels are approximate anyway); `"fp32"` forces exact math on the dequantized weight.
* `prefill_dtype=None` (the default): float layers fp32, quantized layers their default.
* `"auto"` = bf16 where the CPU has native bf16 (AVX512-BF16 or AMX-BF16: elsewhere oneDNN
  emulates bf16 and it is slower than fp32), else fp32. The library default is `"fp32"` for
  float layers (outputs unchanged); the quality bar for bf16 (image-embedding cosine, greedy
  agreement on held-out scenes) is a test: tests/test_fast_cpu.py.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .errors import ConfigError
from .kernels import FastLinear, prefill, use_fast_linears
from .kernels.prefill import native_bf16
from .model.fastvithd import ConvFFN, FastViTHD, MobileOneBlock

CHOICES = ("auto", "fp32", "bf16")
_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}  # fmt: skip


def resolve(value: str | torch.dtype | None, what: str = "dtype") -> torch.dtype:
    """'auto' | 'fp32' | 'bf16' (or a torch dtype) → torch.float32 / torch.bfloat16."""
    if isinstance(value, torch.dtype):
        if value in (torch.float32, torch.bfloat16):
            return value
        raise ConfigError(f"{what} must be fp32 or bf16, not {value}")
    v = (value or "fp32").strip().lower()
    if v == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if v not in _NAMES:
        raise ConfigError(f"unknown {what} {value!r}: use one of {', '.join(CHOICES)}")
    return _NAMES[v]


def _conv_gelu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """GELU(conv(x)) as one oneDNN call (the activation applied in the conv's epilogue, not as
    a second pass over the map), in the conv weight's dtype."""
    x = x.to(conv.weight.dtype).contiguous(memory_format=torch.channels_last)
    return _CONV_POINTWISE(
        x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, "gelu", [], "none",
    )  # fmt: skip


_CONV_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


class _FusedConvFFN(ConvFFN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_conv_gelu(self.fc1, self.conv(x)))


class _FusedMobileOne(MobileOneBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_gelu(self.reparam_conv, x)


def _fusable(m: nn.Module) -> bool:
    """Blocks whose conv → GELU can run as one oneDNN call (plain GELU, no SE in between)."""
    if _CONV_POINTWISE is None:
        return False
    if type(m) is ConvFFN:
        return type(m.act) is nn.GELU and m.act.approximate == "none"
    if type(m) is MobileOneBlock and hasattr(m, "reparam_conv"):
        act = m.activation
        return type(m.se) is nn.Identity and type(act) is nn.GELU and act.approximate == "none"
    return False


_FUSED = {ConvFFN: _FusedConvFFN, MobileOneBlock: _FusedMobileOne}
_UNFUSED = {v: k for k, v in _FUSED.items()}


class BF16Tower:
    """Mixin for a FastViTHD class (plain or `device.CPUFastViTHD`): its forward runs under bf16
    autocast (conv / linear weights stored in bf16); fp32 in, fp32 out. Swapped in by
    `prepare_cpu` (`_bf16_class`); `to_fp32()` swaps back."""

    _fp32_class: type = FastViTHD

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = pixel_values.dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().forward(pixel_values).to(dtype)

    def to_fp32(self) -> FastViTHD:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.float()
            if type(m) in _UNFUSED:
                m.__class__ = _UNFUSED[type(m)]
        self.__class__ = self._fp32_class
        return self


@functools.cache
def _bf16_class(cls: type) -> type:
    return type(f"BF16{cls.__name__}", (BF16Tower, cls), {"_fp32_class": cls})


def _vision(tower: FastViTHD, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not isinstance(tower, BF16Tower):
        for m in tower.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # quantized vision Linears keep theirs
                m.to(torch.bfloat16)
        for m in tower.modules():
            if _fusable(m):
                m.__class__ = _FUSED[type(m)]
        tower.__class__ = _bf16_class(type(tower))
    elif dtype == torch.float32 and isinstance(tower, BF16Tower):
        tower.to_fp32()


def prepare_cpu(
    model: nn.Module, vision_dtype: str | torch.dtype = "fp32",
    prefill_dtype: str | torch.dtype | None = None,
) -> dict[str, str]:  # fmt: skip
    """Set the model's CPU compute dtypes (in place; idempotent; call again to change them).
    `prefill_dtype=None`: each layer type's default (float layers fp32, quantized layers bf16
    where the CPU has native bf16, see kernels/prefill.py). Call it again after quantizing (new
    layers). Returns `describe(model)`. Only for fp32 models on CPU: a model in bf16 / fp16 or
    on another device is left as it is."""
    vd = resolve(vision_dtype, "vision dtype")
    pd = None if prefill_dtype is None else resolve(prefill_dtype, "prefill dtype")
    ref = model.lm_head.weight
    if ref.device.type != "cpu" or ref.dtype != torch.float32:
        return describe(model)
    _vision(model.vision_tower, vd)
    if pd is not None:
        use_fast_linears(model)  # decoder Linears → FastLinear, which read prefill_dtype
    for name, m in model.named_modules():
        if not (name.startswith("language_model.layers.") or name == "lm_head"):
            continue
        if isinstance(m, FastLinear) or hasattr(m, "qweight"):
            if pd is not None:
                m.prefill_dtype = pd  # read by kernels.prefill.compute_dtype
            elif "prefill_dtype" in m.__dict__:
                del m.prefill_dtype  # back to the layer type's default
    return describe(model)


def describe(model: nn.Module) -> dict[str, str]:
    """The compute dtypes a model currently runs with on CPU (for logs and the bench)."""
    dt = model.lm_head.weight.dtype
    if dt != torch.float32:  # a bf16 / fp16 model computes in its own dtype throughout
        name = str(dt).replace("torch.", "")
        return {"vision": name, "prefill": name}
    vision = "bf16" if isinstance(model.vision_tower, BF16Tower) else "fp32"
    dts = {
        prefill.compute_dtype(m) for m in model.modules()
        if isinstance(m, FastLinear) or hasattr(m, "qweight")
    }  # fmt: skip
    pre = "bf16" if dts == {torch.bfloat16} else "fp32" if dts <= {torch.float32} else "mixed"
    return {"vision": vision, "prefill": pre}
