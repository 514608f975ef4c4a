"""Qwen2 decoder in plain PyTorch: RMSNorm, rotate-half RoPE, GQA attention with q/k/v bias,
SwiGLU MLP. Parameter names are transformers' Qwen2 names, so weights load by prefix.

Design decisions:
* The model never owns a cache. Attention reads and writes an external `KVCache` (static,
  pre-allocated; see engine/kv_cache.py) at explicit `positions`, so prefill, decode, batching and
  prefix reuse are all the caller's business and the model has no hidden state.
* RoPE cos/sin are computed from the positions in fp32 each call (cheap: T × head_dim) instead of
  a registered buffer, so meta-device init and dtype casts need no special cases.
* The two fused ops (`F.rms_norm`, SDPA with GQA) sit behind swappable functions
  (`RMSNorm.normalize`, `Qwen2Attention.attention`): an exporter that cannot lower them sets a
  plain-op function on the instances (export/wrappers.py) instead of copying a `forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


class KVCacheLike(Protocol):
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def fused_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim in one fused op (x is fp32)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def sdpa_attention(
    q: torch.Tensor,  # (B, heads, T, hd)
    k: torch.Tensor,  # (B, kv, S, hd)
    v: torch.Tensor,  # (B, kv, S, hd)
    mask: torch.Tensor | None,  # (B, 1, T, S) bool, True = attend; None = causal
) -> torch.Tensor:
    """Attention output (B, heads, T, hd); GQA inside SDPA: no repeat_interleave copy of the
    whole K/V window per layer and step."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        t, s = q.shape[2], k.shape[2]
        if t > 1 and s > t:  # chunk after cached history: bottom-right aligned causal mask
            qpos = torch.arange(s - t, s, device=q.device)
            mask = torch.arange(s, device=q.device)[None, :] <= qpos[:, None]
        else:
            return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


NormFn = Callable[[torch.Tensor, float], torch.Tensor]
AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor
]


class RMSNorm(nn.Module):
    normalize: NormFn = staticmethod(fused_rms_norm)  # swappable per instance (see docstring)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = self.normalize(x.float(), self.eps)  # fp32 math
        return self.weight * h.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) → cos, sin (B, 1, T, head_dim), computed in fp32 then cast."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Qwen2Attention(nn.Module):
    attention: AttentionFn = staticmethod(sdpa_attention)  # swappable per instance

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        h, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H)
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,  # (B, T)
        mask: torch.Tensor | None,  # (B, 1, T, S) bool, True = attend; None = causal
        cache: KVCacheLike | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin  # (B, heads, T, hd)
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, positions)  # (B, kv, S, hd)
        out = self.attention(q, k, v, mask)  # (B, heads, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, layer_idx)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, positions, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embedding + decoder layers + final norm (no LM head: the VLM owns it)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, T, H)
        positions: torch.Tensor,  # (B, T) absolute positions
        mask: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, positions, mask, None, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, positions, mask, cache)
        return self.norm(x)
