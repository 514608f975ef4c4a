"""The work of one batch worker: caption items with one loaded model, in local processes.

Design decisions:
* `caption_items` never raises for a bad item: a failed item is an error row, so one broken
  image costs one row. All readable items go to the model's engine at once (continuous batching).
* Local workers are spawned processes (fork + torch threads deadlock), one model each, torch
  threads per worker = 1 unless told, spread round-robin over the GPUs when there are several.
  A worker that cannot load the model fails its batches with that reason (a raising Pool
  initializer would make the Pool respawn workers forever).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from .engine.sampling import SamplingParams
from .errors import FastVLMError


def caption_items(vlm, items: list[dict], options: dict[str, Any]) -> list[dict]:
    """Caption a batch of items with one loaded model; never raises for a bad item.

    All readable items are submitted at once: a backend that batches (the torch engine) decodes
    them together; the others run each generation lazily, one at a time, as it is read."""
    tpi = options.get("tokens_per_image")
    sampling = options.get("sampling", {})
    params = SamplingParams(**sampling)
    params.validate()
    rows, pending = [], []
    for it in items:
        base = {"id": it["id"], "image": it.get("image")}
        try:
            data = it.get("image_bytes")  # Ray turns an all-None column into NaN: bytes only
            src = bytes(data) if isinstance(data, (bytes, bytearray)) else it["image"]
            messages = vlm.describe_messages([src], it["prompt"])
            ids, px = vlm.encode(messages, tokens_per_image=tpi)
            gen = vlm.backend.submit(ids, px, params, tokens_per_image=tpi)
            pending.append((base, gen, time.perf_counter()))
        except (FastVLMError, ValueError, OSError) as e:
            rows.append({**base, "error": f"{type(e).__name__}: {e}"})
    for base, gen, t0 in pending:
        try:
            chunks = list(vlm.text_chunks(gen, params))
            s, last = chunks[-1].stats, chunks[-1]
            rows.append(
                {
                    **base,
                    "text": "".join(c.text for c in chunks),
                    "finish_reason": last.finish_reason,
                    "prompt_tokens": s.prompt_tokens,
                    "image_tokens": s.image_tokens,
                    "generation_tokens": s.generation_tokens,
                    "seconds": round(time.perf_counter() - t0, 4),
                }
            )
        except Exception as e:  # noqa: BLE001 — a failed item is a row, not a dead job
            rows.append({**base, "error": f"{type(e).__name__}: {e}"})
    return rows


def _load(options: dict[str, Any], worker: bool = True):
    import torch

    from .api import load

    if worker:  # a worker shares the machine with its siblings: 1 torch thread unless told
        torch.set_num_threads(options.get("threads") or 1)
    return load(options.get("model"), **options.get("load", {}))


_VLM = None  # one model per local worker process
_LOAD_ERROR: str | None = None


def _worker_init(options: dict[str, Any]) -> None:
    global _VLM, _LOAD_ERROR
    try:
        import multiprocessing as mp

        import torch

        n_gpu = torch.cuda.device_count()
        if options["load"].get("device", "auto") in (None, "auto") and n_gpu > 1:
            rank = (mp.current_process()._identity or (1,))[0] - 1  # Pool workers count from 1
            options = {**options, "load": {**options["load"], "device": f"cuda:{rank % n_gpu}"}}
        _VLM = _load(options)
    except Exception as e:  # noqa: BLE001 — a raising initializer makes Pool respawn forever
        _LOAD_ERROR = f"{type(e).__name__}: {e}"


def _worker_run(job: tuple[list[dict], dict[str, Any]]) -> list[dict]:
    items, options = job
    if _VLM is None:
        raise FastVLMError(f"a batch worker could not load the model: {_LOAD_ERROR}")
    return caption_items(_VLM, items, options)


def _chunks(items: list[dict], n: int) -> Iterator[list[dict]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def run_local(items: list[dict], options: dict[str, Any], workers: int) -> Iterator[dict]:
    """Rows as they complete: in this process (workers=0) or in `workers` spawned processes."""
    batches = list(_chunks(items, options["batch_size"]))
    if workers == 0:
        vlm = _load(options, worker=False)
        for b in batches:
            yield from caption_items(vlm, b, options)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork + torch threads deadlock; spawn is portable
    env = {"OMP_NUM_THREADS": str(options.get("threads") or 1)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the spawned children only for their startup
    try:
        with ctx.Pool(workers, initializer=_worker_init, initargs=(options,)) as pool:
            for rows in pool.imap_unordered(_worker_run, [(b, options) for b in batches]):
                yield from rows
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
