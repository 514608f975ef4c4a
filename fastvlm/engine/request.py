"""The client side of an engine request: a handle to iterate, cancel and read stats from, and
`stream_text`, the text layer on top of it.

Design decisions:
* A handle is a thread-safe queue of token ids filled by the engine step. Iterating it never
  needs a background thread: when the engine is not `start()`ed, the consumer runs
  `engine.step()` itself (steps are serialized by the engine's lock), so scripts, tests and
  several consumer threads all work without extra setup.
* Stop strings live here, above the engine: `stream_text` runs `generate.text_chunks` — the same
  detokenizer / EOS / stop-string code as the reference `stream_generate` — and cancels the
  request on a hit (or when the consumer goes away) so its slot frees at once.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Protocol

from .generate import Chunk, Stats, text_chunks
from .sampling import SamplingParams

_DONE = object()


class Driver(Protocol):
    """What a handle needs from the engine that serves it (the engine satisfies this)."""

    eos_ids: set[int]

    @property
    def running(self) -> bool: ...

    def step(self) -> int: ...

    def has_work(self) -> bool: ...

    def cancel(self, rid: int) -> None: ...


class RequestHandle:
    """One submitted request. Iterate it for generated token ids (EOS included, as
    `generate_step`); afterwards `finish_reason` is "stop" | "length" | "cancelled" | "error".
    A handle is meant for one consumer; `cancel()` may be called from any thread.

    The engine reports to it through `admitted`, `deliver` and `close` only; its own state per
    request lives in `sequence.Sequence`."""

    def __init__(
        self,
        driver: Driver,
        rid: int,
        ids: list[int],
        params: SamplingParams,
        image_tokens: int = 0,
    ) -> None:
        self.id = rid
        self.input_ids = ids
        self.params = params
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stats = Stats(prompt_tokens=len(ids), image_tokens=image_tokens)
        self.cached_tokens = 0  # prompt tokens whose KV was reused from a parked slot
        self.prefill_tokens = 0  # prompt tokens actually run through the model
        self._engine = driver
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._submitted = time.perf_counter()
        self._t_first = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step. No-op once finished."""
        self._engine.cancel(self.id)

    # ------------------------------------------------------------------ engine -> client
    def admitted(self, cached: int, prefilled: int, vision_s: float) -> None:
        """The prompt went into a slot: `cached` tokens reused, `prefilled` run."""
        self.cached_tokens, self.prefill_tokens = cached, prefilled
        self.stats.vision_s += vision_s

    def deliver(self, tok: int, now: float) -> None:
        """One generated token, sampled at `now` (perf_counter)."""
        self.output_ids.append(tok)
        self._q.put(tok)
        n = len(self.output_ids)
        if n == 1:
            self._t_first = now
            self.stats.prefill_s = now - self._submitted  # time to first token, queueing included
        self.stats.generation_tokens = n
        self.stats.decode_s = now - self._t_first

    def close(self, reason: str, exc: BaseException | None = None) -> None:
        """Finished: no more tokens; `exc` is raised to the consumer after the tokens so far."""
        self.finish_reason = reason
        if exc is not None:
            self._q.put(exc)
        self._q.put(_DONE)

    # ------------------------------------------------------------------ consumer
    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._next()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self) -> list[int]:
        """Block until finished; all generated ids."""
        for _ in self:
            pass
        return list(self.output_ids)

    def _next(self):
        while True:
            try:
                return self._q.get_nowait()
            except queue.Empty:
                pass
            if self._engine.running:
                try:
                    return self._q.get(timeout=0.05)
                except queue.Empty:
                    continue
            if self._engine.step() == 0 and self._q.empty() and not self._engine.has_work():
                raise RuntimeError(f"request {self.id} is pending but the engine has no work")


def stream_text(handle: RequestHandle, tokenizer) -> Iterator[Chunk]:
    """Text-delta `Chunk`s for a handle, with the reference's EOS and stop-string rules; a stop
    string (or the consumer going away) cancels the request so its slot frees at once."""
    eos = set() if handle.params.ignore_eos else handle._engine.eos_ids
    try:
        yield from text_chunks(
            handle,
            tokenizer,
            handle.params.stop,
            eos,
            handle.stats,
            end_reason=lambda: handle.finish_reason or "length",
        )
    finally:
        handle.cancel()
