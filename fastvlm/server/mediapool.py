"""The server's worker pool for request media (download + decode), apart from asyncio's default
thread pool, so that requests without media never wait behind slow downloads.

Design decisions:
* Own threads (`MediaPolicy.media_workers`): a burst of slow fetches can only fill these, never
  the default pool that text requests (prompt counting) and the rest of the server use.
* Admission, not an unbounded queue: at most `max_queued_media` jobs running or waiting; a
  request whose media does not fit is refused at once (429 + Retry-After) before any fetch.
* The caller starts each fetch deadline when it submits, so waiting for a worker counts against
  `fetch_timeout_s`: a job still queued at its deadline fails as a timeout without fetching.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .mediapolicy import MediaError, MediaPolicy


class MediaPool:
    def __init__(self, policy: MediaPolicy) -> None:
        if policy.media_workers < 1 or policy.max_queued_media < 1:
            raise ValueError("media_workers and max_queued_media must be ≥ 1")
        self.executor = ThreadPoolExecutor(
            max_workers=policy.media_workers, thread_name_prefix="fastvlm-media"
        )
        self.capacity = policy.max_queued_media
        self.pending = 0  # jobs admitted and not finished; a job leaves when its thread ends
        self._lock = threading.Lock()

    def _release(self, _future) -> None:
        with self._lock:
            self.pending -= 1

    async def map(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list[Any]:
        """`fn(*job)` for every job on the pool; results (or raised exceptions) in job order."""
        if not jobs:
            return []
        with self._lock:
            if self.pending + len(jobs) > self.capacity:
                raise MediaError(
                    f"server busy: {self.pending} media jobs in flight (limit {self.capacity}); "
                    "retry shortly",
                    status=429,
                    code="media_busy",
                )
            self.pending += len(jobs)
        futures = []
        for i, job in enumerate(jobs):
            try:
                cf = self.executor.submit(fn, *job)
            except RuntimeError:  # shutting down: the unsubmitted jobs leave the count
                with self._lock:
                    self.pending -= len(jobs) - i
                raise MediaError("server is shutting down", 503, "shutting_down") from None
            cf.add_done_callback(self._release)  # also when a cancelled client's job ends
            futures.append(asyncio.wrap_future(cf))
        return await asyncio.gather(*futures, return_exceptions=True)

    def shutdown(self) -> None:
        """Drop queued jobs; running ones end by their own deadline (nothing waits for them)."""
        self.executor.shutdown(wait=False, cancel_futures=True)
