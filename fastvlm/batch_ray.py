"""`fastvlm batch --ray`: the same captioning job on Ray Data (from_items → map_batches).

Design decisions:
* One actor per worker holds one loaded model (`CaptionActor`); one block per batch, so rows
  stream back to the driver (the single writer of OUTPUT) as batches finish.
* A local cluster this driver starts is this driver's to stop: `ray.shutdown()` runs on every
  exit path Python sees (normal end, an error, Ctrl-C, SIGTERM/SIGHUP turned into an exception).
  A SIGKILLed driver runs no code, and Ray's agents outlive it: from the CLI, a watchdog child
  (reaper.py) ends the processes the driver started once it is gone, whatever the cause.
* Third-party output stays behind `--verbose`: worker logs are not forwarded to the driver and
  Ray's own loggers print errors only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import reaper
from .batch_worker import _load, caption_items
from .errors import FastVLMError

RAY_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.tune")


class CaptionActor:
    """Ray Data actor: one loaded model per actor; `__call__` captions one batch of items."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.vlm = _load(options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        cols = list(batch)
        n = len(batch[cols[0]])
        items = [{c: _plain(batch[c][i]) for c in cols} for i in range(n)]
        return {"row": [json.dumps(r) for r in caption_items(self.vlm, items, self.options)]}


def _plain(v: Any) -> Any:
    """numpy scalars / arrays from a Ray batch → Python values."""
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP as an exception, so `finally` blocks (ray.shutdown) run."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def ray_log_level(verbosity: int) -> int:
    """Ray's loggers: INFO with -v; otherwise errors only (its warnings are about Ray itself)."""
    return logging.INFO if verbosity > 0 else logging.ERROR


def init_kwargs(
    options: dict[str, Any], workers: int, address: str | None, verbosity: int
) -> dict[str, Any]:
    """ray.init arguments. verbosity: -1 quiet, 0 default, 1 verbose (-v)."""
    kw: dict[str, Any] = {
        "ignore_reinit_error": True,
        "log_to_driver": verbosity > 0,
        "logging_level": ray_log_level(verbosity),
        "include_dashboard": False if verbosity <= 0 else None,
    }
    kw = {k: v for k, v in kw.items() if v is not None}
    if address:
        kw["address"] = address
    else:  # local cluster: workers must import this very fastvlm (a checkout, or installed)
        here = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        kw["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        kw["num_cpus"] = max(workers * (options.get("threads") or 1), os.cpu_count() or 1)
    return kw


def run_ray(
    items: list[dict],
    options: dict[str, Any],
    workers: int,
    address: str | None,
    verbosity: int = 0,
    reap: bool = False,
) -> Iterator[dict]:
    """Rows as they complete. Starts (and always shuts down) a local cluster unless Ray is
    already initialised in this process or `address` names a running one. `reap` (the CLI):
    a watchdog also ends that cluster's processes if this driver is SIGKILLed (reaper.py)."""
    try:
        import ray
    except ImportError as e:
        raise FastVLMError("--ray needs Ray Data: pip install 'fastvlm[batch]'") from e
    started = not ray.is_initialized()
    old_handlers = {}
    watchdog = reaper.start() if started and reap and not address else None
    try:
        if started:
            for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if sig is not None:
                    old_handlers[sig] = signal.signal(sig, _raise_terminated)
            ray.init(**init_kwargs(options, workers, address, verbosity))
        ctx = ray.data.DataContext.get_current()  # imports ray.data, which sets its own levels
        ctx.enable_progress_bars = verbosity > 0
        for name in RAY_LOGGERS:
            logging.getLogger(name).setLevel(ray_log_level(verbosity))
        gpus = ray.cluster_resources().get("GPU", 0) >= 1
        bs = options["batch_size"]
        # One block per batch: Ray Data hands results back per block, so rows stream as they end.
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // bs)))
        ds = ds.map_batches(
            CaptionActor,
            fn_constructor_kwargs={"options": options},
            batch_size=bs,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=1 if gpus else 0,
            num_cpus=options.get("threads") or 1,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(options.get("threads") or 1)}},
        )
        try:
            for r in ds.iter_rows():
                yield json.loads(r["row"])
        except ray.exceptions.RayError as e:  # e.g. an actor could not load the model
            raise FastVLMError(f"the Ray job failed: {e}") from e
    finally:
        if started:
            ray.shutdown()
        reaper.stop(watchdog)
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
