"""Quantizing a model: which Linears each component covers, the in-place swap with a size
summary, and the load-time hooks `weights.load_model` calls (`prepare_for_load`, `finalize`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import kernels
from ..errors import ConfigError
from .int4 import Int4Linear, int4_shape_ok
from .int8 import Int8Linear
from .scheme import COMPONENTS, Scheme, parse_spec, spec_to_config

QUANT_TYPES = (Int8Linear, Int4Linear)


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
