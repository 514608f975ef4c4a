"""One admitted request's bookkeeping: its concurrency `Ticket` and the `Run` that generates it
in a worker thread.

Design decision: generation is blocking torch code, so each request iterates
`vlm.stream_chunks` in its own thread and hands chunks to the event loop through an
`asyncio.Queue` (`loop.call_soon_threadsafe`). Cancelling sets an event the worker checks after
every chunk; the worker then closes the generator, which frees the engine slot.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .protocol import now


@dataclass(slots=True)
class Job:
    """A validated request, ready to generate."""

    id: str
    messages: list[dict]
    sampling: dict[str, Any]
    stream: bool
    include_usage: bool
    vision: dict[str, Any] = field(default_factory=dict)  # stream_chunks options (images, text)
    created: int = field(default_factory=now)
    t0: float = field(default_factory=time.perf_counter)


class Ticket:
    """One admitted request's concurrency slot; `release()` is idempotent (calls `on_release`
    once: the service gives the slot back)."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        if self._on_release is not None:
            self._on_release()
            self._on_release = None


class Run:
    """One generation in a worker thread; `get()` yields ("chunk", Chunk) / ("error", exc) /
    ("done", None) on the event loop. `gen_lock`: held around the generation when the backend
    cannot batch concurrent requests (None: run at once)."""

    def __init__(self, vlm, gen_lock: threading.Lock | None, job: Job, ticket: Ticket) -> None:
        self.loop = asyncio.get_running_loop()
        self.ticket = ticket
        self.first_seen = False
        self.finished = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel_event = threading.Event()
        self.vlm = vlm
        self.gen_lock = gen_lock
        self.job = job
        self.thread = threading.Thread(target=self._work, name=f"gen-{job.id}", daemon=True)
        self.thread.start()

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # loop closed during shutdown: nobody is listening any more
            self.cancel_event.set()

    def _work(self) -> None:
        lock = self.gen_lock
        try:
            if lock is not None:
                lock.acquire()
            try:
                if self.cancel_event.is_set():
                    return
                gen = self.vlm.stream_chunks(
                    self.job.messages, **self.job.vision, **self.job.sampling
                )
                try:
                    for chunk in gen:
                        self._put(("chunk", chunk))
                        if self.cancel_event.is_set():
                            break
                finally:
                    gen.close()  # frees the engine slot when we stop early
            finally:
                if lock is not None:
                    lock.release()
        except BaseException as e:  # noqa: BLE001 - handed to the event loop, never lost
            self._put(("error", e))
        finally:
            self._put(("done", None))

    async def get(self) -> tuple[str, Any]:
        return await self.queue.get()

    def cancel(self) -> None:
        self.cancel_event.set()
