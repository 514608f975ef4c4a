"""Structured pruning to a smaller *dense* model: decoder MLP channels, attention KV groups,
whole decoder layers and (optionally) projector channels are cut out of the weight matrices.

Design decisions:
* Surgery is state-dict slicing: the kept rows / columns of each tensor are copied into a model
  built from the smaller config, so the result is an ordinary `FastVLMModel` (real speed-up,
  no masks) and `mask_model` — zeroing exactly the removed weights in the unpruned model — is
  its numerical oracle (tests compare the two).
* Uniform ratios: every layer keeps the same number of channels / KV groups (each layer picks
  *which* by its own scores), so the config stays a standard Qwen2 one (`intermediate_size`,
  `num_attention_heads`, `num_key_value_heads`, `num_hidden_layers`, explicit `head_dim`) that
  this package, transformers' `fast_vlm` and the exporters read. GQA is respected by removing
  whole KV groups: a KV head together with the query heads that read it.
* Projector width has no field in the apple / hf formats: pruning it sets
  `mm_projector_hidden_size` (fastvlm format only; converting such a model is refused).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..model.fastvlm import FastVLMModel
from .importance import Scores


@dataclass(slots=True)
class Ratios:
    """Fractions to remove (0 = keep all)."""

    mlp: float = 0.0
    heads: float = 0.0
    layers: float = 0.0
    projector: float = 0.0
    multiple_of: int = 32  # kept MLP / projector channels rounded to this (int4 group sizes)

    def check(self) -> None:
        for name in ("mlp", "heads", "layers", "projector"):
            r = getattr(self, name)
            if not 0.0 <= r < 1.0:
                raise ConfigError(f"--{name}-ratio must be in [0, 1), got {r}")
        if self.multiple_of < 1:
            raise ConfigError(f"--multiple-of must be >= 1, got {self.multiple_of}")


@dataclass(slots=True)
class Keep:
    """Indices kept, per structure (sorted, so kept weights stay in their original order)."""

    mlp: list[torch.Tensor] = field(default_factory=list)  # per original layer
    kv: list[torch.Tensor] = field(default_factory=list)  # per original layer: kv heads kept
    layers: list[int] = field(default_factory=list)
    projector: torch.Tensor | None = None  # None = all


def kept_count(n: int, ratio: float, multiple_of: int = 1) -> int:
    """Channels left of `n` after removing `ratio`, rounded to `multiple_of` (at least one
    multiple, never more than n)."""
    k = n * (1.0 - ratio)
    if multiple_of > 1 and n >= multiple_of:
        k = max(multiple_of, round(k / multiple_of) * multiple_of)
    return max(1, min(n, int(round(k))))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores.float(), k).indices).values


def plan(model, scores: Scores, ratios: Ratios) -> Keep:
    """Which structures to keep for uniform `ratios`, from `scores` (higher = keep)."""
    ratios.check()
    t = model.config.text
    n_layers = t.num_hidden_layers
    k_mlp = kept_count(t.intermediate_size, ratios.mlp, ratios.multiple_of)
    k_kv = kept_count(t.num_key_value_heads, ratios.heads)
    k_layers = kept_count(n_layers, ratios.layers)
    keep = Keep(
        mlp=[_top(s, k_mlp) for s in scores.mlp],
        kv=[_top(s, k_kv) for s in scores.heads],
        layers=sorted(_top(scores.layers, k_layers).tolist()),
    )
    if ratios.projector:
        width = model.config.projector_hidden_size
        k_proj = kept_count(width, ratios.projector, ratios.multiple_of)
        keep.projector = _top(scores.projector, k_proj)
    return keep


def _query_rows(kv: torch.Tensor, rep: int, head_dim: int) -> torch.Tensor:
    """Row indices of q_proj (and columns of o_proj) of the query heads of KV groups `kv`."""
    heads = (kv[:, None] * rep + torch.arange(rep)).reshape(-1)
    return _head_rows(heads, head_dim)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


_LAYER = re.compile(r"^language_model\.layers\.(\d+)\.(.+)$")


def pruned_config(cfg, keep: Keep):
    new = copy.deepcopy(cfg)
    t = new.text
    t.head_dim = cfg.text.head_dim  # explicit: hidden / heads no longer gives it
    t.num_hidden_layers = len(keep.layers)
    t.intermediate_size = len(keep.mlp[keep.layers[0]])
    rep = cfg.text.num_attention_heads // cfg.text.num_key_value_heads
    t.num_key_value_heads = len(keep.kv[keep.layers[0]])
    t.num_attention_heads = t.num_key_value_heads * rep
    if keep.projector is not None:
        new.mm_projector_hidden_size = len(keep.projector)
    return new


def prune_state(state: dict[str, torch.Tensor], cfg, keep: Keep) -> dict[str, torch.Tensor]:
    """The unpruned model's state dict → the pruned one (new layer numbering)."""
    t = cfg.text
    rep, hd = t.num_attention_heads // t.num_key_value_heads, t.head_dim
    renumber = {old: new for new, old in enumerate(keep.layers)}
    out = {}
    for k, v in state.items():
        m = _LAYER.match(k)
        if m is None:
            out[k] = _prune_outer(k, v, keep)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i not in renumber:
            continue
        mlp, kv = keep.mlp[i], keep.kv[i]
        if rest.startswith("mlp.gate_proj.") or rest.startswith("mlp.up_proj."):
            v = v[mlp]
        elif rest == "mlp.down_proj.weight":
            v = v[:, mlp]
        elif rest.startswith("self_attn.q_proj."):
            v = v[_query_rows(kv, rep, hd)]
        elif rest.startswith("self_attn.k_proj.") or rest.startswith("self_attn.v_proj."):
            v = v[_head_rows(kv, hd)]
        elif rest == "self_attn.o_proj.weight":
            v = v[:, _query_rows(kv, rep, hd)]
        out[f"language_model.layers.{renumber[i]}.{rest}"] = v.clone()
    return out


