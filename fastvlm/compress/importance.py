"""Importance scores for the structures `prune.py` can remove: decoder MLP channels, attention
KV groups (a KV head with the query heads that read it), whole decoder layers, projector channels.

Three estimators, one `Scores` result (higher = keep):
* `magnitude`  — weights only, no data: the norms of the weights a structure reads and writes.
* `activation` — Wanda-style: mean |activation| of a structure on calibration batches times the
                 norm of the weights that write its output into the residual stream; layers by
                 block influence (1 − cosine between a layer's input and output residual).
* `gradient`   — first-order Taylor: |Σ w·∂L/∂w| over a structure's weights, the loss change
                 predicted for zeroing it, with the training loss on calibration batches.

Design decision: a score is per structure of the *unpruned* model, so uniform ratios become a
top-k per layer (same count in every layer → a standard config) in prune.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..train.data import IGNORE

METHODS = ("magnitude", "activation", "gradient")


@dataclass(slots=True)
class Scores:
    mlp: list[torch.Tensor]  # per layer: (intermediate,)
    heads: list[torch.Tensor]  # per layer: (kv_heads,)
    layers: torch.Tensor  # (L,)
    projector: torch.Tensor  # (projector hidden,)


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().norm(dim=1)


def _cols(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().norm(dim=0)


def _frob(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().norm()


def _group_sum(per_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(heads,) or (kv_heads,) per-head values → (kv_heads,) sums per KV group."""
    return per_head.reshape(kv_heads, -1).sum(dim=1)


