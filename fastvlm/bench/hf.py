"""transformers' FastVLM on the same weights, timed in child processes (`--transformers-worker`)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..engine.allocator import tune_malloc
from ..weights import convert_checkpoint, load_config, save_checkpoint
from .measure import now, peak_rss_mb
from .workload import prompt_ids


def bench_transformers(model, args) -> list[dict[str, Any]]:
    """transformers' FastVlmForConditionalGeneration on the same weights and prompt.

    It runs in child processes (`--transformers-python`, default this interpreter), so it gets
    its own clean allocator and, if needed, its own torch (transformers' FastVLM needs timm ->
    torchvision). Two runs: glibc's default allocator — transformers as its users run it — and
    with `tune_malloc()` (our allocator setting, which speeds up its vision tower as much as ours).
    """
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model.state_dict(), model.config, Path(tmp), fmt="hf")
        dev = model.lm_head.weight.device
        dtype = str(model.lm_head.weight.dtype).replace("torch.", "")
        return _run_workers(Path(tmp), args, str(dev), dtype)


def bench_transformers_folder(folder: Path, args, dtype: str) -> list[dict[str, Any]]:
    """The same from a checkpoint folder (`--isolate`): converted to the transformers format
    tensor for tensor (dtypes as stored; transformers loads them in `dtype`)."""
    with tempfile.TemporaryDirectory() as tmp:
        convert_checkpoint(folder, Path(tmp) / "hf", "hf")
        dev = str(resolve_device(args.device))
        return _run_workers(Path(tmp) / "hf", args, dev, dtype)


def _run_workers(folder: Path, args, device: str, dtype: str) -> list[dict[str, Any]]:
    import subprocess

    results = []
    spec = {
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
    }
    (folder / "bench_spec.json").write_text(json.dumps(spec))
    root = str(Path(__file__).resolve().parents[2])  # the folder holding fastvlm/
    for tuned in (False, True):
        env = {**os.environ, "FASTVLM_MALLOC_TUNE": "1" if tuned else "0"}
        env["PYTHONPATH"] = root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [args.transformers_python or sys.executable, "-m", "fastvlm.bench",
               "--transformers-worker", str(folder)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"transformers run failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["name"] = "transformers" + (" +malloc" if tuned else "")
        results.append(r)
    return results


def transformers_worker(folder: str) -> int:
    """Child process of `bench_transformers`: load the HF checkpoint, time it, print JSON."""
    tune_malloc()  # a no-op unless FASTVLM_MALLOC_TUNE=1 (set by the parent)
    try:
        import transformers
        from transformers import FastVlmForConditionalGeneration
    except ImportError:
        msg = "needs transformers >= 5 with timm (pip install -e '.[parity]')"
        print(f"--compare transformers {msg}, or --transformers-python PY", file=sys.stderr)
        return 2
    spec = json.loads((Path(folder) / "bench_spec.json").read_text())
    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    out: dict[str, Any] = {"version": transformers.__version__, "torch": torch.__version__}
    dev = torch.device(spec.get("device", "cpu"))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    hf = FastVlmForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(dev).eval()
    ours = load_config(Path(folder))
    size = ours.vision.image_size
    ids = torch.tensor([prompt_ids(ours, seed=2)], device=dev)
    px = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    n = spec["max_tokens"]
    with torch.inference_mode():
        hf.model.get_image_features(
            pixel_values=px if dev.type != "cpu" else px[:, :, :64, :64]
        )  # warm-up, as ours
        t0 = now(dev)
        hf.model.get_image_features(pixel_values=px)
        out["vision_s"] = now(dev) - t0

        def gen(k: int, net=hf, **kw) -> float:
            t0 = now(dev)
            o = net.generate(
                input_ids=ids, pixel_values=px, max_new_tokens=k, min_new_tokens=k,
                do_sample=False, **kw,
            )  # fmt: skip
            dt = now(dev) - t0
            assert o.shape[1] == ids.shape[1] + k
            return dt

        for tag, kw in (("", {}), ("_static", {"cache_implementation": "static"})):
            if dev.type == "cuda":
                gen(1 + n, **kw)  # warm-up: CUDA kernels / cuBLAS handles of this config
            t1 = gen(1, **kw)
            tn = gen(1 + n, **kw)
            out[f"ttft{tag}_s"] = t1
            out[f"decode{tag}_tok_s"] = n / max(tn - t1, 1e-9)
    out["peak_rss_mb"] = peak_rss_mb()
    if dev.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    print(json.dumps(out))
    return 0