def _prune_outer(key: str, v: torch.Tensor, keep: Keep) -> torch.Tensor:
    if keep.projector is not None:
        if key in ("mm_projector.0.weight", "mm_projector.0.bias"):
            return v[keep.projector].clone()
        if key == "mm_projector.2.weight":
            return v[:, keep.projector].clone()
    return v.clone()  # never alias the source model's storage (training one must not move both)


def _check_unquantized(model) -> None:
    if getattr(model.config, "quantization", None):
        raise ConfigError("prune the float model, then quantize the pruned one")


def prune_model(model, keep: Keep) -> FastVLMModel:
    """A new, smaller dense model holding the kept weights (the input model is not changed)."""
    _check_unquantized(model)
    cfg = pruned_config(model.config, keep)
    state = prune_state(model.state_dict(), model.config, keep)
    with torch.device("meta"):
        new = FastVLMModel(cfg)
    if cfg.text.tie_word_embeddings:
        state["lm_head.weight"] = state["language_model.embed_tokens.weight"]
    new.load_state_dict(state, strict=True, assign=True)
    new.tie_weights()
    new.source_dtype = getattr(model, "source_dtype", None)
    return new.train(model.training)


@torch.no_grad()
def mask_model(model, keep: Keep) -> None:
    """Zero, in place, exactly the weights `prune_model` removes (the oracle for its surgery):
    removed MLP channels and KV groups contribute zero, removed layers add nothing to the
    residual stream, removed projector channels feed nothing forward."""
    _check_unquantized(model)
    t = model.config.text
    rep, hd = t.num_attention_heads // t.num_key_value_heads, t.head_dim
    for i, layer in enumerate(model.language_model.layers):
        m, a = layer.mlp, layer.self_attn
        if i not in keep.layers:
            a.o_proj.weight.zero_()
            m.down_proj.weight.zero_()
            continue
        drop = _complement(keep.mlp[i], t.intermediate_size)
        m.gate_proj.weight[drop] = 0
        m.up_proj.weight[drop] = 0
        m.down_proj.weight[:, drop] = 0
        kv_drop = _complement(keep.kv[i], t.num_key_value_heads)
        q_rows, kv_rows = _query_rows(kv_drop, rep, hd), _head_rows(kv_drop, hd)
        for proj, rows in ((a.q_proj, q_rows), (a.k_proj, kv_rows), (a.v_proj, kv_rows)):
            proj.weight[rows] = 0
            if proj.bias is not None:
                proj.bias[rows] = 0
        a.o_proj.weight[:, q_rows] = 0
    if keep.projector is not None:
        drop = _complement(keep.projector, model.config.projector_hidden_size)
        model.mm_projector[0].weight[drop] = 0
        model.mm_projector[0].bias[drop] = 0
        model.mm_projector[2].weight[:, drop] = 0


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def parameter_count(model, part: str = "all") -> int:
    """Parameters of the model (tied weights once), or of `llm` (decoder + head) only."""
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if part == "llm" and not (name.startswith("language_model.") or name == "lm_head.weight"):
            continue
        n += p.numel()
    return n
