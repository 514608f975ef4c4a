"""`fastvlm quantize SRC DST`: quantize a float checkpoint and save it in our format.

The checkpoint is quantized while it is read (`load_model(quant=...)`, tensor by tensor), so
a 7B checkpoint quantizes in about the memory of its quantized weights.

The unquantized parts (embedding, norms, biases, layers int4 cannot take) and the scales are
saved in the source checkpoint's float dtype (`--save-dtype auto`), not the fp32 the model was
loaded in, so the output is smaller than its source; the summary states the sizes on disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..dtypes import SAVE_DTYPE_CHOICES, SAVE_DTYPE_HELP, dtype_name, resolve_save_dtype
from ..dtypes import size_summary
from ..errors import ConfigError, FastVLMError
from ..hub import resolve
from ..model_card import copy_source_files, write_card
from ..weights import load_model, save_checkpoint
from .scheme import GROUP_SIZES, PRESETS, parse_spec, spec_to_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise FastVLMError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastvlm quantize",
        description="Weight-only int8/int4 quantization of a FastVLM checkpoint (our format out).",
    )
    p.add_argument("src", help="float checkpoint: local folder or Hugging Face repo id")
    p.add_argument("dst", help="new output folder")
    p.add_argument(
        "--quant", "-q", default="int4",
        help=f"preset ({', '.join(PRESETS)}) or component=scheme pairs, e.g. "
        "llm=int4-g64,projector=int8,vision=none (schemes: none, int8, int4[-gN][-sym])",
    )  # fmt: skip
    p.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES,
                   help="group size for a bare `int4` (default 128)")  # fmt: skip
    p.add_argument("--save-dtype", choices=SAVE_DTYPE_CHOICES, default="auto",
                   help=SAVE_DTYPE_HELP)  # fmt: skip
    p.add_argument("--trust-pickle", action="store_true", help="allow .bin/.pt pickle weights")
    p.add_argument("--quiet", action="store_true", help="accepted for compatibility (quantizing while loading prints no progress bar)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    schemes = parse_spec(a.quant, a.group_size)  # fail before loading anything
    if not any(s.bits for s in schemes.values()):
        raise ConfigError(f"--quant {a.quant!r} quantizes nothing")
    dst = Path(a.dst)
    if dst.exists() and any(dst.iterdir()):
        print(f"error: {dst} exists and is not empty; choose a new folder", file=sys.stderr)
        return 1
    src = Path(resolve(a.src))
    # Streamed: each float weight is quantized as it is read (never the whole float model).
    model = load_model(
        src, trust_pickle=a.trust_pickle, quant=spec_to_config(schemes), repack=False
    )
    dtype = resolve_save_dtype(a.save_dtype, model)
    summary = model.quant_summary
    save_checkpoint(model.state_dict(), model.config, dst, "fastvlm", dtype=dtype)
    copy_source_files(src, dst)
    write_card(dst, f"{dst.name} (quantized)", {
        "base model": a.src, "quantization": ", ".join(
            f"{k}={v}" for k, v in model.config.quantization.items() if k != "version"
        ),
        "float parts saved as": dtype_name(dtype),
    })  # fmt: skip
    print(summary)
    print(size_summary(src, dst))
    print(f"wrote quantized checkpoint to {dst} (float parts {dtype_name(dtype)})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
