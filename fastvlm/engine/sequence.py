"""The engine's own per-request state (`Sequence`), separate from the client's `RequestHandle`.

The scheduler reads the fields that are plain Python (ids, keys, slot, pending token); the runner
reads the tensors (pixels, embeds, generator, seen ids). The handle never sees any of it: the
engine reports to it through `RequestHandle.admitted / deliver / close`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .request import RequestHandle
    from .sampling import SamplingParams

Key = int | tuple[str, int]  # a token id, or (image hash, row) for an image placeholder token


def token_keys(ids: list[int], image_token_id: int, hashes: list[str], tpi: int) -> list[Key]:
    """Prefix-matching keys: image placeholder i becomes (its image's hash, row), so two different
    images behind the same placeholder ids never share KV."""
    keys: list[Key] = list(ids)
    j = 0
    for i, x in enumerate(ids):
        if x == image_token_id:
            keys[i] = (hashes[j // tpi], j % tpi)
            j += 1
    return keys


@dataclass(eq=False)
class Sequence:
    id: int
    ids: list[int]
    params: SamplingParams
    handle: RequestHandle
    keys: list[Key] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)  # one content hash per image
    tpi: int = 0  # image tokens per image
    pixels: Any = None  # (N, 3, S, S) tensor, dropped once finished
    embeds: Any = None  # (N, tokens, D) precomputed image embeddings
    slot: int | None = None
    pending: int | None = None  # sampled, not yet fed to the model
    generated: int = 0
    cancelled: bool = False  # set from any thread; acted on at the next step
    gen: Any = None  # torch.Generator of a seeded request
    seen: Any = None  # (1, L) ids for the repetition penalty

    @property
    def greedy_fast(self) -> bool:
        """Sampled by the shared argmax (greedy, no repetition penalty)."""
        return self.params.greedy and self.seen is None

    def release_tensors(self) -> None:
        self.gen = self.seen = self.pixels = self.embeds = None
