"""Convert a random-weight FastVLM with the FastVLM-0.5B *text* shape (vocab 151936, hidden 896,
14 / 2 heads, MLP 4864, RoPE 1e6, tied head) and a small vision tower to the LiteRT-LM graphs,
then compare greedy tokens of the interpreter loop with PyTorch on an image prompt.

    venv-litert/bin/python scripts/litertlm_shape_check.py --layers 24 --llm int8

No weights are downloaded; run it in the LiteRT virtualenv (README "Export").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fastvlm.config import APPLE_VOCAB_ROWS, TINY_VISION, shape
from fastvlm.export.litertlm import convert_parts
from fastvlm.export.litertlm_run import InterpreterVLM, torch_greedy
from fastvlm.model.fastvlm import FastVLMModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--llm", choices=["fp32", "int8", "int4"], default="int8")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=16)
    a = p.parse_args()
    cfg = shape("0.5b", 128, vision=TINY_VISION, chat_template="apple",
                vocab_size=APPLE_VOCAB_ROWS["0.5b"], num_hidden_layers=a.layers,
                eos_token_id=151645)  # fmt: skip
    torch.manual_seed(0)
    model = FastVLMModel(cfg)
    with torch.no_grad():  # non-trivial weights everywhere (default init leaves tiny scales)
        for name, w in model.named_parameters():
            w.copy_(
                torch.randn_like(w) / (w[0].numel() ** 0.5 if w.ndim >= 2 else 10)
                + ("norm" in name)
            )
    model.eval()
    prec = {"vision": "fp32", "projector": "fp32", "embed": "fp32", "llm": a.llm}
    with tempfile.TemporaryDirectory() as td:
        t0 = time.perf_counter()
        parts = convert_parts(model, Path(td), prec, a.max_len, [32, 128])
        sizes = {k: f"{v.stat().st_size / 1e6:.1f} MB" for k, v in parts.items()}
        print(f"converted in {time.perf_counter() - t0:.0f} s: {sizes}")
        run = InterpreterVLM(parts["decoder"], parts["embedder"], parts["vision"])
        g = torch.Generator().manual_seed(1)
        px = torch.rand(1, 3, 128, 128, generator=g)
        text_ids = torch.randint(4, 150000, (60,), generator=g).tolist()
        ids = text_ids[:2] + [cfg.image_token_id] * cfg.num_image_tokens + text_ids[2:]
        ref = torch_greedy(model, ids, px, a.tokens, set())
        got = run.greedy(ids, cfg.image_token_id, px.permute(0, 2, 3, 1).numpy(), a.tokens, set())
        same = next((i for i, (x, y) in enumerate(zip(ref, got, strict=True)) if x != y), len(ref))
        print(f"pytorch {ref}\nlitert  {got}\nidentical prefix {same}/{len(ref)}")


if __name__ == "__main__":
    main()
