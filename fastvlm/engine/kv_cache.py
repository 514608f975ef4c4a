"""Static, pre-allocated KV cache.

One tensor pair per layer of shape (slots, kv_heads, max_len, head_dim), allocated once. Writes go
to explicit absolute positions, so nothing is allocated or concatenated while decoding. The
reference decoder uses slot 0..B-1 with equal lengths; the fast engine adds per-slot lengths on
top of the same storage.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # number of valid positions (uniform across slots in the reference path)

    @classmethod
    def for_model(cls, model, slots: int, max_len: int) -> KVCache:
        cfg = model.config.text
        p = next(model.parameters())
        return cls(
            cfg.num_hidden_layers,
            slots,
            max_len,
            cfg.num_key_value_heads,
            cfg.head_dim,
            p.dtype if p.is_floating_point() else torch.float32,
            p.device,
        )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv, T, hd) at `positions` (B, T); return keys/values up to the end."""
        b, t = positions.shape
        start = int(positions[0, 0]) if t else 0
        end = start + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > max_len {self.max_len}")
        self.k[layer][:b, :, start:end] = k
        self.v[layer][:b, :, start:end] = v
        if layer == len(self.k) - 1:
            self.length = end
        return self.k[layer][:b, :, :end], self.v[layer][:b, :, :end]

    def truncate(self, length: int) -> None:
        """Forget positions ≥ length (prefix reuse: keep a shared history, drop the rest)."""
        self.length = min(self.length, length)
