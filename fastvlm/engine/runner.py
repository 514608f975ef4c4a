"""The model side of the engine: image embeddings (through the vision cache), prefill, the batched
decode forward and sampling.

Design decisions:
* Prefill runs one request alone (batch 1) into its slot; decode runs one forward over the slot
  window of a `DecodeBatch` with per-row positions and a (B, 1, 1, S) key mask, so the cache is
  never gathered or copied. Decode ids are never image placeholders (masked at sampling), so the
  decode forward skips `model.embed` and its host sync.
* One decode strategy, chosen once at construction (`DecodeRunner` subclasses): eager torch,
  `torch.compile`, CUDA graphs (cudagraphs.py) or the fused CPU step (kernels/fused.py).
* Sampling per request: rows that are greedy without repetition penalty share one argmax; other
  rows call `sample` with their own params, seeded generator and seen-token tensor — the same
  calls as the reference `generate_step`, so seeded outputs match it. No host sync here.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import torch

from ..kernels import available as kernels_available
from ..kernels.fused import DecodePlan
from .cudagraphs import GraphedDecode
from .kv_cache import SlotKVCache
from .sampling import SamplingParams, make_generator, sample
from .scheduler import DecodeBatch
from .sequence import Sequence

_GREEDY = SamplingParams()


def content_hash(t: torch.Tensor) -> str:
    """sha256 over shape, dtype and raw bytes (bf16 included: hashed as uint8)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class VisionCache:
    """LRU of projected image embeddings (tokens, D), keyed by `content_hash` of one image."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        e = self._d.get(key)
        if e is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return e

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


# ---------------------------------------------------------------------- decode strategies
class DecodeRunner:
    """Eager torch: the language model over the window's cache view, then the LM head."""

    name = "eager"
    graphs: GraphedDecode | None = None
    plan: DecodePlan | None = None

    def __init__(self, model, cache: SlotKVCache) -> None:
        self.model, self.cache = model, cache

    def __call__(self, tokens, positions, mask, lo: int, hi: int) -> torch.Tensor:
        return self.forward(tokens, positions, mask, lo, hi)

    def forward(self, tokens, positions, mask, lo: int, hi: int) -> torch.Tensor:
        lm = self.model.language_model
        view = self.cache.window(lo, hi, mask.shape[-1])
        h = lm(lm.embed_tokens(tokens), positions, mask, view)  # (B, 1, D)
        return self.model.lm_head(h[:, -1])

    def invalidate(self) -> None:
        """A request was admitted: weights may have changed since the last one."""


class CompiledDecode(DecodeRunner):
    name = "compile"

    def __init__(self, model, cache: SlotKVCache) -> None:
        super().__init__(model, cache)
        self._compiled = torch.compile(self.forward, dynamic=True)

    def __call__(self, tokens, positions, mask, lo: int, hi: int) -> torch.Tensor:
        return self._compiled(tokens, positions, mask, lo, hi)


class CudaGraphDecode(DecodeRunner):
    name = "cuda_graphs"

    def __init__(self, model, cache: SlotKVCache, device: torch.device) -> None:
        super().__init__(model, cache)
        self.graphs = GraphedDecode(self.forward, device)

    def __call__(self, tokens, positions, mask, lo: int, hi: int) -> torch.Tensor:
        return self.graphs(tokens, positions, mask, lo, hi)


class FusedDecode(DecodeRunner):
    """Every decoder layer in one C call (kernels/fused.py) when the model allows it, else eager.

    The plan is checked against the model (module identities, weight storages and versions) when
    a request was admitted since the last check, not on every step: weights changed while
    requests are in flight are not picked up by those requests (they hold their own pointers)."""

    name = "fused"

    def __init__(self, model, cache: SlotKVCache) -> None:
        super().__init__(model, cache)
        self._checked = False

    def invalidate(self) -> None:
        self._checked = False

    def __call__(self, tokens, positions, mask, lo: int, hi: int) -> torch.Tensor:
        if not kernels_available():
            self.plan = None
        elif not self._checked:
            self.plan = DecodePlan.current(self.plan, self.model.language_model, self.cache)
            self._checked = True
        if self.plan is None:
            return self.forward(tokens, positions, mask, lo, hi)
        # embedding, layers and final norm in the one C call; (B, 1) -> (B,) are views
        limits = mask.reshape(mask.shape[0], -1).sum(-1) - 1  # mask = arange(S) <= limit
        x = self.plan.step(tokens.view(-1), lo, positions.view(-1), limits)
        return self.model.lm_head(x)


def decode_runner(
    model, cache: SlotKVCache, device: torch.device, *, compile: bool, cuda_graphs: bool | None,
    fused: bool,
) -> DecodeRunner:  # fmt: skip
    """The one decode strategy for this engine's device and options."""
    if compile:
        return CompiledDecode(model, cache)
    if device.type == "cuda" and cuda_graphs is not False:
        return CudaGraphDecode(model, cache, device)
    if fused:
        return FusedDecode(model, cache)
    return DecodeRunner(model, cache)


