"""Reproduce the shipped demo model `fastvlm/assets/fastvlm-tiny` from nothing.

Steps (each deterministic from its seed):
1. tokenizer: byte-level BPE (vocab ≤ 512) trained on the chat-formatted conversations of 3000
   shapes scenes of data seed 12345 (`fastvlm.train.tokenizer_build`);
2. config: a FastVLM of the real architecture with tiny widths (see `demo_config`), 256 px input
   → 16 image tokens;
3. training (scenes drawn on the fly, vision tower in its multi-branch BatchNorm train form,
   saved fused), one cosine schedule of 1200 steps in two curriculum phases: steps 0-250 on
   single-shape scenes only (`--shapes-max-count 1 --stop-after 250`), then `--resume` on all
   scenes; the vision tower and projector learn at 3x the LLM's rate (`--vision-lr-mult 3`);
4. packaging: weights stored as float16 (loaded as float32 on CPU), tokenizer, README;
5. evaluation: `fastvlm eval --model <asset> --shapes 500 --data-seed 1000` (held-out seed).

    OMP_NUM_THREADS=1 python scripts/make_demo_model.py \
        --work /tmp/demo --out fastvlm/assets/fastvlm-tiny

`--skip-train` packages an existing run in `--work/run1`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# A curriculum in two phases of one schedule (cosine over 1200 steps): single-shape scenes first,
# where colour / kind / size are properties of the whole image, then all scenes (1-4 shapes).
PHASES = [
    ["--shapes", "8000", "--shapes-max-count", "1", "--stop-after", "250"],
    ["--shapes", "100000", "--resume"],
]
TRAIN_ARGS = [
    "--data-seed",
    "0",
    "--batch-size",
    "16",
    "--lr",
    "1e-3",
    "--vision-lr-mult",
    "3",
    "--warmup",
    "50",
    "--weight-decay",
    "0.01",
    "--max-steps",
    "1200",
    "--save-every",
    "100",
    "--log-every",
    "25",
    "--seed",
    "0",
]


def demo_config(vocab_size: int) -> dict:
    from fastvlm.config import FastVLMConfig, TextConfig, VisionConfig

    cfg = FastVLMConfig(
        vision=VisionConfig(
            layers=(1, 1, 2, 1, 1),
            embed_dims=(16, 32, 64, 128, 256),
            image_size=256,
            layer_scale_init_value=0.1,
            inference_mode=False,  # trained in the multi-branch (BatchNorm) form, saved fused
        ),
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=1024,
            rope_theta=10000.0,
            eos_token_id=2,
        ),
        image_token_id=3,
        image_aspect_ratio="pad",
        chat_template="apple",
    )
    return cfg.to_dict()


def build_tokenizer(path: Path) -> int:
    from fastvlm.train.shapes import make_example
    from fastvlm.train.tokenizer_build import build_tokenizer, chat_text

    texts = [
        chat_text(make_example(12345, i, 64)[1]["conversations"], eos=True) for i in range(3000)
    ]
    tok = build_tokenizer(texts, 512)
    tok.save(str(path))
    return tok.get_vocab_size()


def package(run: Path, out: Path, train_s: float | None) -> None:
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(run / "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(run / name, out / name)
    if train_s is not None:
        (out / "train_time.json").write_text(json.dumps({"train_seconds": round(train_s)}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/demo")
    p.add_argument("--out", default="fastvlm/assets/fastvlm-tiny")
    p.add_argument("--skip-train", action="store_true")
    a = p.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    train_s = None
    if not a.skip_train:
        vocab = build_tokenizer(work / "tokenizer.json")
        (work / "config.json").write_text(json.dumps(demo_config(vocab), indent=1))
        t0 = time.time()
        cmd = [
            sys.executable,
            "-m",
            "fastvlm",
            "train",
            "--init-config",
            str(work / "config.json"),
            "--tokenizer",
            str(work / "tokenizer.json"),
            "--output",
            str(work / "run1"),
            *TRAIN_ARGS,
        ]
        for phase in PHASES:
            print(" ".join(cmd + phase), flush=True)
            subprocess.run(cmd + phase, check=True)
        train_s = time.time() - t0
    package(work / "run1", out, train_s)
    print(f"packaged {out}; now evaluate: fastvlm eval --model {out} --shapes 500 --data-seed 1000")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
