"""Timers that synchronise the device, peak memory, read bandwidth and the bytes one decode step
must read (the roofline: bandwidth ÷ bytes per token)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from . import rss


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


@contextmanager
def timer(out: dict, key: str, device: torch.device):
    t0 = now(device)
    yield
    out[key] = now(device) - t0


def peak_rss_mb() -> float:
    """Peak resident set in MB (the bench's probe buffers left out: see rss.py)."""
    return rss.peak_mb()


def measure_bandwidth(device: torch.device, mb: int = 512, repeats: int = 7) -> float:
    """Best-of-N read bandwidth (GB/s) of a reduction over `mb` MB (far beyond the caches)."""
    best = float("inf")
    with rss.probe_buffer(mb, device) as x:
        for _ in range(repeats):
            t0 = now(device)
            x.sum()
            best = min(best, now(device) - t0)
    return mb * 2**20 / best / 1e9


def decode_bytes_per_token(model, context: int) -> int:
    """Bytes one decode step reads: decoder + lm_head weights (as stored: quantized sizes count),
    one embedding row, and the KV cache of `context` tokens."""
    lm = model.language_model
    n = sum(t.numel() * t.element_size() for t in [*lm.layers.parameters(), *lm.layers.buffers()])
    n += sum(t.numel() * t.element_size() for t in lm.norm.parameters())
    head = model.lm_head
    n += sum(t.numel() * t.element_size() for t in [*head.parameters(), *head.buffers()])
    emb = lm.embed_tokens.weight
    n += emb.shape[1] * emb.element_size()
    cfg = model.config.text
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    kv = (
        2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * head_dim
        * context
        * emb.element_size()
    )
    return n + kv