def _head_norms(w: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Frobenius norm of each head's block of a projection (rows for dim 0, columns for 1)."""
    w = w.detach().float()
    blocks = w.reshape(n, -1, w.shape[1]) if dim == 0 else w.t().reshape(n, -1, w.shape[0])
    return blocks.flatten(1).norm(dim=1)


def magnitude_scores(model) -> Scores:
    t = model.config.text
    mlp, heads, layers = [], [], []
    for layer in model.language_model.layers:
        m, a = layer.mlp, layer.self_attn
        mlp.append(_rows(m.gate_proj.weight) * _rows(m.up_proj.weight) * _cols(m.down_proj.weight))
        q = _head_norms(a.q_proj.weight, t.num_attention_heads, 0)
        o = _head_norms(a.o_proj.weight, t.num_attention_heads, 1)
        k = _head_norms(a.k_proj.weight, t.num_key_value_heads, 0)
        v = _head_norms(a.v_proj.weight, t.num_key_value_heads, 0)
        heads.append(_group_sum(q * o, t.num_key_value_heads) + k * v)
        # what a layer can write into the residual stream
        layers.append(_frob(a.o_proj.weight) + _frob(m.down_proj.weight))
    p0, p2 = model.mm_projector[0], model.mm_projector[2]
    return Scores(mlp, heads, torch.stack(layers), _rows(p0.weight) * _cols(p2.weight))


def _forward_batches(model, batches: Iterable[dict], device) -> Iterable[torch.Tensor]:
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        yield model(b["input_ids"], b.get("pixel_values")), b["labels"]


@torch.no_grad()
def activation_scores(model, batches: Iterable[dict]) -> Scores:
    t = model.config.text
    device = model.lm_head.weight.device
    n_layers = len(model.language_model.layers)
    mlp_act = [0.0] * n_layers
    head_act = [0.0] * n_layers
    influence = torch.zeros(n_layers)
    proj_act = 0.0
    count = {"tok": 0, "img": 0}
    hooks = []

    def mlp_hook(i):
        def f(mod, inp):
            mlp_act[i] = mlp_act[i] + inp[0].detach().float().abs().flatten(0, -2).sum(0)

        return f

    def head_hook(i):
        def f(mod, inp):
            x = inp[0].detach().float().flatten(0, -2)  # (tokens, heads*hd)
            per = x.reshape(x.shape[0], t.num_attention_heads, -1).norm(dim=-1).sum(0)
            head_act[i] = head_act[i] + per

        return f

    def layer_hook(i):
        def f(mod, args, out):
            x_in, x_out = args[0].detach().float(), out.detach().float()
            cos = F.cosine_similarity(x_in, x_out, dim=-1)  # (B, T)
            influence[i] += (1 - cos).sum().cpu()

        return f

    def proj_hook(mod, inp):
        nonlocal proj_act
        proj_act = proj_act + inp[0].detach().float().abs().flatten(0, -2).sum(0)
        count["img"] += inp[0].shape[:-1].numel()

    for i, layer in enumerate(model.language_model.layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        hooks.append(layer.register_forward_hook(layer_hook(i)))
    hooks.append(model.mm_projector[2].register_forward_pre_hook(proj_hook))
    was_training = model.training
    model.eval()
    try:
        for _logits, labels in _forward_batches(model, batches, device):
            count["tok"] += labels.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not count["tok"]:
        raise ValueError("activation importance needs at least one calibration batch")
    mlp, heads = [], []
    for i, layer in enumerate(model.language_model.layers):
        mlp.append(mlp_act[i].cpu() / count["tok"] * _cols(layer.mlp.down_proj.weight).cpu())
        o = _head_norms(layer.self_attn.o_proj.weight, t.num_attention_heads, 1).cpu()
        heads.append(_group_sum(head_act[i].cpu() / count["tok"] * o, t.num_key_value_heads))
    p2 = model.mm_projector[2]
    proj = (proj_act.cpu() / max(1, count["img"])) * _cols(p2.weight).cpu()
    return Scores(mlp, heads, influence / count["tok"], proj)


def gradient_scores(model, batches: Iterable[dict]) -> Scores:
    """|Σ w·g| per structure, g accumulated over the batches (training loss, labelled tokens)."""
    t = model.config.text
    device = model.lm_head.weight.device
    params = {n: p for n, p in model.named_parameters()}
    saved = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    was_training = model.training
    model.eval()  # no dropout / BN updates: scores of the model as it is
    n = 0
    try:
        for logits, labels in _forward_batches(model, batches, device):
            sl, lb = logits[:, :-1].float(), labels[:, 1:]
            loss = F.cross_entropy(
                sl.reshape(-1, sl.shape[-1]), lb.reshape(-1), ignore_index=IGNORE
            )
            loss.backward()
            n += 1
        if not n:
            raise ValueError("gradient importance needs at least one calibration batch")

        def wg(mod) -> torch.Tensor:  # (out, in) elementwise w·g of a Linear
            return (mod.weight.detach().float() * mod.weight.grad.float()).cpu()

        def wg_bias(mod) -> torch.Tensor:
            b = mod.bias
            if b is None:
                return torch.zeros(mod.out_features)
            return (b.detach() * b.grad).float().cpu()

        mlp, heads, layers = [], [], []
        for layer in model.language_model.layers:
            m, a = layer.mlp, layer.self_attn
            ch = wg(m.gate_proj).sum(1) + wg(m.up_proj).sum(1) + wg(m.down_proj).sum(0)
            mlp.append(ch.abs())
            hq, hk = t.num_attention_heads, t.num_key_value_heads
            q = (wg(a.q_proj).sum(1) + wg_bias(a.q_proj)).reshape(hq, -1).sum(1)
            o = wg(a.o_proj).sum(0).reshape(hq, -1).sum(1)
            k = (wg(a.k_proj).sum(1) + wg_bias(a.k_proj)).reshape(hk, -1).sum(1)
            v = (wg(a.v_proj).sum(1) + wg_bias(a.v_proj)).reshape(hk, -1).sum(1)
            heads.append((_group_sum(q + o, hk) + k + v).abs())
            total = sum(
                (p.detach().float() * p.grad.float()).sum()
                for p in layer.parameters()
                if p.grad is not None
            )
            layers.append(torch.as_tensor(total).abs().cpu())
        p0, p2 = model.mm_projector[0], model.mm_projector[2]
        proj = (wg(p0).sum(1) + wg_bias(p0) + wg(p2).sum(0)).abs()
        return Scores(mlp, heads, torch.stack(layers), proj)
    finally:
        for name, p in params.items():
            p.grad = None
            p.requires_grad_(saved[name])
        model.train(was_training)


def compute_scores(model, method: str, batches: Iterable[dict] | None = None) -> Scores:
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}: use one of {METHODS}")
    if method == "magnitude":
        return magnitude_scores(model)
    if batches is None:
        raise ValueError(f"{method} importance needs calibration batches")
    if method == "activation":
        return activation_scores(model, batches)
    return gradient_scores(model, batches)
