"""Export wrappers: FastVLM split into three modules with plain tensor inputs and outputs.

Exporters (ONNX, Core ML, LiteRT) trace `forward(*tensors) -> tensors`; they cannot follow our
`KVCache` objects, keyword options or Python-side merging. So the model is cut where the
onnx-community FastVLM builds cut it, and the runtime glues the parts back together:

* `VisionEncoder`   pixel_values (N, 3, S, S) → image_embeds (N, tokens, D)   (tower + projector)
* `EmbedTokens`     input_ids (B, T) int64 → inputs_embeds (B, T, D)
* `DecoderStep`     inputs_embeds (B, T, D), attention_mask (B, P+T) int64, position_ids (B, T)
                    int64, past_key_values.{i}.key/value (B, kv, P, hd) → logits (B, T, V),
                    present.{i}.key/value (B, kv, P+T, hd)
* `StatefulDecoder` (Core ML) inputs_embeds (1, T, D) + causal_mask (1, 1, T, P+T) → logits; the
                    KV cache lives in two registered buffers that Core ML turns into model state.

Design decisions:
* The decoder is "merged" (one graph for prefill and decode, P = 0 on the first call) with a
  concatenating KV cache, the layout transformers.js and the onnx-community builds use. The
  causal + padding mask is built inside the graph from `attention_mask`, so callers pass only
  what HF callers pass.
* The wrappers reuse the model's own modules (`Qwen2Model.layers`, `lm_head`, `embed_images`)
  through the `KVCacheLike` seam. `export_friendly(model)` sets, for the duration of an export
  only, plain-op versions of the two fused ops the exporters cannot lower (`F.rms_norm`, SDPA
  with `enable_gqa`) through the model's own hooks (`RMSNorm.normalize`,
  `Qwen2Attention.attention`); the parity check at the end of every export compares against
  the unhooked model, so the plain ops cannot drift unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..model.fastvlm import FastVLMModel
from ..model.qwen2 import Qwen2Attention, RMSNorm, rope_cos_sin


def plain_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm from primitive ops (the TorchScript ONNX exporter has no `aten::rms_norm`)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def plain_attention(q, k, v, mask, *, rep: int) -> torch.Tensor:
    """Attention with GQA as an explicit K/V repeat (exporters reject `enable_gqa`); `rep` is
    bound per layer (a Python int, so traces stay static). Export wrappers always pass a mask."""
    assert mask is not None, "export wrappers build their own mask"
    if rep != 1:
        k = k.repeat_interleave(rep, dim=1)  # (B, heads, S, hd)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _plain_op_hooks(m: nn.Module) -> dict[str, Callable] | None:
    """The plain-op functions to set on one module, or None when it needs none."""
    if isinstance(m, RMSNorm):
        return {"normalize": plain_rms_norm}
    if isinstance(m, Qwen2Attention):
        return {"attention": partial(plain_attention, rep=m.heads // m.kv_heads)}
    return None


@contextmanager
def export_friendly(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily give the decoder's norms and attentions plain-op functions (set on the
    instances: same modules, same parameters, same forward); restored on exit."""
    hooked = []
    for m in model.modules():
        hooks = _plain_op_hooks(m)
        if hooks:
            saved = {name: m.__dict__[name] for name in hooks if name in m.__dict__}
            m.__dict__.update(hooks)
            hooked.append((m, hooks, saved))
    try:
        yield model
    finally:
        for m, hooks, saved in hooked:
            for name in hooks:
                m.__dict__.pop(name, None)
            m.__dict__.update(saved)


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    """ONNX input / output names of the KV cache, in the order `DecoderStep` takes them."""
    past, present = [], []
    for i in range(num_layers):
        for kind in ("key", "value"):
            past.append(f"past_key_values.{i}.{kind}")
            present.append(f"present.{i}.{kind}")
    return past, present


class VisionEncoder(nn.Module):
    """pixel_values (N, 3, S, S) float32 → image_embeds (N, tokens, D)."""

    def __init__(self, model: FastVLMModel) -> None:
        super().__init__()
        self.model = model
        self.eval()  # exporters restore the wrapper's mode recursively: never leave it training

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.embed_images(pixel_values)


