"""`fastvlm batch INPUT OUTPUT.jsonl`: caption a folder, manifest or Parquet file, resumably.

INPUT is a folder of images (recursive; id = relative path), a JSONL or CSV manifest (`image`
column, optional `id` and `prompt`; relative paths are relative to the manifest), or a Parquet
file (`image` = path or bytes or {bytes, path}; optional `id`, `prompt`). Each output line is
`{"id", "image", "text", "finish_reason", "prompt_tokens", ...}` or `{"id", "image", "error"}`.

Design decisions:
* The OUTPUT file is the job's state. One writer (the driver) appends a row and flushes it the
  moment an item finishes, so a killed job loses only in-flight items; a rerun reads the ids
  already in OUTPUT (a torn last line is cut off first) and skips them — no duplicates, no redo.
  A failed item becomes an error row and never stops the job (`--retry-failed` drops those rows
  and runs them again).
* Workers hold one loaded model each and caption `--batch-size` items at a time through the
  model's engine (continuous batching inside the worker): local processes by default (spawn,
  torch threads per worker = 1 unless `--threads`; spread round-robin over the GPUs when there
  are several), or **Ray Data** with `--ray`: `from_items`
  + `map_batches` over an actor class (one actor per worker, one GPU per actor when the cluster
  has GPUs), on a local cluster or `--ray-address`. Ray is imported only on that path.
* Greedy decoding is the default, so local and Ray runs of the same input give the same rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import FastVLMError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ---------------------------------------------------------------------- inputs
def load_items(src: str | Path, prompt: str) -> list[dict]:
    """INPUT → [{"id", "image" (path str or None), "image_bytes" (bytes or None), "prompt"}]."""
    p = Path(src)
    if not p.exists():
        raise FastVLMError(f"batch input not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        rows = [{"id": f.relative_to(p).as_posix(), "image": str(f)} for f in files]
    elif p.suffix.lower() == ".parquet":
        rows = _parquet_rows(p)
    elif p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FastVLMError(f"{p}:{n}: not valid JSON ({e})") from e
    else:
        raise FastVLMError(
            f"{p}: batch input must be a folder of images, a .jsonl/.csv manifest or .parquet"
        )
    items, seen = [], {}
    for n, r in enumerate(rows):
        img, data = r.get("image"), None
        if isinstance(img, dict):  # Hugging Face datasets' Image feature: {bytes, path}
            img, data = img.get("path"), img.get("bytes")
        elif isinstance(img, (bytes, bytearray)):
            img, data = None, bytes(img)
        if img is None and data is None:
            raise FastVLMError(f"{p}: row {n + 1} has no 'image'")
        if img is not None and data is None and not p.is_dir():
            q = Path(str(img)).expanduser()
            img = str(q if q.is_absolute() else p.parent / q)
        iid = str(r.get("id") or (r.get("image") if isinstance(r.get("image"), str) else f"{n}"))
        if iid in seen:
            raise FastVLMError(
                f"{p}: id {iid!r} appears in rows {seen[iid] + 1} and {n + 1}; "
                "give every row a unique 'id'"
            )
        seen[iid] = n
        items.append(
            {"id": iid, "image": img, "image_bytes": data, "prompt": r.get("prompt") or prompt}
        )
    return items


def _parquet_rows(p: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise FastVLMError("Parquet input needs pyarrow: pip install 'fastvlm[batch]'") from e
    return pq.read_table(p).to_pylist()


# ---------------------------------------------------------------------- output (the job state)
def read_done(out: Path, retry_failed: bool = False) -> set[str]:
    """Ids already in OUTPUT. Cuts a torn last line (a killed writer) so appends stay valid JSONL;
    with `retry_failed`, rewrites OUTPUT without its error rows so those items run again."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    keep_upto = raw.rfind(b"\n") + 1
    if keep_upto < len(raw):
        with open(out, "r+b") as f:
            f.truncate(keep_upto)
        raw = raw[:keep_upto]
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    if retry_failed and any("error" in r for r in rows):
        rows = [r for r in rows if "error" not in r]
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, out)
    return {str(r["id"]) for r in rows}


# ---------------------------------------------------------------------- the work
def caption_items(vlm, items: list[dict], options: dict[str, Any]) -> list[dict]:
    """Caption a batch of items with one loaded model; never raises for a bad item.

    All readable items are submitted to the model's engine at once so they decode together."""
    from .engine.request import stream_text
    from .engine.sampling import SamplingParams

    tpi = options.get("tokens_per_image")
    sampling = options.get("sampling", {})
    params = SamplingParams(**sampling)
    params.validate()
    fast = getattr(vlm, "engine_kind", "reference") != "reference"
    rows, pending = [], []
    for it in items:
        base = {"id": it["id"], "image": it.get("image")}
        try:
            data = it.get("image_bytes")  # Ray turns an all-None column into NaN: bytes only
            src = bytes(data) if isinstance(data, (bytes, bytearray)) else it["image"]
            messages = vlm.describe_messages([src], it["prompt"])
            ids, px = vlm.encode(messages, tokens_per_image=tpi)
            handle = None
            if fast and len(ids) + params.max_tokens <= vlm.engine.max_len:
                handle = vlm.engine.submit(ids, px, params, tokens_per_image=tpi)
            pending.append((base, messages, handle, time.perf_counter()))
        except (FastVLMError, ValueError, OSError) as e:
            rows.append({**base, "error": f"{type(e).__name__}: {e}"})
    for base, messages, handle, t0 in pending:
        try:
            if handle is None:  # reference engine, or too long for the engine: one at a time
                chunks = list(vlm.stream_chunks(messages, tokens_per_image=tpi, **sampling))
            else:
                chunks = list(stream_text(handle, vlm.tokenizer))
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


