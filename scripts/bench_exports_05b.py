"""Side-by-side CPU table at the FastVLM-0.5B shape (random weights): ONNX export sizes and
ONNX Runtime decode, LiteRT-LM bundle size and decode, and fastvlm's PyTorch engine.

Every measurement runs in its own child process, one after another (peak RSS per job, and no two
heavy jobs share the machine); each child's JSON line is kept as WORK/<step>.json so an
interrupted run resumes where it stopped. No weights are downloaded.

    python scripts/bench_exports_05b.py run WORK --litert-python venv-litert/bin/python \\
        --json benchmarks/exports-0.5b-DATE.json --txt benchmarks/exports-0.5b-DATE.txt

ONNX (`scripts/export_05b.py`) and PyTorch use the same 280-token prompt (15 text tokens, 256
image tokens, 9 text tokens; `fastvlm.bench.workload.prompt_ids`) and one 1024² image. The LiteRT-LM
bundle is the 0.5B decoder with a small vision tower (the 1024-px encoder is not converted here),
timed with `litert_lm.Benchmark` on a text prompt of the same length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT_TOKENS = 280


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux → GB


# ---------------------------------------------------------------------- children
def cmd_torch(a) -> dict:
    """fastvlm's own engine (`fastvlm bench`'s timing code) at one weight precision."""
    from fastvlm.bench.measure import measure_bandwidth
    from fastvlm.bench.torch_engine import bench_engine
    from fastvlm.bench.workload import build_shape
    from fastvlm.device import prepare_for_device
    from fastvlm.processing import Processor
    from fastvlm.quant import quantize_model

    torch.set_num_threads(a.threads)
    model = prepare_for_device(build_shape("0.5b", 1024), "cpu")  # as fastvlm.load does
    if a.quant != "fp32":
        quantize_model(model, a.quant)
    args = argparse.Namespace(max_tokens=a.tokens, concurrency=[1], repeats=a.repeats)
    bw = measure_bandwidth(torch.device("cpu"))
    r = bench_engine(model, Processor(model.config, None), args, f"pytorch {a.quant}", bw)
    keep = ("prompt_tokens", "ttft_s", "prefill_s", "vision_s", "decode_tok_s",
            "decode_tok_s_runs")  # fmt: skip
    return {
        "engine": "pytorch",
        "precision": a.quant,
        "threads": a.threads,
        "generation_tokens": a.tokens,
        **{k: r[k] for k in keep if k in r},
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }


def litert_model(layers: int):
    """0.5B text shape (as `litertlm_shape_check.py`) with a small vision tower."""
    from fastvlm.config import APPLE_VOCAB_ROWS, TINY_VISION, shape
    from fastvlm.model.fastvlm import FastVLMModel

    cfg = shape("0.5b", 128, vision=TINY_VISION, chat_template="apple",
                vocab_size=APPLE_VOCAB_ROWS["0.5b"], num_hidden_layers=layers,
                eos_token_id=151645)  # fmt: skip
    torch.manual_seed(0)
    model = FastVLMModel(cfg)
    with torch.no_grad():  # non-trivial weights everywhere (default init leaves tiny scales)
        for name, w in model.named_parameters():
            scale = w[0].numel() ** 0.5 if w.ndim >= 2 else 10
            w.copy_(torch.randn_like(w) / scale + ("norm" in name))
    return model.eval()


def cmd_litertlm(a) -> dict:
    """Convert the 0.5B decoder to a `.litertlm` bundle, then time it with litert_lm.Benchmark."""
    out = Path(a.out)
    bundle = out / "model.litertlm"
    conv = {}
    if not bundle.exists():
        from fastvlm.export.litertlm import export_litertlm

        tok = ROOT / "fastvlm" / "assets" / "fastvlm-tiny" / "tokenizer.json"
        # the ONNX presets' mix: fp16 vision / embeddings beside a quantized decoder
        half = "fp32" if a.llm == "fp32" else "fp16"
        prec = {"vision": half, "projector": half, "embed": half, "llm": a.llm}
        t0 = time.perf_counter()
        files, _ = export_litertlm(litert_model(a.layers), out, prec, None, tok,
                                   max_len=a.max_len, prefill_lens=a.prefill,
                                   parity=False, log=lambda *_: None)  # fmt: skip
        conv = {"export_s": round(time.perf_counter() - t0, 1),
                "export_peak_rss_gb": round(peak_rss_gb(), 2),
                "files_mb": {k: round(v / 1e6, 1) for k, v in files.items()}}  # fmt: skip
    import litert_lm

    runs = []
    for _ in range(a.repeats):
        info = litert_lm.Benchmark(
            model_path=str(bundle),
            backend=litert_lm.Backend.CPU(thread_count=a.threads),
            prefill_tokens=PROMPT_TOKENS,
            decode_tokens=a.tokens,
            max_num_tokens=a.max_len,
            prompt="Describe the picture in detail. " * 80,
        ).run()
        runs.append(info)
    best = sorted(runs, key=lambda i: i.last_decode_tokens_per_second)[len(runs) // 2]
    return {
        "engine": "litert-lm",
        "precision": f"llm={a.llm}" + ("" if a.llm == "fp32" else ", vision/embed fp16"),
        "threads": a.threads,
        "bundle_mb": round(bundle.stat().st_size / 1e6, 1),
        **conv,
        "init_s": round(best.init_time_in_second, 2),
        "ttft_s": round(best.time_to_first_token_in_second, 3),
        "prompt_tokens": best.last_prefill_token_count,
        "prefill_tok_s": round(best.last_prefill_tokens_per_second, 1),
        "generation_tokens": best.last_decode_token_count,
        "decode_tok_s": round(best.last_decode_tokens_per_second, 2),
        "decode_tok_s_runs": [round(i.last_decode_tokens_per_second, 2) for i in runs],
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }


# ---------------------------------------------------------------------- orchestration
def child(work: Path, name: str, cmd: list[str], log) -> dict | None:
    """Run one step (unless WORK/name.json exists), keep its last JSON line, time it."""
    dest = work / f"{name}.json"
    if dest.exists():
        return json.loads(dest.read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    log(f"[bench] {name}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        log(f"[bench] {name} failed (exit {p.returncode}): {p.stderr[-1500:]}")
        return None
    r = json.loads(lines[-1])
    r["step_wall_s"] = round(time.perf_counter() - t0, 1)
    r["command"] = " ".join(cmd)
    dest.write_text(json.dumps(r) + "\n")
    return r


def cmd_run(a) -> dict:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    py, me, exp = sys.executable, str(Path(__file__).resolve()), str(ROOT / "scripts/export_05b.py")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    steps: dict[str, dict | None] = {}
    for p in a.presets.split(","):
        out = str(work / f"onnx-{p}")
        steps[f"onnx-{p}-export"] = child(
            work,
            f"onnx-{p}-export",
            [py, exp, "export", out, "--precision", p, "--no-parity", "--threads", "2"],
            log,
        )
        steps[f"onnx-{p}-ort"] = child(work, f"onnx-{p}-ort", [
            py, exp, "bench", out, "--threads", str(a.threads), "--tokens", str(a.tokens),
            "--repeats", str(a.repeats)], log)  # fmt: skip
    for q in a.quant.split(","):
        steps[f"pytorch-{q}"] = child(work, f"pytorch-{q}", [
            py, me, "torch", "--quant", q, "--threads", str(a.threads), "--tokens", str(a.tokens),
            "--repeats", str(a.repeats)], log)  # fmt: skip
    if a.litert_python:
        for q in a.litert.split(","):
            steps[f"litertlm-{q}"] = child(work, f"litertlm-{q}", [
                a.litert_python, me, "litertlm", str(work / f"litertlm-{q}"), "--llm", q,
                "--threads", str(a.threads), "--tokens", str(a.tokens),
                "--repeats", str(a.repeats)], log)  # fmt: skip
    # no machine-specific paths in the written files: placeholders for the folders
    names = {sys.executable: "python", str(a.litert_python): "venv-litert/bin/python",
             f"{ROOT}/": "", str(work): "WORK"}  # fmt: skip
    for r in steps.values():
        for k in ("command", "out"):
            if r and k in r:
                for old, new in names.items():
                    r[k] = r[k].replace(old, new)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "versions": versions(a.litert_python),
        "prompt_tokens": PROMPT_TOKENS,
        "generation_tokens": a.tokens,
        "threads": a.threads,
        "steps": steps,
    }


def table(res: dict) -> str:
    """The side-by-side text table of a `run` result."""
    rows = [("step", "size (MB)", "export peak RSS (GB)", "TTFT (s)", "decode tok/s (median)",
             "decode runs", "run peak RSS (GB)")]  # fmt: skip
    steps = res["steps"]
    for name, r in steps.items():
        if name.endswith("-export") or r is None:
            if r is None:
                rows.append((name, "failed", "", "", "", "", ""))
            continue
        size, rss_e = "", ""
        if name.startswith("onnx-"):
            e = steps.get(name.replace("-ort", "-export")) or {}
            size = f"{sum(e.get('files_mb', {}).values()):,.1f}"
            rss_e = e.get("peak_rss_gb", "")
        elif name.startswith("litertlm-"):
            size, rss_e = f"{r['bundle_mb']:,.1f}", r.get("export_peak_rss_gb", "")
        runs = " / ".join(str(x) for x in r.get("decode_tok_s_runs", []))
        rows.append((name, size, str(rss_e), f"{r['ttft_s']:.3g}", f"{r['decode_tok_s']:.3g}",
                     runs, str(r.get("peak_rss_gb", ""))))  # fmt: skip
    w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [f"exports at the FastVLM-0.5B shape (random weights), {res['date']}, "
             f"{res['machine']}", f"prompt {res['prompt_tokens']} tokens, "
             f"{res['generation_tokens']} greedy tokens, {res['threads']} threads; "
             f"versions {res['versions']}", ""]  # fmt: skip
    lines += ["  ".join(str(c).ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    lines += ["", "files (MB):"]
    for name, r in steps.items():
        if r and r.get("files_mb"):
            sizes = ", ".join(f"{k} {v:,.1f}" for k, v in r["files_mb"].items())
            lines.append(f"  {name}: {sizes}")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())  # fmt: skip
    return f"{os.cpu_count()} cores, {cpu}, {platform.machine()}, shared VM"


def versions(litert_python: str | None) -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    if litert_python:
        code = (
            "import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in "
            "('litert-torch', 'ai-edge-litert', 'litert-lm-builder', 'litert-lm-api')}))"
        )
        p = subprocess.run([litert_python, "-c", code], capture_output=True, text=True)
        v.update(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {})
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="every step, one child process each, then the JSON")
    r.add_argument("work", help="scratch folder for the exports and per-step JSON lines")
    r.add_argument("--presets", default="quality,small")
    r.add_argument("--quant", default="fp32,int8,int4")
    r.add_argument("--litert", default="int8,int4")
    r.add_argument("--litert-python", default=None, help="python of the LiteRT virtualenv")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--txt", type=Path, default=None)
    t = sub.add_parser("torch")
    t.add_argument("--quant", default="fp32")
    l = sub.add_parser("litertlm")  # noqa: E741
    l.add_argument("out")
    l.add_argument("--llm", choices=["fp32", "int8", "int4"], default="int8")
    l.add_argument("--layers", type=int, default=24)
    l.add_argument("--max-len", type=int, default=1024)
    l.add_argument("--prefill", type=lambda s: [int(x) for x in s.split(",")], default=[128])
    for s in (t, l):
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--tokens", type=int, default=32)
        s.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.cmd == "run":
        res = cmd_run(a)
        text = json.dumps(res, indent=1)
        if a.json:
            a.json.write_text(text + "\n")
        if a.txt:
            a.txt.write_text(table(res))
        print(table(res))
        return 0
    print(json.dumps(cmd_torch(a) if a.cmd == "torch" else cmd_litertlm(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
