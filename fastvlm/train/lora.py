"""LoRA as a module swap: `apply_lora` replaces chosen `nn.Linear` layers by `LoRALinear`, a
frozen base layer plus a trainable low-rank update `B @ A * alpha / r`; `merge_lora` folds the
update back into the weight and swaps plain `nn.Linear`s back in.

Design decisions:
* Swaps, not flags: the model code never knows about LoRA. While adapted, state-dict keys gain
  `.base.` / `.lora_A` / `.lora_B`, so an adapted model is saved as an *adapter* (only the
  low-rank tensors, `adapter_model.safetensors` + `adapter_config.json`), and a full model is
  only ever saved after `merge_lora`, which restores the plain layout the normal loader reads.
* Adapter tensor names are our internal module names (`language_model.layers.0.self_attn.q_proj
  .lora_A`), shapes as in PEFT (A: r×in, kaiming-uniform; B: out×r, zeros, so training starts at
  the base model). No peft dependency; PEFT adapter files are not read.
* What gets adapted: Linear layers of the language model whose last name is in `targets`;
  with `include_projector` both projector Linears; with `include_vision` every Linear of the
  vision tower (the attention `qkv` / `proj` of its last stages; convolutions are never adapted).
  Everything else, BatchNorm statistics included (the trainer keeps frozen BN in eval mode), is
  frozen, so the base weights stay bit-identical.
* QLoRA (`quantize=True`) puts the adapted base layers in bitsandbytes NF4. It needs
  bitsandbytes and CUDA and is untested on CPU-only CI; a QLoRA adapter is merged into the
  full-precision base (`fastvlm lora merge`), never into the 4-bit weights.

`fastvlm lora merge` (fold an adapter into its base) is in merge.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, FastVLMError
from ..kernels import FastLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
QLORA_HINT = "QLoRA needs bitsandbytes and a CUDA GPU; use --lora on this machine"


@dataclass(slots=True)
class LoRAConfig:
    """What `adapter_config.json` records: enough to re-apply the adapter to its base."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    include_projector: bool = False
    include_vision: bool = False
    base_model: str | None = None  # folder or hub id the adapter was trained on
    modules: list[str] = field(default_factory=list)  # adapted module names

    def to_dict(self) -> dict:
        return {"format": "fastvlm-lora", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["targets"] = tuple(kw.get("targets", DEFAULT_TARGETS))
        return cls(**kw)


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ Aᵀ @ Bᵀ · alpha/r, with `base` frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise FastVLMError(f"LoRA rank must be >= 1, got r={r}")
        w = base.weight
        # Adapters train in fp32 when the base is quantized (QLoRA) or low precision.
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B @ A · scaling, (out, in), in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


# ---------------------------------------------------------------------- swap in / out
def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def select_linears(
    model: nn.Module,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    include_projector: bool = False,
    include_vision: bool = False,
) -> list[str]:
    """Names of the Linear layers `apply_lora` would adapt (see the module docstring)."""
    names = []
    for name, m in model.named_modules():
        if type(m) not in (nn.Linear, FastLinear):  # FastLinear: fastvlm.load's CPU swap
            continue
        if name.startswith("vision_tower."):
            ok = include_vision
        elif name.startswith("mm_projector."):
            ok = include_projector
        else:
            ok = name.rsplit(".", 1)[-1] in targets
        if ok:
            names.append(name)
    if "lm_head" in names and getattr(model.config.text, "tie_word_embeddings", False):
        raise FastVLMError(
            "lm_head shares its weight with the token embedding in this model (tied), so it "
            "cannot carry its own adapter; drop lm_head from --lora-targets"
        )
    return names


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    include_projector: bool = False,
    include_vision: bool = False,
    quantize: bool = False,
) -> list[str]:
    """Freeze `model` and swap the selected Linear layers for `LoRALinear`; returns their names."""
    if lora_layers(model):
        raise FastVLMError("this model already has LoRA layers; merge_lora() it first")
    names = select_linears(model, tuple(targets), include_projector, include_vision)
    if not names:
        plain = (nn.Linear, FastLinear)
        known = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) in plain})
        raise FastVLMError(
            f"no Linear layer matches the LoRA targets {list(targets)}; choose from {known}"
        )
    if quantize:
        require_qlora()
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        if quantize:
            base = _to_4bit(base)
        _set_module(model, name, LoRALinear(base, r, alpha, dropout))
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and swap plain `nn.Linear`s back (in place)."""
    for name, m in lora_layers(model).items():
        base = m.base
        if type(base) not in (nn.Linear, FastLinear):
            raise FastVLMError(
                f"{name}: cannot merge into a quantized (QLoRA) base layer; merge the adapter "
                "into the full-precision base: fastvlm lora merge BASE ADAPTER OUT"
            )
        merged = nn.Linear(
            base.in_features, base.out_features, bias=base.bias is not None,
            device=base.weight.device, dtype=base.weight.dtype,
        )  # fmt: skip
        merged.weight.copy_((base.weight.float() + m.delta_weight()).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        _set_module(model, name, merged)
    return model


# ---------------------------------------------------------------------- adapter files
def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{module}.lora_A` / `{module}.lora_B` tensors of every adapted layer."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def save_adapter(folder: str | Path, model: nn.Module, config: LoRAConfig) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not state:
        raise FastVLMError("this model has no LoRA layers to save")
    config.modules = list(lora_layers(model))
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return folder


def read_adapter_config(folder: str | Path) -> LoRAConfig:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG}: is it a LoRA adapter folder?")
    try:
        return LoRAConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Load an adapter into `model` (applying LoRA first if it has none); strict on keys/shapes."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    if not lora_layers(model):
        apply_lora(
            model, cfg.r, cfg.alpha, cfg.dropout, cfg.targets,
            cfg.include_projector, cfg.include_vision,
        )  # fmt: skip
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    params = {
        f"{n}.{p}": getattr(m, p)
        for n, m in lora_layers(model).items()
        for p in ("lora_A", "lora_B")
    }
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"adapter {folder} does not fit this model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} (was it trained on another base or with other --lora-targets?)"
        )
    with torch.no_grad():
        for k, p in params.items():
            t = tensors[k]
            if t.shape != p.shape:
                raise CheckpointError(
                    f"adapter tensor {k} has shape {tuple(t.shape)}, the model expects "
                    f"{tuple(p.shape)} (another base model?)"
                )
            p.copy_(t)
    return cfg


# ---------------------------------------------------------------------- QLoRA
def require_qlora() -> None:
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise FastVLMError(QLORA_HINT)


def _to_4bit(linear: nn.Linear) -> nn.Module:
    # Untested here (CI has neither CUDA nor bitsandbytes). NF4 weights with bf16 compute, as in
    # the QLoRA paper; Params4bit quantizes when the layer is moved to the GPU.
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=torch.bfloat16, quant_type="nf4",
    )  # fmt: skip
    q.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.cpu(), requires_grad=False)
    return q.to("cuda")