def run_ray(
    items: list[dict], options: dict[str, Any], workers: int, address: str | None
) -> Iterator[dict]:
    """Rows as they complete, from Ray Data: from_items → map_batches(CaptionActor)."""
    try:
        import ray
    except ImportError as e:
        raise FastVLMError("--ray needs Ray Data: pip install 'fastvlm[batch]'") from e
    if not ray.is_initialized():
        kw: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
        if address:
            kw["address"] = address
        else:  # local cluster: workers must import this very fastvlm (a checkout, or installed)
            here = str(Path(__file__).resolve().parent.parent)
            path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
            kw["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
            kw["num_cpus"] = max(workers * (options.get("threads") or 1), os.cpu_count() or 1)
        ray.init(**kw)
    ray.data.DataContext.get_current().enable_progress_bars = False
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    bs = options["batch_size"]
    # One block per batch: Ray Data hands results back per block, so rows stream as batches end.
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


# ---------------------------------------------------------------------- the job
def run(
    input: str | Path,
    output: str | Path,
    prompt: str = "Describe this image.",
    *,
    model: str | None = None,
    workers: int = 1,
    use_ray: bool = False,
    ray_address: str | None = None,
    batch_size: int = 8,
    threads: int | None = None,
    tokens_per_image: int | None = None,
    retry_failed: bool = False,
    limit: int | None = None,
    load_kwargs: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Caption every item of INPUT not yet in OUTPUT; returns the summary."""
    from tqdm import tqdm

    if workers < 0 or (use_ray and workers < 1):
        raise ValueError("--workers must be ≥ 1 (0 = in this process, local mode only)")
    if batch_size < 1:
        raise ValueError("--batch-size must be ≥ 1")
    sampling = {"max_tokens": 128, "temperature": 0.0, **(sampling or {})}
    if tokens_per_image is not None:  # validate before starting any worker
        from .model.fastvlm import check_tokens_per_image

        check_tokens_per_image(tokens_per_image, 1 << 30)
    from .hub import resolve
    from .weights import load_config

    # a typo in --model or a broken config fails here, once, not in every worker; a download
    # happens once for all workers
    folder = resolve(model)
    load_config(folder, (load_kwargs or {}).get("image_size"))
    model = str(folder) if model is not None else None
    items = load_items(input, prompt)[:limit]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out, retry_failed)
    todo = [it for it in items if it["id"] not in done]
    skipped = len(items) - len(todo)
    options = {
        "model": model,
        "load": dict(load_kwargs or {}),
        "sampling": sampling,
        "tokens_per_image": tokens_per_image,
        "batch_size": batch_size,
        "threads": threads,
    }
    counts = {"done": 0, "failed": 0, "skipped": skipped}
    t0 = time.perf_counter()
    if todo:
        rows = (
            run_ray(todo, options, workers, ray_address)
            if use_ray
            else run_local(todo, options, workers)
        )
        bar = tqdm(total=len(todo), unit="item", disable=not progress, dynamic_ncols=True)
        with open(out, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                counts["failed" if "error" in row else "done"] += 1
                bar.update(1)
        bar.close()
    dt = time.perf_counter() - t0
    processed = counts["done"] + counts["failed"]
    return {
        **counts,
        "total": len(items),
        "seconds": round(dt, 2),
        "items_per_s": round(processed / dt, 3) if processed and dt > 0 else 0.0,
        "backend": "ray" if use_ray else f"local:{workers}",
        "output": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    from .cli import _add_model_args, _add_sampling_args, _sampling

    p = argparse.ArgumentParser(
        prog="fastvlm batch",
        description="Caption a folder of images, a JSONL/CSV manifest or a Parquet file into "
        "JSONL. Resumable: rerun the same command to finish an interrupted job.",
    )
    p.add_argument("input", help="folder of images | manifest.jsonl | manifest.csv | x.parquet")
    p.add_argument("output", help="output JSONL (appended to; existing ids are skipped)")
    p.add_argument("--prompt", "-p", default="Describe this image.")
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes / Ray actors (0 = in-process)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (1)")
    p.add_argument("--batch-size", type=int, default=8, help="items decoded together per worker")
    p.add_argument(
        "--ray", action="store_true", help="run on Ray Data (pip install fastvlm[batch])"
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. auto)")
    p.add_argument("--tokens-per-image", type=int, default=None)
    p.add_argument("--retry-failed", action="store_true", help="run items with error rows again")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(max_tokens=128)
    a = p.parse_args(argv)
    load_kwargs = {"device": a.device, "dtype": a.dtype, "image_size": a.image_size}
    load_kwargs["engine"] = a.engine
    if a.compile:
        load_kwargs["engine_options"] = {"compile": True}
    if a.trust_pickle:
        load_kwargs["trust_pickle"] = True
    try:
        s = run(
            a.input,
            a.output,
            a.prompt,
            model=a.model,
            workers=a.workers,
            use_ray=a.ray or a.ray_address is not None,
            ray_address=a.ray_address,
            batch_size=a.batch_size,
            threads=a.threads,
            tokens_per_image=a.tokens_per_image,
            retry_failed=a.retry_failed,
            limit=a.limit,
            load_kwargs=load_kwargs,
            sampling={k: v for k, v in _sampling(a).items() if v not in (None, [])},
            progress=not a.quiet,
        )
    except (FastVLMError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to finish the job", file=sys.stderr)
        return 130
    print(
        f"done {s['done']}, failed {s['failed']}, skipped {s['skipped']} of {s['total']} in "
        f"{s['seconds']:.1f} s ({s['items_per_s']:.2f} items/s, {s['backend']}) → {s['output']}",
        file=sys.stderr,
    )
    print(json.dumps(s))
    return 0