# ---------------------------------------------------------------------- the runner
class ModelRunner:
    def __init__(
        self,
        model,
        cache: SlotKVCache,
        decode: DecodeRunner,
        *,
        vision_cache_size: int,
        span_bucket: int,
        vocab_limit: int | None,
        counters: dict[str, int],
    ) -> None:
        self.model, self.cache, self.decoder = model, cache, decode
        self.device = model.lm_head.weight.device
        self.max_len = cache.max_len
        self.span_bucket, self.vocab_limit = span_bucket, vocab_limit
        self.image_token_id = model.config.image_token_id
        self.vision_cache = VisionCache(vision_cache_size)
        self.counters = counters

    def reset_vision_cache(self) -> None:
        self.vision_cache = VisionCache(self.vision_cache.capacity)

    # ------------------------------------------------------------------ prefill
    def image_embeds(self, seq: Sequence, first: int) -> tuple[torch.Tensor | None, float]:
        """(Embeddings (n, tokens, D) of images `first:`, seconds in the encoder); pixels go
        through the vision cache."""
        if first >= len(seq.hashes):
            return None, 0.0
        if seq.embeds is not None:
            return seq.embeds[first:].to(self.device), 0.0
        t0 = time.perf_counter()
        hashes = seq.hashes[first:]
        found = {h: e for h in set(hashes) if (e := self.vision_cache.get(h)) is not None}
        todo = [i for i, h in enumerate(hashes, first) if h not in found]
        todo = list({seq.hashes[i]: i for i in todo}.values())  # one encode per distinct image
        if todo:
            px = seq.pixels[todo].to(self.device)
            self.counters["vision_calls"] += 1
            pooled = seq.tpi != self.model.config.num_image_tokens
            embeds = self.model.embed_images(px, seq.tpi) if pooled else self.model.embed_images(px)
            for i, e in zip(todo, embeds, strict=True):
                found[seq.hashes[i]] = e
                self.vision_cache.put(seq.hashes[i], e)
        return torch.stack([found[h] for h in hashes]), time.perf_counter() - t0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.cache.copy_prefix(src, dst, n)

    def prefill(
        self, seq: Sequence, slot: int, reuse: int, embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Run prompt tokens [reuse:) into `slot`; the last position's logits (1, V)."""
        ids = seq.ids
        self.decoder.invalidate()
        new = torch.tensor([ids[reuse:]], dtype=torch.long, device=self.device)
        pos = torch.arange(reuse, len(ids), device=self.device)[None]
        view = self.cache.prefill_view(slot, reuse)
        logits = self.model(new, image_embeds=embeds, positions=pos, cache=view, last_only=True)
        seq.gen = make_generator(seq.params.seed, self.device)
        if seq.params.repetition_penalty != 1:
            seq.seen = torch.tensor([ids], dtype=torch.long, device=self.device)
        return logits[:, -1]

    # ------------------------------------------------------------------ decode + sample
    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """Logits (len(batch.seqs), V) of the decoding rows of the window."""
        b = self.span_bucket
        span = min(self.max_len, (max(batch.limits) + b) // b * b)  # ≥ max + 1, fewer shapes
        dev = self.device
        tokens = torch.tensor(batch.tokens, dtype=torch.long, device=dev)[:, None]  # (B, 1)
        positions = torch.tensor(batch.positions, dtype=torch.long, device=dev)[:, None]
        limit = torch.tensor(batch.limits, dtype=torch.long, device=dev)[:, None]
        mask = (torch.arange(span, device=dev)[None] <= limit)[:, None, None]  # (B, 1, 1, S)
        logits = self.decoder(tokens, positions, mask, batch.lo, batch.hi)  # (B, V)
        if batch.holes:
            logits = logits[torch.tensor(batch.rows, device=dev)]
        return logits

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Next token per row (N,), on the device; no host sync."""
        if self.image_token_id < logits.shape[-1]:  # a placeholder would demand an image next
            logits[:, self.image_token_id] = float("-inf")
        fast = [i for i, s in enumerate(seqs) if s.greedy_fast]
        if len(fast) == len(seqs):
            return sample(logits, _GREEDY, None, None, self.vocab_limit)
        out = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if fast:
            idx = torch.tensor(fast, device=logits.device)
            out[idx] = sample(logits[idx], _GREEDY, None, None, self.vocab_limit)
        for i, s in enumerate(seqs):
            if not s.greedy_fast:
                out[i : i + 1] = sample(
                    logits[i : i + 1], s.params, s.gen, s.seen, self.vocab_limit
                )
        return out

    @staticmethod
    def remember(seq: Sequence, tok_t: torch.Tensor) -> None:
        """Append a sampled token (a (1,) device tensor) to the repetition-penalty history."""
        if seq.seen is not None:
            seq.seen = torch.cat([seq.seen, tok_t.view(1, 1)], dim=1)
