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

from ..errors import FastVLMError

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
        scheme = ", ".join(f"{k}={v}" for k, v in q.items()) if isinstance(q, dict) else str(q)
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
