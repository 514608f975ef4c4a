"""A batch-1 token generator (`generate_step`, `ort_generate_step`) seen as a `Generation`.

Backends without a batching engine run one request at a time; wrapping their generator gives
callers the same object the engine returns: iterate for ids, read `stats` / `finish_reason`,
`cancel()` from any thread (checked between tokens: a generator cannot be closed from another
thread while it runs).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator

from ..engine.generate import Stats
from ..engine.sampling import SamplingParams


class StepGeneration:
    """`start(stats)` returns the token iterator; it runs lazily, on the consumer's thread."""

    def __init__(self, start: Callable[[Stats], Iterator[int]], eos: Container[int]) -> None:
        self.stats = Stats()
        self.finish_reason: str | None = None
        self._tokens = start(self.stats)
        self._eos = eos
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def __iter__(self) -> Iterator[int]:
        last = None
        try:
            for last in self._tokens:
                if last in self._eos:  # a consumer stops reading at EOS: say why first
                    self.finish_reason = "stop"
                yield last
                if self._cancelled:
                    self.finish_reason = "cancelled"
                    return
        except GeneratorExit:  # the consumer stopped reading
            self.finish_reason = self.finish_reason or "cancelled"
            raise
        except BaseException:
            self.finish_reason = "error"
            raise
        finally:
            if hasattr(self._tokens, "close"):
                self._tokens.close()
        if self.finish_reason is None:
            self.finish_reason = "stop" if last in self._eos else "length"


def step_generation(
    step_fn, model, ids, pixels, params: SamplingParams, *, eos_ids, vocab_limit,
    tokens_per_image,
) -> StepGeneration:  # fmt: skip
    """A batch-1 decoder (`generate_step`, `ort_generate_step`: same signature) over one
    request, as a `Generation`; EOS ends it unless `params.ignore_eos`."""
    return StepGeneration(
        lambda stats: step_fn(
            model, ids, pixels, params, eos_ids=eos_ids, vocab_limit=vocab_limit, stats=stats,
            tokens_per_image=tokens_per_image,
        ),
        set() if params.ignore_eos else set(eos_ids),
    )
