"""Up-front checks of `fastvlm train` flags: every bad value is one `FastVLMError` naming the flag,
raised before a model is loaded or a folder written (never a traceback minutes into a run).

Design decisions:
* One declarative table of numeric bounds (`BOUNDS`) instead of per-flag `if`s, so a new flag
  gets its check by adding a row; NaN / inf are refused for every float flag.
* Checks that need the model (LoRA targets, a quantized checkpoint) or the data (warm-up longer
  than the run) live in `check_model_config` / `check_schedule`, called as soon as those are known.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..dtypes import SAVE_DTYPE_CHOICES, SAVE_DTYPE_HELP
from ..errors import FastVLMError
from .lora import DEFAULT_TARGETS

DESCRIPTION = "full fine-tuning, LoRA (or training from a fresh config) on LLaVA-style data."
FREEZE_PARTS = ("vision", "projector", "llm")
DEFAULT_WARMUP = 50
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")

# flag attribute -> (lowest allowed, lowest is exclusive?, highest allowed or None, what it is)
BOUNDS: dict[str, tuple[float, bool, float | None, str]] = {
    "batch_size": (1, False, None, "rows per micro-batch"),
    "grad_accum": (1, False, None, "micro-batches per step"),
    "epochs": (1, False, None, "passes over the data"),
    "max_steps": (0, False, None, "0 = epochs decide"),
    "stop_after": (0, False, None, "0 = run to the end"),
    "save_every": (0, False, None, "0 = no periodic checkpoints"),
    "keep": (1, False, None, "checkpoints to keep"),
    "log_every": (0, False, None, "0 = no JSON log lines"),
    "warmup": (0, False, None, "warm-up steps"),
    "workers": (0, False, None, "data-loading processes, 0 = inline"),
    "max_length": (1, False, None, "tokens per row"),
    "lr": (0, False, None, "learning rate; 0 keeps the weights"),
    "weight_decay": (0, False, None, "AdamW weight decay"),
    "vision_lr_mult": (0, False, None, "vision lr factor"),
    "clip": (0, False, None, "gradient-norm clip, 0 = off"),
    "shapes": (0, False, None, "generated scenes"),
    "shapes_max_count": (1, False, None, "shapes per scene"),
    "lora_r": (1, False, None, "adapter rank"),
    "lora_alpha": (0, True, None, "adapter scale numerator"),
    "lora_dropout": (0, False, 1, "dropout probability, below 1"),
}


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes (`--batch-size x`, a missing value) are one FastVLMError line."""

    def error(self, message: str):
        raise FastVLMError(f"{self.prog}: {message}")


