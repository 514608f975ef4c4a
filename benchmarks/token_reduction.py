"""TTFT per `tokens_per_image` setting (token reduction), reference decoder, batch 1.

    python benchmarks/token_reduction.py --model demo            # embedded demo model, 256 px
    python benchmarks/token_reduction.py --model 0.5b-shape      # FastVLM-0.5B shape, random
                                                                 # weights, 1024 px (no download)

For each setting it runs `generate_step(..., max_tokens=1)` `--repeats` times after one warm-up
round (settings interleaved round-robin, so load drift on a shared machine hits all alike) and
reports medians of the time to first token (vision encoder + pooling + projector + prefill),
of the vision time alone, and of their per-run difference (the LLM prefill, which is what token
reduction shrinks). Prints a Markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from fastvlm.engine.generate import Stats, generate_step
from fastvlm.engine.sampling import SamplingParams


def load(name: str):
    """(model, input ids builder) for the demo model or a random 0.5B-shaped model."""
    if name == "demo":
        import fastvlm

        vlm = fastvlm.load(device="cpu")
        msgs = vlm.describe_messages(["examples/shapes3.png"], "Describe this image.")

        def build(k: int):
            ids, px, _ = vlm.processor(msgs, tokens_per_image=k)
            return ids, px

        return vlm.model, build
    from fastvlm.config import FastVLMConfig, TextConfig, VisionConfig
    from fastvlm.model.fastvlm import FastVLMModel

    text = TextConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True,
        max_position_embeddings=32768,
    )  # fmt: skip
    cfg = FastVLMConfig(vision=VisionConfig(image_size=1024), text=text, image_token_id=151646)
    torch.manual_seed(0)
    model = FastVLMModel(cfg).eval()
    px = torch.rand(1, 3, 1024, 1024)
    prefix, suffix = list(range(100, 115)), list(range(200, 215))  # ~system/user text + reply

    def build(k: int):
        return prefix + [cfg.image_token_id] * k + suffix, px

    return model, build


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["demo", "0.5b-shape"], default="demo")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fastvlm.engine.allocator import tune_malloc

    tune_malloc()  # as fastvlm.load() and fastvlm bench do on CPU (big vision activations)
    model, build = load(a.model)
    native = model.config.num_image_tokens
    settings = [s * s for s in range(math.isqrt(native), 0, -1)]
    if len(settings) > 4:  # 256, 144, 64, 16 for the 16 × 16 grid
        settings = [native, 144, 64, 16]
    inputs = {k: build(k) for k in settings}
    ttft: dict[int, list[float]] = {k: [] for k in settings}
    vis: dict[int, list[float]] = {k: [] for k in settings}
    for i in range(a.repeats + 1):  # settings interleaved, so machine drift hits all alike
        for k in settings:
            ids, px = inputs[k]
            st = Stats()
            t0 = time.perf_counter()
            with torch.inference_mode():
                list(generate_step(model, ids, px, SamplingParams(max_tokens=1), stats=st,
                                   tokens_per_image=k))  # fmt: skip
            if i:  # the first round warms up
                ttft[k].append(time.perf_counter() - t0)
                vis[k].append(st.vision_s)
    rows = [
        {
            "tokens_per_image": k,
            "prompt_tokens": len(inputs[k][0]),
            "ttft_ms": round(1000 * statistics.median(ttft[k]), 1),
            "vision_ms": round(1000 * statistics.median(vis[k]), 1),
            "llm_ms": round(1000 * statistics.median(map(float.__sub__, ttft[k], vis[k])), 1),
        }
        for k in settings
    ]
    print(f"model {a.model}, {a.threads} thread(s), median of {a.repeats}")
    print("| tokens_per_image | prompt tokens | TTFT ms | vision ms | TTFT − vision ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens_per_image']} | {r['prompt_tokens']} | {r['ttft_ms']} | "
              f"{r['vision_ms']} | {r['llm_ms']} |")  # fmt: skip
    print(json.dumps({"model": a.model, "threads": a.threads, "rows": rows}))


if __name__ == "__main__":
    main()
