"""`fastvlm lora merge BASE ADAPTER OUT`: BASE with ADAPTER folded in, written as a normal model
folder (also what `fastvlm train --lora --merge` does for a QLoRA run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..dtypes import SAVE_DTYPE_CHOICES, SAVE_DTYPE_HELP, resolve_save_dtype, size_summary
from ..errors import FastVLMError
from ..hub import resolve
from ..model_card import write_card
from ..tokenization import load_tokenizer
from ..weights import load_model
from .checkpoint import save_model
from .lora import load_adapter, merge_lora


def merge_to_folder(
    base: str | Path | None,
    adapter: str | Path,
    out: str | Path,
    *,
    trust_pickle: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Load BASE (fp32, CPU), apply + merge ADAPTER, write a normal model folder to OUT with
    its weights in `dtype` (default: BASE's own dtype on disk)."""
    src = resolve(base)
    model = load_model(src, device="cpu", dtype=torch.float32, trust_pickle=trust_pickle)
    cfg = load_adapter(model, adapter)
    merge_lora(model)
    out = save_model(Path(out), model, load_tokenizer(src), src, dtype)
    write_card(out, f"{out.name} (LoRA merged)", {
        "base model": base, "adapter": adapter, "LoRA": f"r={cfg.r} alpha={cfg.alpha}",
    })  # fmt: skip
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvlm lora", description="LoRA adapter tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    m = sub.add_parser("merge", help="fold an adapter into its base model → a normal model folder")
    m.add_argument("base", help="base model (folder or hub id) the adapter was trained on")
    m.add_argument(
        "adapter", help="adapter folder (adapter_model.safetensors + adapter_config.json)"
    )
    m.add_argument("out", help="new output folder")
    m.add_argument("--trust-pickle", action="store_true", help="allow .bin/.pt base weights")
    m.add_argument("--save-dtype", choices=SAVE_DTYPE_CHOICES, default="auto",
                   help=SAVE_DTYPE_HELP)  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command != "merge":
        parser.print_help()
        return 2

    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise FastVLMError(f"{out} exists and is not empty; choose a new folder")
    dtype = None if a.save_dtype == "auto" else resolve_save_dtype(a.save_dtype)
    merge_to_folder(a.base, a.adapter, out, trust_pickle=a.trust_pickle, dtype=dtype)
    print(f"merged {a.adapter} into {a.base} → {out}", file=sys.stderr)
    print(size_summary(resolve(a.base), out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
