"""`fastvlm train` flags: the parser, and the `TrainConfig` it becomes (`config_from_args`).

Every flag is a `TrainConfig` field of the same name with the same default (a test holds the
two together); the checks of the values live with the config (config.py).
"""

from __future__ import annotations

import argparse
import dataclasses

from ..dtypes import SAVE_DTYPE_CHOICES, SAVE_DTYPE_HELP
from ..errors import FastVLMError
from .config import FREEZE_PARTS, SHAPES_LAYOUTS, TrainConfig
from .lora import DEFAULT_TARGETS

DESCRIPTION = "full fine-tuning, LoRA (or training from a fresh config) on LLaVA-style data."


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes (`--batch-size x`, a missing value) are one FastVLMError line."""

    def error(self, message: str):
        raise FastVLMError(f"{self.prog}: {message}")


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The run a parsed command line describes (every field comes from its flag)."""
    return TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})


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
        choices=SHAPES_LAYOUTS,
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
    q = p.add_argument_group("quantization-aware training")
    q.add_argument(
        "--qat", default=None, metavar="SPEC",
        help="fake-quantize these components while training (int4[-gN], int8 or e.g. "
        "llm=int4-g64,projector=int8, as `fastvlm quantize --quant`); quantize the result after",
    )  # fmt: skip
    return p
