"""Our side: the torch backend (`TorchBackend.submit` → a Generation's stats) at batch 1 and N
streams, vision batches, and greedy agreement of a quantized model with the float one. The
N-stream and CUDA-graph columns read the backend's engine: they measure that engine itself."""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..backends.torch import TorchBackend
from ..engine.sampling import SamplingParams
from ..tokenization import generation_limits
from .measure import decode_bytes_per_token, measure_bandwidth, now, timer
from .memory import BandwidthProbe, interleaved_decode, rss_mb, weight_mb
from .workload import PROMPT_TEXT, prompt_ids, random_image


def bench_engine(model, processor, args, label: str, bandwidth: float) -> dict[str, Any]:
    dev = model.lm_head.weight.device
    out: dict[str, Any] = {"name": label}
    size = model.config.vision.image_size
    img = random_image(size, seed=1)
    with timer(out, "preprocess_s", dev):
        px = processor.pixels([img]).to(dev)
    gpu = dev.type != "cpu"
    with torch.inference_mode():
        # Warm-up: on CPU a small image (allocator); on a GPU the real shape (kernel selection,
        # cuDNN autotuning and lazy init would otherwise land in the timed call).
        model.embed_images(px if gpu or size <= 64 else px[:1, :, :64, :64])
        with timer(out, "vision_s", dev):
            feats = model.encode_images(px)
        with timer(out, "projector_s", dev):
            model.mm_projector(feats)
    ids = prompt_ids(model.config, seed=2)
    n_new = args.max_tokens
    backend = TorchBackend(
        model,
        eos_ids=[],  # timed requests ignore EOS: a fixed number of tokens
        engine_options=dict(
            slots=max(args.concurrency),
            max_len=len(ids) + n_new + 64,
            cuda_graphs=not getattr(args, "no_cuda_graphs", False),
            compile=getattr(args, "compile", False),
            fused_decode=not getattr(args, "no_fused_decode", False),
        ),
    )
    eng = backend.engine
    p = SamplingParams(max_tokens=n_new, ignore_eos=True)

    def captures() -> int:
        return eng.graphs.captures if eng.graphs is not None else 0

    def timed():
        """(generation, graphs captured during it, best bandwidth probe right around it)."""
        list(backend.submit(ids[: PROMPT_TEXT[0]], None, SamplingParams(max_tokens=4)))  # warm-up
        before = captures()
        bw_before = measure_bandwidth(dev, repeats=3)
        h = backend.submit(ids, px, p)
        list(h)
        bw = max(bw_before, measure_bandwidth(dev, repeats=3))
        return h, captures() - before, bw

    if gpu:  # the whole request once with another image: kernels, allocator, CUDA graphs
        list(backend.submit(ids, processor.pixels([random_image(size, seed=99)]).to(dev), p))

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
    if getattr(args, "interleave", 8):  # the steadier MBU: probes between the decode steps
        eng.reset_caches()
        probe = BandwidthProbe(dev)
        out.update(interleaved_decode(eng, ids, px, p, probe, bpt, args.interleave))
        del probe
    for n in args.concurrency:
        if n > 1:
            for _ in range(3):  # until no graph was captured inside the measurement
                before = captures()
                out[f"aggregate_tok_s@{n}"] = _concurrent(eng, model, px, n, n_new)
                if captures() == before:
                    break
    if dev.type == "cpu":
        out["fused_decode"] = getattr(eng.runner.decoder, "plan", None) is not None  # the decode steps ran as one C call each
    out["peak_rss_mb"] = rss_mb()[1]
    out.update({f"weights_{k}_mb": v for k, v in weight_mb(model).items()})
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
    t0, k0 = now(dev), sum(len(h.output_ids) for h in hs)
    while all(not h.done for h in hs):
        eng.step()
    t1, k1 = now(dev), sum(len(h.output_ids) for h in hs)
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
                t0 = now(dev)
                for i in range(0, n_img, b):
                    model.embed_images(px[i : i + b])
                rate = n_img / (now(dev) - t0)
                key = f"vision_images_s@{b}"
                out[key] = max(out.get(key, 0.0), rate)
    return out


def greedy_agreement(base, quant, processor, n_images: int, max_tokens: int) -> float:
    """Fraction of greedy tokens equal to the fp32 model's (position by position, shapes scenes)."""
    from ..train import shapes

    same = total = 0
    opts = {"slots": 1, "max_len": 512}
    eos, _ = generation_limits(base.config.text.eos_token_id, None)  # the config's, as an Engine
    e_base = TorchBackend(base, eos_ids=eos, engine_options=opts)
    e_q = TorchBackend(quant, eos_ids=eos, engine_options=opts)
    for i in range(n_images):
        img, _ = shapes.draw_scene(shapes.image_rng(1000, i))
        content = [
            {"type": "image", "image": img},
            {"type": "text", "text": shapes.DESCRIBE_PROMPT},
        ]
        msgs = [{"role": "user", "content": content}]
        ids, px, _ = processor(msgs)
        p = SamplingParams(max_tokens=max_tokens)
        a, b = list(e_base.submit(ids, px, p)), list(e_q.submit(ids, px, p))
        m = min(len(a), len(b))
        same += sum(x == y for x, y in zip(a[:m], b[:m], strict=True))
        total += max(len(a), len(b))
    return same / max(total, 1)
