"""`fastvlm batch INPUT OUTPUT.jsonl`: caption a folder, manifest or Parquet file, resumably.

INPUT is a folder of images (recursive; id = relative path), a JSONL or CSV manifest (`image`
column, optional `id` and `prompt`; relative paths are relative to the manifest), or a Parquet
file (`image` = path or bytes or {bytes, path}; optional `id`, `prompt`); see manifest.py. Each
output line is `{"id", "image", "text", "finish_reason", "prompt_tokens", ...}` or
`{"id", "image", "error"}`.

Design decisions:
* The OUTPUT file is the job's state. One writer (the driver) appends a row and flushes it the
  moment an item finishes, so a killed job loses only in-flight items; a rerun reads the ids
  already in OUTPUT (a torn last line is cut off first) and skips them — no duplicates, no redo.
  A failed item or a bad manifest row becomes an error row and never stops the job
  (`--retry-failed` drops those rows and runs them again).
* Options are checked once, in the driver, against the model's config (before any worker
  starts). Exit code: 0 when every item of the run succeeded or on a partial failure ("N failed"
  in the summary), 1 when every item failed.
* Workers hold one loaded model each and caption `--batch-size` items at a time through the
  model's engine: local processes by default (batch_worker.py), or Ray Data with `--ray`
  (batch_ray.py; Ray is imported only on that path).
* Greedy decoding is the default, so local and Ray runs of the same input give the same rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .batch_worker import caption_items, run_local  # noqa: F401 — caption_items re-exported
from .cli.args import add_model_args, add_sampling_args, add_tokens_per_image_arg, sampling_kwargs
from .cli.args import load_kwargs as cli_load_kwargs
from .engine.sampling import SamplingParams
from .errors import FastVLMError
from .manifest import IMAGE_EXTENSIONS, load_items  # noqa: F401 — re-exported for callers
from .options import check_tokens_per_image

# Exit codes of `fastvlm batch` (README "Batch captioning"): partial failure is a success with
# "N failed" in the summary, so a rerun with --retry-failed can finish the job.
EXIT_OK, EXIT_FAILED = 0, 1


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
    verbosity: int = 0,
    reap: bool = False,
) -> dict[str, Any]:
    """Caption every item of INPUT not yet in OUTPUT; returns the summary (`failed` counts this
    run's error rows, bad manifest rows included; `first_error` is the first of them)."""
    from tqdm import tqdm

    if workers < 0 or (use_ray and workers < 1):
        raise ValueError("--workers must be ≥ 1 (0 = in this process, local mode only)")
    if batch_size < 1:
        raise ValueError("--batch-size must be ≥ 1")
    if limit is not None and limit < 0:
        raise ValueError("--limit must be ≥ 0")
    sampling = {"max_tokens": 128, "temperature": 0.0, **(sampling or {})}
    SamplingParams(**sampling).validate()  # once here, not as a failure in every worker
    from .hub import resolve
    from .weights import load_config

    # a typo in --model or a broken config fails here, once, not in every worker; a download
    # happens once for all workers
    folder = resolve(model)
    cfg = load_config(folder, (load_kwargs or {}).get("image_size"))
    check_tokens_per_image(tokens_per_image, cfg.num_image_tokens)  # before any worker starts
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
    counts: dict[str, Any] = {"done": 0, "failed": 0, "skipped": skipped, "first_error": None}
    bad = [{k: it[k] for k in ("id", "image", "error")} for it in todo if "error" in it]
    work = [it for it in todo if "error" not in it]
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="item", disable=not progress or not todo, dynamic_ncols=True)
    with open(out, "a", encoding="utf-8") as f:

        def write(row: dict) -> None:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            failed = "error" in row
            counts["failed" if failed else "done"] += 1
            if failed and counts["first_error"] is None:
                counts["first_error"] = f"{row['id']}: {row['error']}"
            bar.update(1)

        for row in bad:  # bad manifest rows: error rows, written before any model work
            write(row)
        if work:
            if use_ray:
                from .batch_ray import run_ray

                rows = run_ray(work, options, workers, ray_address, verbosity, reap)
            else:
                rows = run_local(work, options, workers)
            with contextlib.closing(rows):  # a generator's cleanup (ray.shutdown) runs now
                for row in rows:
                    write(row)
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
    add_tokens_per_image_arg(p)
    p.add_argument("--retry-failed", action="store_true", help="run items with error rows again")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar; third-party errors only"
    )
    p.add_argument(
        "--verbose", "-v", action="store_true", help="show Ray's own logs and progress bars"
    )
    add_model_args(p)
    add_sampling_args(p, max_tokens=128)
    a = p.parse_args(argv)
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
            load_kwargs={k: v for k, v in cli_load_kwargs(a).items() if v is not None},
            sampling={k: v for k, v in sampling_kwargs(a).items() if v not in (None, [])},
            progress=not a.quiet,
            verbosity=-1 if a.quiet else 1 if a.verbose else 0,
            reap=True,  # a SIGKILLed CLI driver leaves no Ray processes behind
        )
    except (FastVLMError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to finish the job", file=sys.stderr)
        return 130
    print(summary_line(s), file=sys.stderr)
    print(json.dumps(s))
    return exit_code(s)


def summary_line(s: dict[str, Any]) -> str:
    line = (
        f"done {s['done']}, failed {s['failed']}, skipped {s['skipped']} of {s['total']} in "
        f"{s['seconds']:.1f} s ({s['items_per_s']:.2f} items/s, {s['backend']}) → {s['output']}"
    )
    if s["failed"]:
        what = "every item" if not s["done"] else f"{s['failed']} items"
        line += (
            f"\n{'error' if not s['done'] else 'warning'}: {what} of this run failed (first: "
            f"{s['first_error'][:300]}); rerun with --retry-failed after fixing them"
        )
    return line


def exit_code(s: dict[str, Any]) -> int:
    """0: every item of this run succeeded (or nothing was left to do); 1: every item failed;
    a partial failure is 0 with the count in the summary (error rows are in OUTPUT)."""
    return EXIT_FAILED if s["failed"] and not s["done"] else EXIT_OK
