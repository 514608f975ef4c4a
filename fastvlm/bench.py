"""`fastvlm bench`: where the time goes, against the hardware limit and against transformers.

Job: for a model (`--model`, default the embedded demo model) or a real-size shape with random
weights (`--shape 0.5b`, no download), report preprocessing, vision encoder, projector, prefill,
TTFT, decode tok/s, aggregate tok/s with N concurrent streams, vision images/s at batch 1 and N,
peak memory and model-bandwidth utilisation (MBU); `--quant fp32,int8,int4` measures each weight
precision in the same run; `--compare transformers` runs transformers' FastVLM on the same
weights and inputs in the same process and prints ratios. Output: a human-readable table, then
ONE JSON object as the last stdout line (`--json FILE` also writes it). `fastvlm bench serve
--url ...` is the client-side load test of a running server (fastvlm/server/loadtest.py).

Design decisions:
* Measure the limit, don't assume it. The bench times a large `torch.sum` over a buffer bigger
  than the caches (best of several) to get this machine's read bandwidth, and computes the bytes a
  decode step must read (every decoder/lm_head weight — quantized sizes for int8/int4 — one
  embedding row and the KV cache). roofline tok/s = bandwidth ÷ bytes per token; MBU = measured
  decode tok/s ÷ roofline. On a shared machine the bandwidth itself moves (this project's CPU
  VM read 48-84 GB/s within one minute), so each run's roofline uses the best of the probes
  taken right before and right after its own timed request (`bandwidth_gb_s` in the run; the
  start-of-bench reading is in `info` and `mbu_at_start_bandwidth`), and each configuration is
  timed `--repeats` times (default 3): the run with the median decode speed is reported, all of
  them are in the JSON (`decode_tok_s_runs`, `ttft_s_runs`, `mbu_runs`).
* Everything our side goes through the public engine (`Engine.submit` → stats), the same path as
  `FastVLM.describe`; every step is synchronised (`Stats` timing reads tokens on the host).
* transformers is measured as a user would run it: `generate()` with the default dynamic cache
  and with `cache_implementation="static"`; TTFT = `generate(max_new_tokens=1)`, decode =
  (T(1 + n) − T(1)) / n over the same prompt. Its weights are ours, saved in the transformers
  format (so both run identical math; parity is tested in tests/test_parity.py).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    # FastVLM-0.5B: FastViTHD (defaults) + Qwen2-0.5B with the padded 152000-row vocabulary.
    "0.5b": dict(
        vocab_size=152000,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1e6,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    "1.5b": dict(
        vocab_size=152000,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        rope_theta=1e6,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
}
# A tiny shape for smoke tests of the bench itself (and of --compare) in seconds.
SHAPES["tiny"] = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1e6,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
)
TINY_VISION = dict(layers=(1, 1, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128))
PROMPT_TEXT = (15, 9)  # text tokens before / after the image run (≈ the real chat template)


# ---------------------------------------------------------------------- helpers
def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


@contextmanager
def _timer(out: dict, key: str, device: torch.device):
    t0 = _now(device)
    yield
    out[key] = _now(device) - t0


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def measure_bandwidth(device: torch.device, mb: int = 512, repeats: int = 7) -> float:
    """Best-of-N read bandwidth (GB/s) of a reduction over `mb` MB (far beyond the caches)."""
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        t0 = _now(device)
        x.sum()
        best = min(best, _now(device) - t0)
    del x
    return mb * 2**20 / best / 1e9


def decode_bytes_per_token(model, context: int) -> int:
    """Bytes one decode step reads: decoder + lm_head weights (as stored: quantized sizes count),
    one embedding row, and the KV cache of `context` tokens."""
    lm = model.language_model
    n = sum(t.numel() * t.element_size() for t in [*lm.layers.parameters(), *lm.layers.buffers()])
    n += sum(t.numel() * t.element_size() for t in lm.norm.parameters())
    head = model.lm_head
    n += sum(t.numel() * t.element_size() for t in [*head.parameters(), *head.buffers()])
    emb = lm.embed_tokens.weight
    n += emb.shape[1] * emb.element_size()
    cfg = model.config.text
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    kv = (
        2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * head_dim
        * context
        * emb.element_size()
    )
    return n + kv


# ---------------------------------------------------------------------- model setup
def build_shape(shape: str, image_size: int, seed: int = 0):
    from .config import FastVLMConfig, TextConfig, VisionConfig
    from .model.fastvlm import FastVLMModel

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: choose from {sorted(SHAPES)}")
    vision = TINY_VISION if shape == "tiny" else {}
    cfg = FastVLMConfig(
        vision=VisionConfig(image_size=image_size, **vision),
        text=TextConfig(**SHAPES[shape]),
        image_token_id=SHAPES[shape]["vocab_size"] - 1 if shape == "tiny" else 151646,
        image_aspect_ratio="pad",
        chat_template="hf",
    )
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = FastVLMModel(cfg)
    model = model.to_empty(device="cpu")
    model.init_weights()
    # Random weights make garbage text; scale the residual writes down so activations stay finite
    # (inf/NaN or denormals would change the speed being measured).
    with torch.no_grad():
        for layer in model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
        for name, p in model.vision_tower.named_parameters():
            if "layer_scale" in name:
                p.fill_(1e-2)
    return model.eval()


def prompt_ids(cfg, seed: int = 0, text: tuple[int, int] = PROMPT_TEXT) -> list[int]:
    """Benchmark prompt for a FastVLMConfig: text, one image's placeholders, text."""
    g = torch.Generator().manual_seed(seed)
    hi = min(cfg.text.vocab_size, 151643)  # ordinary (non-special) ids of Qwen2
    words = torch.randint(4, hi, (sum(text),), generator=g).tolist()
    words = [w + 1 if w == cfg.image_token_id else w for w in words]
    return words[: text[0]] + [cfg.image_token_id] * cfg.num_image_tokens + words[text[0] :]