def _flag(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def check_train_args(a: argparse.Namespace) -> None:
    """Raise FastVLMError for the first flag whose value cannot give a working run."""
    for attr, (lo, lo_open, hi, what) in BOUNDS.items():
        v = getattr(a, attr, None)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise FastVLMError(f"{_flag(attr)} must be a finite number ({what}), got {v}")
        if v < lo or (lo_open and v == lo) or (hi is not None and v >= hi):
            rng = f"{'>' if lo_open else '>='} {lo:g}"
            rng += f" and < {hi:g}" if hi is not None else ""
            raise FastVLMError(f"{_flag(attr)} must be {rng} ({what}), got {v:g}")
    if a.max_steps and a.warmup is not None and a.warmup > a.max_steps:
        raise FastVLMError(
            f"--warmup {a.warmup} is longer than the run (--max-steps {a.max_steps}): "
            "the learning rate would never reach --lr"
        )
    if a.stop_after and a.max_steps and a.stop_after > a.max_steps:
        raise FastVLMError(f"--stop-after {a.stop_after} is past --max-steps {a.max_steps}")
    bad = [f for f in a.freeze or [] if f not in FREEZE_PARTS]
    if bad:
        raise FastVLMError(f"--freeze takes any of {', '.join(FREEZE_PARTS)}; got {bad[0]!r}")
    if a.model and a.init_config:
        raise FastVLMError("give --model (fine-tune) or --init-config (from scratch), not both")
    if a.data and a.shapes:
        raise FastVLMError("give --data FILE or --shapes N, not both")
    if a.data:
        data = Path(a.data)
        if not data.is_file():
            what = "is a folder, not a file" if data.is_dir() else "not found"
            raise FastVLMError(f"--data {data}: {what}")
        if data.suffix.lower() not in DATA_SUFFIXES:
            raise FastVLMError(
                f"--data {data}: unsupported file type {data.suffix!r} "
                f"(use {', '.join(DATA_SUFFIXES)})"
            )
    out = Path(a.output)
    if a.model and Path(a.model).exists() and Path(a.model).resolve() == out.resolve():
        raise FastVLMError("--output must be a new folder, not the --model folder itself")
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise FastVLMError(f"--output {out}: {parent} is a file, not a folder")
    if a.image_dir and not Path(a.image_dir).is_dir():
        raise FastVLMError(f"--image-dir {a.image_dir} is not a folder")
    for attr in ("init_config", "tokenizer", "init_vision"):
        v = getattr(a, attr, None)
        if v and not Path(v).is_file():
            raise FastVLMError(f"{_flag(attr)} {v}: file not found")
    if a.init_vision and not a.init_config:
        raise FastVLMError("--init-vision only applies with --init-config")
    targets = [t for x in a.lora_targets or [] for t in x.split(",") if t]
    if (a.lora or a.qlora) and not (targets or a.lora_projector or a.lora_vision):
        raise FastVLMError("--lora-targets is empty: name at least one Linear layer to adapt")
    if a.resume and getattr(a, "overwrite", False):
        raise FastVLMError(
            "--resume continues the run in --output, --overwrite starts over: pick one"
        )
    if getattr(a, "force", False) and not a.resume:
        raise FastVLMError("--force only applies with --resume")


def check_model_config(cfg, model_arg: str | None) -> None:
    """Refuse checkpoints that training cannot update (weight-only quantized Linears)."""
    q = getattr(cfg, "quantization", None)
    if q:
        items = q.items() if isinstance(q, dict) else []
        scheme = ", ".join(f"{k}={v}" for k, v in items if k != "version") or str(q)
        raise FastVLMError(
            f"cannot train a quantized model ({model_arg}: {scheme}): use the fp16/fp32 source "
            "it was quantized from (or --qlora, which quantizes the float model itself)"
        )


def check_schedule(a: argparse.Namespace, total: int) -> None:
    """Checks that need the number of steps (known once the data is loaded); an unset --warmup
    becomes DEFAULT_WARMUP steps, or a tenth of a shorter run (the lr must reach --lr)."""
    if a.warmup is None:
        a.warmup = min(DEFAULT_WARMUP, total // 10)
    if a.warmup > total:
        raise FastVLMError(
            f"--warmup {a.warmup} is longer than the run ({total} steps): lower --warmup or "
            "train longer (--epochs / --max-steps)"
        )
    if a.stop_after and a.stop_after > total:
        raise FastVLMError(
            f"--stop-after {a.stop_after} is past the end of the run ({total} steps)"
        )


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fastvlm train", description=DESCRIPTION)
    src = p.add_argument_group("model")
    src.add_argument("--model", "-m", default=None, help="checkpoint to fine-tune (id or folder)")
    src.add_argument("--init-config", default=None, help="train from scratch: our config.json")
    src.add_argument("--tokenizer", default=None, help="tokenizer.json for --init-config")
    src.add_argument(
        "--init-vision",
        default=None,
        help="with --init-config: start the vision tower from these weights (.safetensors, "
        "e.g. from python -m fastvlm.train.vision_pretrain)",
    )
    src.add_argument("--trust-pickle", action="store_true")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="LLaVA .json/.jsonl or image,question,answer .csv")
    d.add_argument("--image-dir", default=None, help="image paths are relative to this folder")
    d.add_argument("--shapes", type=int, default=0, help="train on N generated shapes scenes")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the generated shapes data")
    d.add_argument(
        "--shapes-max-count",
        type=int,
        default=4,
        help="only scenes with at most this many shapes (a curriculum stage; default 4 = all)",
    )
    d.add_argument(
        "--shapes-layout",
        choices=("mixed", "qa-first", "separate"),
        default="mixed",
        help="generated scenes' conversations: mixed = caption + 1-3 questions (caption first in "
        "60%%); qa-first = up to 5 questions, then the caption; separate = the caption alone "
        "(1/3) or 1-4 questions without it, so answers come from the image",
    )
    d.add_argument("--max-length", type=int, default=2048)
    o = p.add_argument_group("optimisation")
    o.add_argument("--output", "-o", required=True)
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=0)
    o.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop after this step, leaving a checkpoint to --resume (staged schedules)",
    )
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--lr", type=float, default=2e-5)
    o.add_argument("--warmup", type=int, default=None,
                   help="linear warm-up steps (default 50, or a tenth of a shorter run)")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument(
        "--vision-lr-mult",
        type=float,
        default=1.0,
        help="learning rate of the vision tower and projector = --lr times this (default 1)",
    )
    o.add_argument("--clip", type=float, default=1.0)
    o.add_argument("--freeze", nargs="*", default=[], choices=FREEZE_PARTS,
                   help="any of: vision projector llm")  # fmt: skip
    o.add_argument("--gradient-checkpointing", action="store_true")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto")
    o.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data-loading processes (decode / draw images ahead of the step; default 0 = inline)",
    )
    o.add_argument("--save-every", type=int, default=0)
    o.add_argument("--keep", type=int, default=2, help="checkpoints to keep (>= 1)")
    o.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    o.add_argument("--force", action="store_true",
                   help="with --resume: continue even if the checkpoint's run settings differ")
    o.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty --output (removes its old checkpoints)")
    o.add_argument("--save-dtype", choices=SAVE_DTYPE_CHOICES, default="auto",
                   help=SAVE_DTYPE_HELP)  # fmt: skip
    o.add_argument("--log-every", type=int, default=0)
    o.add_argument("--quiet", action="store_true")
    lo = p.add_argument_group("LoRA (freezes the model, trains low-rank adapters)")
    lo.add_argument("--lora", action="store_true", help="train a LoRA adapter")
    lo.add_argument("--lora-r", type=int, default=8, help="adapter rank")
    lo.add_argument("--lora-alpha", type=float, default=16.0, help="scale = alpha / r")
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument(
        "--lora-targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="NAME",
        help="language-model Linear names to adapt (space or comma separated)",
    )  # fmt: skip
    lo.add_argument("--lora-projector", action="store_true", help="also adapt the projector")
    lo.add_argument("--lora-vision", action="store_true", help="also adapt vision attention")
    lo.add_argument("--qlora", action="store_true", help="LoRA over a 4-bit base (CUDA)")
    lo.add_argument("--merge", action="store_true", help="also write the merged model to OUT")
    return p
