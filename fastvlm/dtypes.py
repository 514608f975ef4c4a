"""Which float dtype a model is saved in, and how big the saved parts are.

Design decisions:
* Models are loaded in fp32 (CPU) or a compute dtype, but a derived checkpoint (quantized,
  fine-tuned, merged) should be stored like its source: `load_model` records the checkpoint's
  dominant float dtype as `model.source_dtype`, and `--save-dtype auto` means that dtype.
* Integer tensors (quantized weights) are never cast; float tensors (unquantized layers, scales,
  zero points, biases) all take the save dtype.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .errors import FastVLMError

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPE_CHOICES = ("auto", *SAVE_DTYPES)
SAVE_DTYPE_HELP = (
    "dtype of the saved float weights: auto = the source checkpoint's (fp32 for a model trained "
    "from --init-config), or fp32 / fp16 / bf16"
)
# internal key prefix -> component name used in size reports
COMPONENTS = {"vision_tower.": "vision", "mm_projector.": "projector",
              "language_model.": "llm", "lm_head.": "llm"}  # fmt: skip
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}  # fmt: skip


def dominant_dtype(numel_by_dtype: dict[torch.dtype, int]) -> torch.dtype | None:
    """The float dtype holding the most elements (None when there are no float tensors)."""
    floats = {d: n for d, n in numel_by_dtype.items() if d.is_floating_point}
    return max(floats, key=floats.get) if floats else None


def resolve_save_dtype(choice: str | None, model=None) -> torch.dtype:
    """`--save-dtype` value → torch dtype; auto = the model's recorded source dtype (else fp32)."""
    if choice in (None, "auto"):
        return getattr(model, "source_dtype", None) or torch.float32
    if choice not in SAVE_DTYPES:
        raise FastVLMError(f"--save-dtype takes {', '.join(SAVE_DTYPE_CHOICES)}; got {choice!r}")
    return SAVE_DTYPES[choice]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in SAVE_DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def safetensors_bytes(path: str | Path) -> dict[str, int]:
    """Tensor bytes per component (vision / projector / llm / other) from a safetensors header."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out: dict[str, int] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        name = next((c for p, c in COMPONENTS.items() if key.startswith(p)), "other")
        out[name] = out.get(name, 0) + (end - begin)
    return out


def size_summary(src: Path | None, dst: Path) -> str:
    """Weight bytes of DST (and SRC when it has any) per component, for command summaries."""

    def mb(n: int) -> str:
        return f"{n / 2**20:.2f} MB"

    def parts(folder: Path) -> dict[str, int] | None:
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        files = [f for f in files if not f.name.startswith(("optimizer", "adapter"))]
        if not files:
            return None
        total: dict[str, int] = {}
        for f in files:
            for k, v in safetensors_bytes(f).items():
                total[k] = total.get(k, 0) + v
        total["file"] = sum(f.stat().st_size for f in files)
        return total

    new, old = parts(dst), parts(src) if src is not None else None
    if new is None:
        return ""
    names = [k for k in ("vision", "projector", "llm", "other") if k in new]
    if old is None:
        body = ", ".join(f"{k} {mb(new[k])}" for k in names)
        return f"saved weights: {mb(new['file'])} ({body})"
    body = ", ".join(f"{k} {mb(old.get(k, 0))} → {mb(new[k])}" for k in names)
    return f"weights on disk: {mb(old['file'])} → {mb(new['file'])} ({body})"
