"""Static, pre-allocated KV cache.

One tensor pair per layer of shape (slots, kv_heads, max_len, head_dim), allocated once. Writes go
to explicit absolute positions, so nothing is allocated or concatenated while decoding. The
reference decoder uses slot 0..B-1 with equal lengths; the fast engine tracks per-slot lengths
itself (engine/scheduler.py) over the same storage (`SlotKVCache`).

The engine's cache views are plain writers: `prefill_view` writes one slot's chunk at
[start, start+T), `window` writes one new K/V per row of the slot window [lo, hi) at that row's
own position and returns the window's keys up to `span` without gathering or copying — the
caller's (B, 1, 1, span) mask hides every key past a row's valid length.
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
        p = model.lm_head.weight  # the decoder's dtype (the vision tower may run in another)
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


class SlotKVCache(KVCache):
    """The static cache seen per slot; which positions of a slot are valid is the engine
    scheduler's bookkeeping (`Scheduler.lengths`), not the cache's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slots = self.k[0].shape[0]

    def prefill_view(self, slot: int, start: int) -> _SlotPrefill:
        return _SlotPrefill(self, slot, start)

    def window(self, lo: int, hi: int, span: int) -> _SlotWindow:
        return _SlotWindow(self, lo, hi, span)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy positions [0, n) of slot `src` into slot `dst` (shared-prefix reuse)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]


class _SlotPrefill:
    """Batch-1 view of one slot: write a (1, kv, T, hd) chunk at [start, start+T)."""

    def __init__(self, cache: SlotKVCache, slot: int, start: int) -> None:
        self.cache, self.slot, self.start = cache, slot, start

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + k.shape[2]
        if end > self.cache.max_len:
            raise ValueError(f"KV cache overflow: {end} > max_len {self.cache.max_len}")
        s = self.slot
        self.cache.k[layer][s, :, self.start : end] = k[0]
        self.cache.v[layer][s, :, self.start : end] = v[0]
        return self.cache.k[layer][s : s + 1, :, :end], self.cache.v[layer][s : s + 1, :, :end]


class _SlotWindow:
    """Decode view of slots [lo, hi): row i writes its one new K/V at `positions[i, 0]`."""

    def __init__(self, cache: SlotKVCache, lo: int, hi: int, span: int) -> None:
        self.cache, self.lo, self.hi, self.span = cache, lo, hi, span
        self.rows = torch.arange(hi - lo, device=cache.k[0].device)  # once per step, not layer

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kc = self.cache.k[layer][self.lo : self.hi]  # (B, kv, max_len, hd), a view
        vc = self.cache.v[layer][self.lo : self.hi]
        pos = positions[:, 0]
        kc[self.rows, :, pos] = k[:, :, 0]  # advanced indices on dims 0 and 2 → (B, kv, hd)
        vc[self.rows, :, pos] = v[:, :, 0]
        return kc[:, :, : self.span], vc[:, :, : self.span]
