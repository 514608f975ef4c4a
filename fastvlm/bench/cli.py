"""`fastvlm bench` flags and `main(argv)`: load or build the model, run each engine, print the
table and ONE JSON object as the last stdout line."""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..api import load
from ..cli.args import add_compute_dtype_args
from ..compress.importance import magnitude_scores
from ..compress.prune import Ratios, plan, prune_model
from ..config import shape as config_shape
from ..device import prepare_for_device, resolve_device, resolve_dtype
from ..engine.allocator import tune_malloc
from ..errors import ConfigError
from ..fast_cpu import describe, prepare_cpu
from ..model.fastvlm import FastVLMModel
from ..processing import Processor
from .hf import bench_transformers, transformers_worker
from .isolate import available_mb, run_isolated
from .measure import measure_bandwidth
from .memory import rss_mb
from .mlx import bench_mlx, bench_mlx_vlm, mlx_vlm_worker
from .ort import bench_onnxruntime
from .report import ratios, report
from .torch_engine import bench_engine, bench_vision_batches, greedy_agreement
from .workload import SHAPES, at_resolution, build_shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvlm bench",
        description="Time preprocessing, vision, prefill, decode and batching; compare against "
        "the memory-bandwidth roofline and (optionally) transformers in the same run.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="repo id or folder (default: demo model)")
    src.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random weights")
    p.add_argument(
        "--image-size",
        default=None,
        help="encoder resolution; a comma list (1024,512) also times TTFT at the extra sizes",
    )
    p.add_argument(
        "--quant",
        default="fp32",
        help="comma list of weight precisions to measure: fp32,int8,int4 (or quant specs such "
        "as llm=int4-g32 separated by ';')",
    )
    p.add_argument(
        "--prune",
        default="",
        help="comma list of pruning ratios (MLP channels + KV groups, weight magnitude, as "
        "`fastvlm prune --ratio`) also timed against the unpruned model, e.g. 0.25,0.5",
    )
    p.add_argument("--max-tokens", type=int, default=32, help="decode tokens per measurement")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed requests per configuration; the median-decode run is reported (default 3)",
    )
    p.add_argument("--concurrency", default="1,4", help="comma list of concurrent streams")
    p.add_argument("--vision-batch", default="1,8", help="comma list of vision batch sizes")
    p.add_argument(
        "--compare",
        choices=["transformers", "mlx-vlm"],
        default=None,
        help="also time transformers' FastVLM, or mlx-vlm's own stream_generate (child process)",
    )
    p.add_argument(
        "--transformers-python",
        default=None,
        help="interpreter for the transformers runs (e.g. a venv with timm + torchvision)",
    )
    p.add_argument("--transformers-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mlx-vlm-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--backend",
        default="torch",
        help="comma list: torch (our engine), onnxruntime (exported graphs) and/or mlx (the mlx "
        "backend on an MLX copy); same weights, each --quant precision for the decoder",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    add_compute_dtype_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--dtype",
        default="float32",
        help="weights/activations: float32 (default; the only sane choice on CPU), bfloat16 or "
        "float16 (GPU); transformers runs in the same dtype",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument(
        "--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA (no graph replay)"
    )
    p.add_argument(
        "--no-fused-decode",
        action="store_true",
        help="CPU: decode layer by layer in torch (not one fused C call per step), for A/B",
    )
    p.add_argument(
        "--agreement", type=int, default=None, help="greedy-agreement images (trained models)"
    )
    p.add_argument(
        "--interleave",
        type=int,
        default=8,
        help="probe memory bandwidth every N steps of an extra timed decode (mbu_interleaved; "
        "0: off)",
    )
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each --quant in its own process, loaded from a checkpoint folder (--shape: a "
        "cached random-weight folder) with streamed quantization: peak RSS per precision "
        "(default: on for --shape 1.5b / 7b)",
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the JSON here")
    return p


def _is_export(model: str | None) -> bool:
    from ..backends.routing import is_onnx_export

    return model is not None and is_onnx_export(model)


def _prune_list(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--prune takes a comma list of ratios like 0.25,0.5, not {text!r}"
        ) from None
    for r in ratios:
        Ratios(mlp=r).check()
    return ratios


def pruned(base, ratio: float):
    """`base` with `ratio` of its MLP channels and KV groups removed (magnitude importance)."""
    return prune_model(base, plan(base, magnitude_scores(base), Ratios(mlp=ratio, heads=ratio)))


BIG_SHAPES = ("1.5b", "7b")  # never built as an fp32 model in this process (see isolate.py)


def _fp32_mb(shape: str) -> float:
    with torch.device("meta"):
        m = FastVLMModel(config_shape(shape))
    return sum(p.numel() for p in m.parameters()) * 4 / 2**20


def _quant_list(text: str) -> list[str]:
    sep = ";" if ";" in text or "=" in text else ","
    return [q.strip() for q in text.split(sep) if q.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # client-side load test of a running server
        from ..server.loadtest import main as loadtest

        return loadtest(argv[1:])
    a = build_parser().parse_args(argv)
    _prune_list(a.prune)  # a bad ratio fails before the model is built
    if a.transformers_worker:
        return transformers_worker(a.transformers_worker)
    if a.mlx_vlm_worker:
        return mlx_vlm_worker(a.mlx_vlm_worker)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ..quant import quantize_model

    if a.isolate is None:
        a.isolate = a.shape in BIG_SHAPES
    if a.isolate:  # the parent holds no model: each precision runs in its own process
        a.concurrency = sorted({int(x) for x in a.concurrency.split(",")} | {1})
        return run_isolated(a, _quant_list(a.quant))
    malloc_tuned = tune_malloc()  # before any big allocation; transformers shares it (same run)

    dev = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, dev)
    prec = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    concurrency = sorted({int(x) for x in a.concurrency.split(",")} | {1})
    a.concurrency = concurrency
    sizes = [int(x) for x in a.image_size.split(",")] if a.image_size else []
    quants = _quant_list(a.quant)
    floats = ("fp32", "none", "float32", prec)
    # Without a float run, a --model bench never builds the float model (honest peak RSS).
    first_q = None if not quants or any(q in floats for q in quants) else quants[0]
    t0 = time.perf_counter()
    if a.shape:
        first_q = None
        need = _fp32_mb(a.shape)
        if need > 0.8 * available_mb():
            raise ConfigError(
                f"--shape {a.shape} as an fp32 model needs ~{need:,.0f} MB, more than this "
                "machine has available: run it with --isolate (streamed int8/int4 loads)"
            )
        base = build_shape(a.shape, sizes[0] if sizes else 1024).to(dev, dtype)
        prepare_for_device(base, dev, vision_dtype=a.vision_dtype, prefill_dtype=a.prefill_dtype)
        processor = Processor(base.config, None)
        source = f"shape {a.shape} (random weights)"
    else:
        # the torch weights (auto could pick mlx on a Mac; an export folder still routes to
        # ORT); a quantized run loads straight into int8/int4 (streamed), never the float model
        vlm = load(
            a.model, device=dev, dtype=dtype, image_size=sizes[0] if sizes else None,
            backend="onnxruntime" if _is_export(a.model) else "torch",
            vision_dtype=a.vision_dtype, prefill_dtype=a.prefill_dtype, quant=first_q,
        )  # fmt: skip
        if vlm.backend.name != "torch":  # bench loads the torch weights itself
            raise ConfigError(
                f"{vlm.path} is an ONNX export: `fastvlm bench` measures a PyTorch checkpoint "
                "(give the source model; --backend onnxruntime exports and times ONNX itself)"
            )
        base, processor = vlm.model, vlm.processor
        source = str(vlm.path)
    load_s = time.perf_counter() - t0
    info = {
        "source": source,
        "image_size": base.config.vision.image_size,
        "image_tokens": base.config.num_image_tokens,
        "image_sizes": sizes or [base.config.vision.image_size],
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
        "load_s": load_s,
        "load_peak_rss_mb": rss_mb()[1],  # the process after loading (before any activation)
        "malloc_tuned": malloc_tuned,
        "compute_dtypes": describe(base) if dev.type == "cpu" else None,
    }
    bw = measure_bandwidth(dev)
    info["bandwidth_gb_s"] = bw
    runs: list[dict[str, Any]] = []
    backends = [b.strip() for b in a.backend.split(",") if b.strip()]
    if set(backends) - {"torch", "onnxruntime", "mlx"}:
        raise SystemExit(f"unknown backend in {a.backend!r}: use torch, onnxruntime and/or mlx")
    for q in quants if "torch" in backends else []:
        if q in floats:
            model, label = base, f"fastvlm {prec}"
        elif q == first_q:
            model, label = base, f"fastvlm {q}"
        elif a.model:
            model = load(
                a.model, device=dev, dtype=dtype, image_size=sizes[0] if sizes else None,
                vision_dtype=a.vision_dtype, prefill_dtype=a.prefill_dtype, quant=q,
            ).model  # fmt: skip
            label = f"fastvlm {q}"
        else:
            model = copy.deepcopy(base)
            quantize_model(model, q)
            if dev.type == "cpu":  # the new quantized layers get the same prefill dtype
                prepare_cpu(model, a.vision_dtype, a.prefill_dtype)
            label = f"fastvlm {q}"
        print(f"[bench] {label} ...", file=sys.stderr, flush=True)
        r = bench_engine(model, processor, a, label, bw)
        if model is base and first_q is None:
            r.update(
                bench_vision_batches(
                    base, [int(x) for x in a.vision_batch.split(",")], base.config.vision.image_size
                )
            )
        elif first_q is None and (a.agreement or (a.agreement is None and not a.shape)):
            r["greedy_agreement_vs_fp32"] = greedy_agreement(
                base, model, processor, a.agreement or 20, 24
            )
        runs.append(r)
        if model is not base:
            del model
            gc.collect()
    for r in _prune_list(a.prune):  # smaller dense models cut from the same weights
        model = prepare_for_device(pruned(base, r), dev)
        label = f"fastvlm {prec} pruned {r:g}"
        print(f"[bench] {label} ...", file=sys.stderr, flush=True)
        runs.append({**bench_engine(model, processor, a, label, bw), "prune_ratio": r})
        del model
        gc.collect()
    for q in quants if "onnxruntime" in backends else []:
        print(f"[bench] onnxruntime {q} (export + run) ...", file=sys.stderr, flush=True)
        runs.append(bench_onnxruntime(base, processor, a, q, bw))
        gc.collect()
    for q in quants if "mlx" in backends else []:
        print(f"[bench] mlx {q} (MLX copy + run) ...", file=sys.stderr, flush=True)
        runs.append(bench_mlx(base, processor, a, q))
        gc.collect()
    for size in sizes[1:]:  # the same weights at another resolution: fewer image tokens
        model = at_resolution(base, size)
        tag = first_q or prec
        print(f"[bench] fastvlm {tag} @{size}px ...", file=sys.stderr, flush=True)
        a2 = argparse.Namespace(**{**vars(a), "concurrency": [1]})
        proc = Processor(model.config, processor.tokenizer)
        runs.append(bench_engine(model, proc, a2, f"fastvlm {tag} @{size}", bw))
    refs: list[dict[str, Any]] = []
    failed = None
    if a.compare == "transformers":
        print("[bench] transformers (child processes) ...", file=sys.stderr, flush=True)
        try:
            refs = bench_transformers(base, a)
        except SystemExit as e:  # still report our own numbers, then fail
            failed = str(e)
            info["transformers_error"] = failed[-2000:]
            print(failed, file=sys.stderr)
    if a.compare == "mlx-vlm":
        print("[bench] mlx-vlm stream_generate (child process) ...", file=sys.stderr, flush=True)
        try:
            refs = bench_mlx_vlm(base, a, None if a.shape else vlm.path)
        except SystemExit as e:
            failed = str(e)
            info["mlx_vlm_error"] = failed[-2000:]
            print(failed, file=sys.stderr)
    report(info, runs, refs)
    result = {"info": info, "runs": runs, "transformers": refs, "ratios": ratios(runs, refs)}
    line = json.dumps(result, default=float)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(line)
    return 1 if failed else 0
