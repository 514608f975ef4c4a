"""Quantization-aware training: the chosen components' Linears compute with fake-quantized
weights (quantize → dequantize, exactly `fastvlm quantize`'s int8 / int4-gN arithmetic) and
pass gradients straight through to the float weights (STE).

Design decisions:
* A swap, not a flag: `apply_qat` re-classes each eligible `nn.Linear` as a `FakeQuantLinear`
  (its parameters, state-dict keys, tying and optimizer state untouched) and `strip_qat`
  turns it back. The saved model is an ordinary float one;
  `fastvlm quantize` of it yields exactly the weights the last training step computed with,
  because both call the same `quantize_int8/int4` + `dequantize_int8/int4` and store scales in
  the weight's dtype.
* Layers int4 cannot take (shape) stay float here too, as in `quantize_model`.
* Under LoRA the fake quantizer wraps the *merged* weight (base + B·A·scale), which is what
  `fastvlm quantize` sees after `--merge`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..errors import ConfigError
from ..train.lora import LoRALinear, lora_layers


def fake_quantize(w: torch.Tensor, scheme) -> torch.Tensor:
    """W → dequantize(quantize(W)) in W's dtype, as an `Int8Linear` / `Int4Linear` made from
    W computes with (scales rounded to W's dtype first, like `from_linear` stores them)."""
    if scheme.bits == 8:
        q, s = quant.quantize_int8(w)
        return quant.dequantize_int8(q, s.to(w.dtype)).to(w.dtype)
    if scheme.bits == 4:
        q, s, z = quant.quantize_int4(w, scheme.group_size, scheme.symmetric)
        deq = quant.dequantize_int4(q, s.to(w.dtype), z.to(w.dtype), scheme.group_size)
        return deq.to(w.dtype)
    return w


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, scheme) -> torch.Tensor:
        return fake_quantize(w.detach(), scheme)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def ste(w: torch.Tensor, scheme) -> torch.Tensor:
    """Forward: exactly the fake-quantized w; backward: identity (straight-through estimator)."""
    return _STE.apply(w, scheme)


class FakeQuantLinear(nn.Linear):
    """An `nn.Linear` whose forward uses the fake-quantized weight. `apply_qat` re-classes the
    existing module, so parameters, names, tying and optimizer state are untouched."""

    qat_scheme: quant.Scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ste(self.weight, self.qat_scheme)
        return F.linear(x, w.to(x.dtype), _cast(self.bias, x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.qat_scheme}"


class FakeQuantLoRALinear(LoRALinear):
    """A LoRA layer under QAT: the merged weight (base + B·A·scaling, as `merge_lora` folds it)
    is fake-quantized. Adapter dropout is not applied (the merged weight has none)."""

    qat_scheme: quant.Scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight
        merged = (w.float() + self.delta_weight()).to(w.dtype)
        return F.linear(x, ste(merged, self.qat_scheme).to(x.dtype), _cast(self.base.bias, x))


def _cast(b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if b is None else b.to(x.dtype)


def _targets(model: nn.Module, component: str) -> list[tuple[str, nn.Module]]:
    """Float Linears (or LoRA layers around one) of a component, by module name; the component
    rules are quant.component_linears', applied to the model with LoRA layers seen as their base."""
    lora = lora_layers(model)
    if not lora:
        return quant.component_linears(model, component)
    names = {n for n, _ in quant.component_linears(_without_lora(model, lora), component)}
    return [(n, m) for n, m in model.named_modules() if n in names]


def _without_lora(model: nn.Module, lora: dict) -> nn.Module:
    """A shallow view of `model` on the meta device where each LoRA layer is a plain Linear."""
    import copy

    view = copy.copy(model)
    view._modules = dict(model._modules)
    for name, m in lora.items():
        parts = name.split(".")
        node = view
        for p in parts[:-1]:  # copy the path down to the layer so the model itself is untouched
            child = copy.copy(node._modules[p])
            child._modules = dict(child._modules)
            node._modules[p] = child
            node = child
        node._modules[parts[-1]] = nn.Linear(m.in_features, m.out_features, device="meta")
    return view


def apply_qat(model: nn.Module, spec: str) -> dict[str, str]:
    """Make the Linears of the components `spec` names (a preset or `llm=int4-g64,projector=int8`,
    as `fastvlm quantize --quant`) compute with fake-quantized weights. Returns {layer: scheme}."""
    if getattr(model.config, "quantization", None):
        raise ConfigError("QAT trains a float model; this one is already quantized")
    schemes = quant.parse_spec(spec)
    done: dict[str, str] = {}
    for comp, scheme in schemes.items():
        if not scheme.bits:
            continue
        for name, m in _targets(model, comp):
            if scheme.bits == 4 and not quant.int4_shape_ok(
                m.in_features, m.out_features, scheme.group_size
            ):
                continue  # quantize_model keeps these float too
            m.__class__ = FakeQuantLoRALinear if isinstance(m, LoRALinear) else FakeQuantLinear
            m.qat_scheme = scheme
            done[name] = str(scheme)
    if not done:
        raise ConfigError(f"QAT {spec!r}: no layer of the chosen components can take that scheme")
    return done


def strip_qat(model: nn.Module) -> nn.Module:
    """Turn the fake-quant layers back into plain Linears / LoRA layers (same weights)."""
    for m in model.modules():
        if isinstance(m, (FakeQuantLinear, FakeQuantLoRALinear)):
            m.__class__ = LoRALinear if isinstance(m, LoRALinear) else nn.Linear
            del m.qat_scheme
    return model


def qat_layers(model: nn.Module) -> dict[str, str]:
    return {
        n: str(m.qat_scheme)
        for n, m in model.named_modules()
        if isinstance(m, (FakeQuantLinear, FakeQuantLoRALinear))
    }