def random_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8))


def at_resolution(model, size: int):
    """A shallow copy of `model` sharing every weight, configured for `size`² inputs."""
    import dataclasses

    cfg = model.config
    m = copy.copy(model)  # FastViTHD is resolution-agnostic (convs + attention): only the config
    m.config = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=size))
    m.config.validate()
    return m


# ---------------------------------------------------------------------- our engine
def bench_engine(model, processor, args, label: str, bandwidth: float) -> dict[str, Any]:
    from .engine.engine import Engine
    from .engine.sampling import SamplingParams

    dev = model.lm_head.weight.device
    out: dict[str, Any] = {"name": label}
    size = model.config.vision.image_size
    img = random_image(size, seed=1)
    with _timer(out, "preprocess_s", dev):
        px = processor.pixels([img]).to(dev)
    gpu = dev.type != "cpu"
    with torch.inference_mode():
        # Warm-up: on CPU a small image (allocator); on a GPU the real shape (kernel selection,
        # cuDNN autotuning and lazy init would otherwise land in the timed call).
        model.embed_images(px if gpu or size <= 64 else px[:1, :, :64, :64])
        with _timer(out, "vision_s", dev):
            feats = model.encode_images(px)
        with _timer(out, "projector_s", dev):
            model.mm_projector(feats)
    ids = prompt_ids(model.config, seed=2)
    n_new = args.max_tokens
    eng = Engine(
        model,
        slots=max(args.concurrency),
        max_len=len(ids) + n_new + 64,
        cuda_graphs=not getattr(args, "no_cuda_graphs", False),
        compile=getattr(args, "compile", False),
        fused_decode=not getattr(args, "no_fused_decode", False),
    )
    p = SamplingParams(max_tokens=n_new, ignore_eos=True)

    def captures() -> int:
        return eng.graphs.captures if eng.graphs is not None else 0

    def timed():
        """(handle, graphs captured during it, best bandwidth probe right around it)."""
        eng.submit(ids[: PROMPT_TEXT[0]], None, SamplingParams(max_tokens=4)).result()  # warm-up
        before = captures()
        bw_before = measure_bandwidth(dev, repeats=3)
        h = eng.submit(ids, px, p)
        h.result()
        bw = max(bw_before, measure_bandwidth(dev, repeats=3))
        return h, captures() - before, bw

    if gpu:  # the whole request once with another image: kernels, allocator, CUDA graphs
        eng.submit(ids, processor.pixels([random_image(size, seed=99)]).to(dev), p).result()

    def measure():
        h, new, bw = timed()
        for _ in range(2):  # a graph captured inside the timed run (another slot window): again
            if not new:
                break
            eng.reset_caches()
            h, new, bw = timed()
        return h, bw

    # `--repeats` timed requests (each recomputing vision and prefill); the run with the median
    # decode speed is reported, with its own bandwidth probes (all runs are in the JSON).
    samples = []
    for i in range(max(1, getattr(args, "repeats", 1))):
        if i:
            eng.reset_caches()
        samples.append(measure())
    bpt = decode_bytes_per_token(model, len(ids) + n_new // 2)
    order = sorted(range(len(samples)), key=lambda i: samples[i][0].stats.decode_tps)
    h, bw_run = samples[order[len(order) // 2]]
    out["prompt_tokens"] = len(ids)
    out["image_tokens"] = h.stats.image_tokens
    out["ttft_s"] = h.stats.prefill_s
    out["prefill_s"] = h.stats.prefill_s - h.stats.vision_s
    out["decode_tok_s"] = h.stats.decode_tps
    out["bytes_per_token"] = bpt
    out["bandwidth_gb_s"] = bw_run  # around this run's timed request (see the docstring)
    out["roofline_tok_s"] = out["bandwidth_gb_s"] * 1e9 / bpt
    out["mbu"] = out["decode_tok_s"] / out["roofline_tok_s"]
    out["mbu_at_start_bandwidth"] = out["decode_tok_s"] * bpt / (bandwidth * 1e9)
    if len(samples) > 1:
        out["decode_tok_s_runs"] = [x.stats.decode_tps for x, _ in samples]
        out["ttft_s_runs"] = [x.stats.prefill_s for x, _ in samples]
        out["mbu_runs"] = [x.stats.decode_tps * bpt / (b * 1e9) for x, b in samples]
    for n in args.concurrency:
        if n > 1:
            for _ in range(3):  # until no graph was captured inside the measurement
                before = captures()
                out[f"aggregate_tok_s@{n}"] = _concurrent(eng, model, px, n, n_new)
                if captures() == before:
                    break
    if dev.type == "cpu":
        out["fused_decode"] = eng._plan is not None  # the decode steps ran as one C call each
    out["peak_rss_mb"] = peak_rss_mb()
    if dev.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        if eng.graphs is not None:
            g = eng.graphs.stats()
            out["cuda_graphs"] = g["graphs"] if g["disabled_reason"] is None else "failed"
            if g["disabled_reason"]:
                print(f"[bench] CUDA graphs failed: {g['disabled_reason']}", file=sys.stderr)
    return out


def _concurrent(eng, model, px, n: int, n_new: int) -> float:
    """Aggregate decode tok/s of `n` streams decoding together (measured once all have started)."""
    from .engine.sampling import SamplingParams

    # The same image for all (one encode), different text per stream.
    hs = [
        eng.submit(
            prompt_ids(model.config, seed=10 + i),
            px,
            SamplingParams(max_tokens=n_new, ignore_eos=True),
        )
        for i in range(n)
    ]
    while not all(h.output_ids for h in hs):
        eng.step()
    dev = model.lm_head.weight.device
    t0, k0 = _now(dev), sum(len(h.output_ids) for h in hs)
    while all(not h.done for h in hs):
        eng.step()
    t1, k1 = _now(dev), sum(len(h.output_ids) for h in hs)
    eng.run_until_done()
    return (k1 - k0) / (t1 - t0)


def bench_vision_batches(
    model, batches: list[int], image_size: int, repeats: int = 2
) -> dict[str, float]:
    """Images/s of the vision tower + projector per batch size. Every batch size encodes the
    same distinct images (as many as the largest batch; smaller ones in several calls; the
    last call may be short), and the rounds
    interleave the batch sizes, so a descheduled call or a change in the shared machine's memory
    bandwidth does not decide the comparison; the best of `repeats` rounds counts (on a GPU
    after a warm-up call of each shape)."""
    dev = model.lm_head.weight.device
    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    n_img = max(batches)
    with torch.inference_mode():
        px = torch.rand(n_img, 3, image_size, image_size, generator=g)
        px = px.to(dev, model.lm_head.weight.dtype)  # the same distinct images for every size
        if dev.type != "cpu":
            for b in batches:
                model.embed_images(px[:b])  # warm-up: kernel selection / autotuning
        for _ in range(repeats):
            for b in batches:
                t0 = _now(dev)
                for i in range(0, n_img, b):
                    model.embed_images(px[i : i + b])
                rate = n_img / (_now(dev) - t0)
                key = f"vision_images_s@{b}"
                out[key] = max(out.get(key, 0.0), rate)
    return out


# ---------------------------------------------------------------------- ONNX Runtime
def bench_onnxruntime(model, processor, args, quant: str, bandwidth: float) -> dict[str, Any]:
    """Export `model` (decoder at `quant`: fp32 | int8 | int4) and time generation on ORT."""
    from .engine.generate import Stats
    from .engine.sampling import SamplingParams
    from .export.onnx import export_onnx
    from .export.ort_backend import OrtModel, ort_generate_step

    llm = {"fp32": "fp32", "none": "fp32", "float32": "fp32"}.get(quant, quant)
    out: dict[str, Any] = {"name": f"onnxruntime {llm}"}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_onnx(model, tmp, f"llm={llm}", None, parity=False, log=lambda *a, **k: None)
        out["export_s"] = time.perf_counter() - t0
        files = {f.name: f.stat().st_size for f in (Path(tmp) / "onnx").iterdir()}
        out["decoder_mb"] = sum(v for k, v in files.items() if k.startswith("decoder")) / 2**20
        ort = OrtModel(Path(tmp), torch.get_num_threads())
        size = model.config.vision.image_size
        px = processor.pixels([random_image(size, seed=1)])
        ids = prompt_ids(model.config, seed=2)
        p = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        list(ort_generate_step(ort, ids[: PROMPT_TEXT[0]], None, SamplingParams(max_tokens=2)))
        st = Stats()
        list(ort_generate_step(ort, ids, px, p, stats=st))
        del ort
    out["vision_s"] = st.vision_s
    out["ttft_s"] = st.prefill_s
    out["prefill_s"] = st.prefill_s - st.vision_s
    out["decode_tok_s"] = st.decode_tps
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ---------------------------------------------------------------------- transformers
def bench_transformers(model, args) -> list[dict[str, Any]]:
    """transformers' FastVlmForConditionalGeneration on the same weights and prompt.

    It runs in child processes (`--transformers-python`, default this interpreter), so it gets
    its own clean allocator and, if needed, its own torch (transformers' FastVLM needs timm ->
    torchvision). Two runs: glibc's default allocator — transformers as its users run it — and
    with `tune_malloc()` (our allocator setting, which speeds up its vision tower as much as ours).
    """
    import subprocess

    from .weights import save_checkpoint

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model.state_dict(), model.config, Path(tmp), fmt="hf")
        dev = model.lm_head.weight.device
        spec = {
            "max_tokens": args.max_tokens,
            "threads": torch.get_num_threads(),
            "device": str(dev),
            "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
        }
        (Path(tmp) / "bench_spec.json").write_text(json.dumps(spec))
        root = str(Path(__file__).resolve().parent.parent)
        for tuned in (False, True):
            env = {**__import__("os").environ, "FASTVLM_MALLOC_TUNE": "1" if tuned else "0"}
            env["PYTHONPATH"] = root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd = [args.transformers_python or sys.executable, "-m", "fastvlm.bench",
                   "--transformers-worker", tmp]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"transformers run failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["name"] = "transformers" + (" +malloc" if tuned else "")
            results.append(r)
    return results


def transformers_worker(folder: str) -> int:
    """Child process of `bench_transformers`: load the HF checkpoint, time it, print JSON."""
    from .engine.allocator import tune_malloc

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
    from .weights import load_config

    ours = load_config(Path(folder))
    size = ours.vision.image_size
    ids = torch.tensor([prompt_ids(ours, seed=2)], device=dev)
    px = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    n = spec["max_tokens"]
    with torch.inference_mode():
        hf.model.get_image_features(
            pixel_values=px if dev.type != "cpu" else px[:, :, :64, :64]
        )  # warm-up, as ours
        t0 = _now(dev)
        hf.model.get_image_features(pixel_values=px)
        out["vision_s"] = _now(dev) - t0

        def gen(k: int, net=hf, **kw) -> float:
            t0 = _now(dev)
            o = net.generate(
                input_ids=ids, pixel_values=px, max_new_tokens=k, min_new_tokens=k,
                do_sample=False, **kw,
            )  # fmt: skip
            dt = _now(dev) - t0
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


# ---------------------------------------------------------------------- agreement
def greedy_agreement(base, quant, processor, n_images: int, max_tokens: int) -> float:
    """Fraction of greedy tokens equal to the fp32 model's (position by position, shapes scenes)."""
    from .engine.engine import Engine
    from .engine.sampling import SamplingParams
    from .train import shapes

    same = total = 0
    e_base, e_q = Engine(base, slots=1, max_len=512), Engine(quant, slots=1, max_len=512)
    for i in range(n_images):
        img, _ = shapes.draw_scene(shapes.image_rng(1000, i))
        content = [
            {"type": "image", "image": img},
            {"type": "text", "text": shapes.DESCRIBE_PROMPT},
        ]
        msgs = [{"role": "user", "content": content}]
        ids, px, _ = processor(msgs)
        p = SamplingParams(max_tokens=max_tokens)
        a = e_base.submit(ids, px, p).result()
        b = e_q.submit(ids, px, p).result()
        m = min(len(a), len(b))
        same += sum(x == y for x, y in zip(a[:m], b[:m], strict=True))
        total += max(len(a), len(b))
    return same / max(total, 1)


# ---------------------------------------------------------------------- main
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


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
    p.add_argument("--max-tokens", type=int, default=32, help="decode tokens per measurement")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed requests per configuration; the median-decode run is reported (default 3)",
    )
    p.add_argument("--concurrency", default="1,4", help="comma list of concurrent streams")
    p.add_argument("--vision-batch", default="1,8", help="comma list of vision batch sizes")
    p.add_argument("--compare", choices=["transformers"], default=None)
    p.add_argument(
        "--transformers-python",
        default=None,
        help="interpreter for the transformers runs (e.g. a venv with timm + torchvision)",
    )
    p.add_argument("--transformers-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--backend",
        default="torch",
        help="comma list: torch (our engine) and/or onnxruntime (exported graphs, same "
        "weights, each --quant precision for the decoder)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    for part, default in (("vision", "fp32"), ("prefill", None)):
        p.add_argument(
            f"--{part}-dtype", default=default, choices=["fp32", "bf16", "auto"],
            help=f"CPU compute dtype of the {part} (see fastvlm.fast_cpu)",
        )  # fmt: skip
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
    p.add_argument("--json", dest="json_out", default=None, help="also write the JSON here")
    return p


def _quant_list(text: str) -> list[str]:
    sep = ";" if ";" in text or "=" in text else ","
    return [q.strip() for q in text.split(sep) if q.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # client-side load test of a running server
        from .server.loadtest import main as loadtest

        return loadtest(argv[1:])
    a = build_parser().parse_args(argv)
    if a.transformers_worker:
        return transformers_worker(a.transformers_worker)
    if a.threads:
        torch.set_num_threads(a.threads)
    from .api import load, resolve_device, resolve_dtype
    from .engine.allocator import tune_malloc

    malloc_tuned = tune_malloc()  # before any big allocation; transformers shares it (same run)
    from .processing import Processor
    from .fast_cpu import describe, prepare_cpu
    from .quant import quantize_model

    dev = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, dev)
    prec = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    concurrency = sorted({int(x) for x in a.concurrency.split(",")} | {1})
    a.concurrency = concurrency
    sizes = [int(x) for x in a.image_size.split(",")] if a.image_size else []
    t0 = time.perf_counter()
    if a.shape:
        base = build_shape(a.shape, sizes[0] if sizes else 1024).to(dev, dtype)
        if dev.type == "cpu":
            base.vision_tower.use_channels_last()  # as fastvlm.load does on CPU
            prepare_cpu(base, a.vision_dtype, a.prefill_dtype)
        processor = Processor(base.config, None)
        source = f"shape {a.shape} (random weights)"
    else:
        vlm = load(
            a.model, device=dev, dtype=dtype, image_size=sizes[0] if sizes else None,
            vision_dtype=a.vision_dtype, prefill_dtype=a.prefill_dtype,
        )  # fmt: skip
        if getattr(vlm, "backend", "torch") != "torch":  # bench loads the torch weights itself
            from .errors import ConfigError

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
        "malloc_tuned": malloc_tuned,
        "compute_dtypes": describe(base) if dev.type == "cpu" else None,
    }
    bw = measure_bandwidth(dev)
    info["bandwidth_gb_s"] = bw
    runs: list[dict[str, Any]] = []
    quants = _quant_list(a.quant)
    backends = [b.strip() for b in a.backend.split(",") if b.strip()]
    if set(backends) - {"torch", "onnxruntime"}:
        raise SystemExit(f"unknown backend in {a.backend!r}: use torch and/or onnxruntime")
    for q in quants if "torch" in backends else []:
        if q in ("fp32", "none", "float32", prec):
            model, label = base, f"fastvlm {prec}"
        else:
            model = copy.deepcopy(base)
            quantize_model(model, q)
            if dev.type == "cpu":
                prepare_cpu(model, a.vision_dtype, a.prefill_dtype)  # the new layers too
            label = f"fastvlm {q}"
        print(f"[bench] {label} ...", file=sys.stderr, flush=True)
        r = bench_engine(model, processor, a, label, bw)
        if model is base:
            r.update(
                bench_vision_batches(
                    base, [int(x) for x in a.vision_batch.split(",")], base.config.vision.image_size
                )
            )
        elif a.agreement or (a.agreement is None and not a.shape):
            r["greedy_agreement_vs_fp32"] = greedy_agreement(
                base, model, processor, a.agreement or 20, 24
            )
        runs.append(r)
        if model is not base:
            del model
            gc.collect()
    for q in quants if "onnxruntime" in backends else []:
        print(f"[bench] onnxruntime {q} (export + run) ...", file=sys.stderr, flush=True)
        runs.append(bench_onnxruntime(base, processor, a, q, bw))
        gc.collect()
    for size in sizes[1:]:  # the same weights at another resolution: fewer image tokens
        model = at_resolution(base, size)
        print(f"[bench] fastvlm {prec} @{size}px ...", file=sys.stderr, flush=True)
        a2 = argparse.Namespace(**{**vars(a), "concurrency": [1]})
        proc = Processor(model.config, processor.tokenizer)
        runs.append(bench_engine(model, proc, a2, f"fastvlm {prec} @{size}", bw))
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
    report(info, runs, refs)
    result = {"info": info, "runs": runs, "transformers": refs, "ratios": ratios(runs, refs)}
    line = json.dumps(result, default=float)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(line)
    return 1 if failed else 0


def ratios(runs: list[dict], refs: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    fp = next((r for r in runs if r["name"].split()[-1] in ("fp32", "bf16", "fp16")), None)
    for r in runs:
        if fp is not None and r is not fp and "@" not in r["name"]:
            if not r["name"].startswith("onnxruntime"):
                base = fp["name"].split()[-1]
                out[f"{r['name']} decode / {base} decode"] = r["decode_tok_s"] / fp["decode_tok_s"]
        for k in [k for k in r if k.startswith("aggregate_tok_s@")]:
            out[f"{r['name']} {k} / 1 stream"] = r[k] / r["decode_tok_s"]
    for r in runs:
        if r["name"].startswith("onnxruntime "):
            q = r["name"].split()[1]
            mine = next((x for x in runs if x["name"] in (f"fastvlm {q}",)), None)
            if mine is not None:
                out[f"fastvlm {q} decode / onnxruntime {q} decode"] = (
                    mine["decode_tok_s"] / r["decode_tok_s"]
                )
                out[f"fastvlm {q} ttft / onnxruntime {q} ttft"] = mine["ttft_s"] / r["ttft_s"]
    for ref in refs:
        t = ref["name"]
        for r in runs:
            if r["name"].startswith("onnxruntime"):
                continue
            out[f"{r['name']} ttft / {t} default ttft"] = r["ttft_s"] / ref["ttft_s"]
            best = max(ref["decode_tok_s"], ref["decode_static_tok_s"])
            out[f"{r['name']} decode / {t} best decode"] = r["decode_tok_s"] / best
            out[f"{r['name']} vision / {t} vision (time)"] = (
                r["vision_s"] + r["projector_s"]
            ) / ref["vision_s"]
    return out


def report(info: dict, runs: list[dict], refs: list[dict]) -> None:
    print(
        f"fastvlm bench — {info['source']}, {info['image_size']} px ({info['image_tokens']} "
        f"image tokens), {info['device']}, {info['threads']} threads, torch {info['torch']}"
    )
    print(f"measured read bandwidth: {info['bandwidth_gb_s']:.1f} GB/s")
    keys: list[str] = []
    for r in runs + refs:
        keys += [k for k in r if k != "name" and k not in keys and not isinstance(r[k], list)]
    cols = [r["name"] for r in runs + refs]
    w = max(len(k) for k in keys) + 2
    print("".ljust(w) + "".join(c.rjust(22) for c in cols))
    for k in keys:
        vals = [r.get(k, "") for r in runs + refs]
        print(k.ljust(w) + "".join(_fmt(v).rjust(22) for v in vals))
    rs = ratios(runs, refs)
    if rs:
        print("ratios:")
        for k, v in rs.items():
            print(f"  {k}: {v:.2f}")


if __name__ == "__main__":
    sys.exit(main())