class VisionEncoderWithFeatures(nn.Module):
    """pixel_values → (image_features (N, tokens, D), vision_features (N, tokens, C)): the ONNX
    vision graph also hands out the pre-projector grid, so a runtime can pool it for
    `tokens_per_image` exactly as `FastVLMModel.encode_images` does and then run `Projector`."""

    def __init__(self, model: FastVLMModel) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.encode_images(pixel_values)
        return self.model.mm_projector(feats), feats


class Projector(nn.Module):
    """vision_features (N, K, C) → image_features (N, K, D) (the `mlp2x_gelu` projector)."""

    def __init__(self, model: FastVLMModel) -> None:
        super().__init__()
        self.mm_projector = model.mm_projector
        self.eval()

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(vision_features)


class EmbedTokens(nn.Module):
    """input_ids (B, T) int64 → inputs_embeds (B, T, D). Image placeholder rows are replaced by
    the runtime, so their ids only need to be in range."""

    def __init__(self, model: FastVLMModel) -> None:
        super().__init__()
        self.embed_tokens = model.language_model.embed_tokens
        self.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class _ConcatCache:
    """KVCacheLike that appends the new K/V to the given past and records the results."""

    def __init__(self, past: list[torch.Tensor]) -> None:
        self.past = past
        self.present: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        k = torch.cat([self.past[2 * layer], k], dim=2)  # (B, kv, P+T, hd)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


def _run_layers(model: FastVLMModel, x, positions, mask, cache) -> torch.Tensor:
    lm = model.language_model
    cfg = lm.config
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    for layer in lm.layers:
        x = layer(x, cos, sin, positions, mask, cache)
    return model.lm_head(lm.norm(x))


class DecoderStep(nn.Module):
    """One merged decoder call: prefill (P = 0) or decode (T = 1) over a concatenating cache."""

    def __init__(self, model: FastVLMModel) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.text.num_hidden_layers
        self.eval()

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, T, D)
        attention_mask: torch.Tensor,  # (B, P+T) int64, 1 = real token
        position_ids: torch.Tensor,  # (B, T) int64
        *past: torch.Tensor,  # 2 × layers tensors (B, kv, P, hd)
    ) -> tuple[torch.Tensor, ...]:
        t = inputs_embeds.shape[1]
        total = attention_mask.shape[1]
        q_pos = torch.arange(t, device=inputs_embeds.device) + (total - t)  # (T,)
        k_pos = torch.arange(total, device=inputs_embeds.device)  # (P+T,)
        causal = k_pos[None, :] <= q_pos[:, None]  # (T, P+T)
        mask = causal[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, P+T)
        cache = _ConcatCache(list(past))
        logits = _run_layers(self.model, inputs_embeds, position_ids, mask, cache)
        return (logits, *cache.present)


class _StateCache:
    """KVCacheLike writing into (layers, 1, kv, max_len, hd) buffers at [P, P+T) in place."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor, end) -> None:
        self.k, self.v, self.start, self.end = k, v, start, end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        self.k[layer : layer + 1, :, :, self.start : self.end] = k[None]
        self.v[layer : layer + 1, :, :, self.start : self.end] = v[None]
        return self.k[layer, :, :, : self.end], self.v[layer, :, :, : self.end]


class StatefulDecoder(nn.Module):
    """Core ML decoder: the KV cache is model state (two buffers), batch 1.

    inputs_embeds (1, T, D) and causal_mask (1, 1, T, P+T) float (0 = attend, -inf = masked, as
    Apple's stateful Llama example); P = causal_mask.shape[-1] - T is the number of cached tokens.
    Output: logits (1, T, V).
    """

    def __init__(self, model: FastVLMModel, max_len: int) -> None:
        super().__init__()
        self.model = model
        cfg = model.config.text
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, max_len, cfg.head_dim)
        dtype = model.lm_head.weight.dtype
        self.register_buffer("key_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=dtype))
        self.eval()

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        t = inputs_embeds.shape[1]
        end = causal_mask.shape[-1]
        start = end - t
        positions = (torch.arange(t, device=inputs_embeds.device) + start)[None]  # (1, T)
        cache = _StateCache(self.key_cache, self.value_cache, start, end)
        return _run_layers(self.model, inputs_embeds, positions, causal_mask, cache)
