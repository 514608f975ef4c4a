"""Reproduce the shipped demo model `fastvlm/assets/fastvlm-tiny` from nothing.

Steps (each deterministic from its seed):
1. tokenizer: byte-level BPE (vocab ≤ 512) trained on the chat-formatted conversations of 3000
   shapes scenes of data seed 12345 (`fastvlm.train.tokenizer_build`);
2. config: a FastVLM of the real architecture with tiny widths (`demo_config`, `--variant`);
3. phase 0 (`--vision-pretrain N`): the vision tower alone learns which kinds / colours / sizes a
   scene holds (`fastvlm.train.vision_pretrain`) — end to end from scratch it never learns shape
   kinds (see that module's docstring);
4. phases 1-2: one cosine schedule (`--steps`) in two curriculum stages: single-shape scenes for
   `--phase1` steps, then `--resume` on all scenes (1-4 shapes); vision tower in its
   multi-branch BatchNorm train form (saved fused), vision + projector at 3x the LLM's lr;
5. phase 3 (`--finetune-steps N`): the packaged model trained further with the vision tower
   frozen (LLM + projector only) on fresh scenes whose questions come before the caption, or
   without it (`--finetune-layout`, default qa-first): after phases 1-2 captions are exact but
   questions asked on their own are weak (in 60 % of the training rows the caption came
   first, so answers could be copied from it);
6. packaging: weights stored as float16 (loaded as float32 on CPU), tokenizer, the exact
   commands (`train_commands.txt`), training time;
7. evaluation: `fastvlm eval --model <asset> --shapes 500 --data-seed 1000` (held-out seed).

The shipped model (2026-11-30): phases 0-2 on one H200 (scripts/gpu_checks.sh); phase 3 was
tried on the CPU and not kept (questions did not improve, see the model's README):

    python dev/demo_model/make_demo_model.py --work $WORK/demo-w256 \
        --out fastvlm/assets/fastvlm-tiny \
        --variant wide --image-size 256 --device cuda --workers 14 --batch-size 64 --lr 1e-3 \
        --warmup 200 --save-every 1000 --log-every 100 --steps 1500 --phase1 187 \
        --vision-pretrain 400

With no GPU, `--device cpu` runs the same recipe, slowly (hours on 2 cores); `--time-budget S`
sizes `--steps` to S seconds by timing 40 steps first.

`--skip-train` packages an existing run (`--work/run1`, or `run2` with `--finetune-steps`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Vision-tower variants (the text side is the same for all). "v1": the first shipped model;
# "wide": twice the early widths and twice the depth (the kinds / sizes of small shapes need
# more than 16 channels at stride 4), 7.6 M parameters in all, 15 MB as float16.
VARIANTS = {
    "v1": {"layers": (1, 1, 2, 1, 1), "embed_dims": (16, 32, 64, 128, 256)},
    "wide": {"layers": (2, 2, 4, 2, 2), "embed_dims": (32, 64, 128, 256, 256)},
}


def train_commands(a, work: Path) -> list[list[str]]:
    """The `fastvlm train` command lines of the two curriculum phases of one cosine schedule:
    single-shape scenes for the first `--phase1` steps, then all scenes (1-4 shapes)."""
    base = [
        sys.executable, "-m", "fastvlm", "train",
        "--init-config", str(work / "config.json"), "--tokenizer", str(work / "tokenizer.json"),
        "--output", str(work / "run1"),
        "--data-seed", "0", "--batch-size", str(a.batch_size), "--lr", str(a.lr),
        "--vision-lr-mult", "3", "--warmup", str(a.warmup), "--weight-decay", "0.01",
        "--max-steps", str(a.steps), "--save-every", str(a.save_every),
        "--log-every", str(a.log_every), "--seed", "0", "--device", a.device,
        "--workers", str(a.workers),
    ]  # fmt: skip
    if a.vision_pretrain:
        base += ["--init-vision", str(work / "vision.safetensors")]
    return [
        base + ["--shapes", str(max(8000, a.phase1 * a.batch_size)), "--shapes-max-count", "1",
                "--stop-after", str(a.phase1)],
        base + ["--shapes", str(max(100000, a.steps * a.batch_size)), "--resume"],
    ]  # fmt: skip


def demo_config(vocab_size: int, variant: str = "v1", image_size: int = 256) -> dict:
    from fastvlm.config import FastVLMConfig, TextConfig, VisionConfig

    cfg = FastVLMConfig(
        vision=VisionConfig(
            **VARIANTS[variant],
            image_size=image_size,
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
    if (run.parent / "commands.txt").exists():
        shutil.copy2(run.parent / "commands.txt", out / "train_commands.txt")
    if train_s is not None:
        (out / "train_time.json").write_text(json.dumps({"train_seconds": round(train_s)}) + "\n")


def vision_command(a, work: Path) -> list[str]:
    """Phase 0: the vision tower alone learns which kinds / colours / sizes a scene holds."""
    return [
        sys.executable, "-m", "fastvlm.train.vision_pretrain",
        "--init-config", str(work / "config.json"), "--out", str(work / "vision.safetensors"),
        "--steps", str(a.vision_pretrain), "--batch-size", str(a.vision_batch_size),
        "--lr", str(a.vision_lr), "--warmup", "50", "--seed", "0", "--data-seed", "2",
        "--device", a.device, "--workers", str(a.workers), "--log-every", "100",
    ]  # fmt: skip


def finetune_command(a, work: Path) -> list[str]:
    """Phase 3: more steps on fresh scenes (data seed 3) for the LLM + projector, the vision
    tower frozen, starting from the packaged (float16) stage-1 model."""
    return [
        sys.executable, "-m", "fastvlm", "train", "--model", str(work / "stage1"),
        "--freeze", "vision", "--shapes", "100000", "--data-seed", "3",
        "--shapes-layout", a.finetune_layout,
        "--lr", str(a.finetune_lr), "--warmup", "50", "--weight-decay", "0.01",
        "--max-steps", str(a.finetune_steps), "--batch-size", "16", "--workers", "1",
        "--device", a.finetune_device, "--log-every", "100", "--save-every", "300",
        "--output", str(work / "run2"), "--seed", "0",
    ]  # fmt: skip


def run(cmd: list[str], work: Path) -> None:
    """Run one phase, recording its command line in `work/commands.txt` (shipped with the model)."""
    with open(work / "commands.txt", "a") as f:
        f.write(" ".join(cmd[1:]) + "\n")
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fit_steps(a, work: Path) -> None:
    """Time 40 steps of the real configuration, then size the schedule to `--time-budget`."""
    calib = argparse.Namespace(**{**vars(a), "steps": 10_000, "phase1": 40, "save_every": 0,
                                  "log_every": 10})  # fmt: skip
    cmd = train_commands(calib, work)[0]
    cmd[cmd.index("--output") + 1] = str(work / "calibrate")
    t, times = time.time(), []
    proc = subprocess.Popen(cmd + ["--quiet"], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith('{"step"'):
            times.append(time.time())
    proc.wait()
    shutil.rmtree(work / "calibrate", ignore_errors=True)
    if proc.returncode or len(times) < 4:
        raise SystemExit(f"calibration failed (exit {proc.returncode})")
    per_step = (times[-1] - times[0]) / 30  # steps 10..40: past start-up and warm-up
    a.steps = max(200, int(a.time_budget / per_step) // 100 * 100)
    a.phase1 = a.steps // 6
    a.warmup = min(a.warmup, a.phase1)
    print(f"calibration: {per_step * 1000:.0f} ms/step ({time.time() - t:.0f} s) → "
          f"--steps {a.steps} --phase1 {a.phase1}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fastvlm-demo"))
    p.add_argument("--out", default="fastvlm/assets/fastvlm-tiny")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--variant", default="v1", choices=sorted(VARIANTS))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--steps", type=int, default=1200, help="length of the cosine schedule")
    p.add_argument("--phase1", type=int, default=250, help="steps on single-shape scenes")
    p.add_argument(
        "--vision-pretrain",
        type=int,
        default=0,
        help="phase 0: steps of supervised vision pre-training (fastvlm.train.vision_pretrain)",
    )
    p.add_argument("--vision-batch-size", type=int, default=128)
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="phase 3: steps of LLM + projector training (vision frozen) after packaging",
    )
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument(
        "--finetune-layout",
        default="qa-first",
        choices=("mixed", "qa-first", "separate"),
        help="phase 3 conversations (fastvlm train --shapes-layout)",
    )
    p.add_argument("--finetune-device", default="cpu")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument(
        "--time-budget",
        type=float,
        default=0,
        help="seconds: time 40 steps first and set --steps (and --phase1 = steps/6) to fit",
    )
    a = p.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    train_s = None
    if not a.skip_train:
        if not (work / "tokenizer.json").exists():
            build_tokenizer(work / "tokenizer.json")
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(work / "tokenizer.json")).get_vocab_size()
        cfg = demo_config(vocab, a.variant, a.image_size)
        (work / "config.json").write_text(json.dumps(cfg, indent=1))
        t0 = time.time()
        (work / "commands.txt").write_text("")
        if a.vision_pretrain:
            run(vision_command(a, work), work)
        if a.time_budget:
            fit_steps(a, work)  # sets a.steps / a.phase1 before the commands are built
        for cmd in train_commands(a, work):
            run(cmd, work)
        train_s = time.time() - t0
    if a.finetune_steps:
        if not a.skip_train:
            package(work / "run1", work / "stage1", train_s)
            run(finetune_command(a, work), work)
            train_s = time.time() - t0
        package(work / "run2", out, train_s)
    else:
        package(work / "run1", out, train_s)
    print(f"packaged {out}; now evaluate: fastvlm eval --model {out} --shapes 500 --data-seed 1000")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
