"""`fastvlm bench --isolate`: every precision in its own child process, loaded from a checkpoint
folder the way users load it (`fastvlm.load(folder, quant=...)`, streamed quantization).

Why: a process's peak RSS only grows, so in one process the int4 run's peak includes the fp32
model measured before it (and the fp32 copy it was quantized from). One child per precision
makes the RSS column the memory that precision needs. `--shape` gets its weights from a cached
random-weight folder (`shape_folder.py`); nothing is downloaded. Before starting a child, the
weights it will hold are estimated from the folder's tensor shapes and a precision that cannot
fit in the available memory is skipped with a note (7B fp32 on a 24 GB machine), never tried.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .. import hub
from ..quant.scheme import parse_spec
from ..quant.stream import normalize_quant
from ..safetensors_rows import SafetensorsRows
from ..weights import weight_files
from .report import ratios, report
from .shape_folder import shape_folder

# flags handed to every child unchanged (name, attribute)
PASS = ("--max-tokens", "--repeats", "--vision-batch", "--device", "--dtype", "--interleave")


def available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            d = {ln.split(":")[0]: int(ln.split()[1]) for ln in f}
        return d["MemAvailable"] / 1024
    except (OSError, KeyError, ValueError):
        return math.inf


def estimate_weights_mb(folder: Path, quant: str | None) -> float:
    """MB the loaded weights take: fp32 floats, quantized decoder Linears at their bits (plus
    scales); the tied head counts once (twice when quantized: its own int copy)."""
    schemes = parse_spec(quant) if normalize_quant(quant) else {}
    llm = schemes.get("llm")
    bits = llm.bits if llm is not None else 0
    total, embed = 0.0, 0
    has_head = False
    for f in weight_files(folder):
        with SafetensorsRows(f) as h:
            for k in h.keys():
                n = math.prod(h.shape(k))
                quantized = bits and len(h.shape(k)) == 2 and (
                    ".layers." in k and k.endswith("proj.weight") or k.endswith("lm_head.weight")
                )
                has_head |= k.endswith("lm_head.weight")
                embed = n if k.endswith("embed_tokens.weight") else embed
                total += n * (bits / 8 * 1.07 if quantized else 4)
    if bits and not has_head:  # tied head quantized into its own copy
        total += embed * bits / 8 * 1.07
    return total / 2**20


def _child_args(a, q: str, folder: Path, out: Path, first: bool) -> list[str]:
    args = ["--model", str(folder), "--quant", q, "--no-isolate", "--json", str(out)]
    for flag in PASS:
        args += [flag, str(getattr(a, flag[2:].replace("-", "_")))]
    conc = ",".join(str(c) for c in a.concurrency)
    args += ["--concurrency", conc, "--backend", "torch"]
    if a.image_size:  # the extra resolutions are timed once, in the first child
        args += ["--image-size", a.image_size if first else a.image_size.split(",")[0]]
    if a.threads:
        args += ["--threads", str(a.threads)]
    for flag in ("vision_dtype", "prefill_dtype"):  # CPU compute dtypes (fast_cpu.py)
        if getattr(a, flag, None) is not None:
            args += ["--" + flag.replace("_", "-"), str(getattr(a, flag))]
    if a.agreement is not None:
        args += ["--agreement", str(a.agreement)]
    for flag in ("compile", "no_cuda_graphs", "no_fused_decode"):
        if getattr(a, flag):
            args.append("--" + flag.replace("_", "-"))
    return args


def run_isolated(a, quants: list[str]) -> int:
    """Build / find the folder, one child per precision, then transformers; report."""
    from .hf import bench_transformers_folder

    size = int(a.image_size.split(",")[0]) if a.image_size else 1024
    if a.shape:
        print(f"[bench] random-weight {a.shape} folder ...", file=sys.stderr, flush=True)
        folder = shape_folder(a.shape, size)
        source = f"shape {a.shape} (random weights, {folder.name})"
    else:
        folder, source = Path(hub.resolve(a.model)), str(a.model)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    info: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, q in enumerate(quants):
            need, have = estimate_weights_mb(folder, q), available_mb()
            if need > 0.8 * have:
                skipped[q] = f"weights need ~{need:,.0f} MB, {have:,.0f} MB available: not run"
                print(f"[bench] {q}: {skipped[q]}", file=sys.stderr, flush=True)
                continue
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, "-m", "fastvlm.bench", *_child_args(a, q, folder, out, i == 0)]
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
            if proc.returncode != 0 or not out.exists():
                skipped[q] = f"child process failed (exit {proc.returncode})"
                continue
            res = json.loads(out.read_text())
            for r in res["runs"]:
                r["load_s"] = res["info"]["load_s"]
                r["load_peak_rss_mb"] = res["info"]["load_peak_rss_mb"]
            runs += res["runs"]
            info = info or res["info"]
    info.update(source=source, isolated=True, skipped=skipped, folder=folder.name)
    refs: list[dict[str, Any]] = []
    failed = None
    if a.compare == "transformers" and runs:
        need = estimate_weights_mb(folder, None) * 2  # its fp32 model + the converted copy
        if need > 0.8 * available_mb():
            info["transformers_error"] = f"not run: fp32 needs ~{need:,.0f} MB"
        else:
            print("[bench] transformers (child processes) ...", file=sys.stderr, flush=True)
            try:
                refs = bench_transformers_folder(folder, a, info.get("dtype", "float32"))
            except SystemExit as e:
                failed = info["transformers_error"] = str(e)[-2000:]
    if not runs:
        print(f"error: no precision could run: {skipped}", file=sys.stderr)
        return 1
    report(info, runs, refs)
    result = {"info": info, "runs": runs, "transformers": refs, "ratios": ratios(runs, refs)}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result, default=float))
    return 1 if failed else 0
