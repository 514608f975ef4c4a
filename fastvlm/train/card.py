"""README.md of a `fastvlm train` output: this run's own facts, never the base model's scores."""

from __future__ import annotations

from pathlib import Path

import torch

from ..dtypes import dtype_name
from ..model_card import write_card
from .config import TrainConfig
from .lora import LoRAConfig


def write_train_card(
    out: Path,
    a: TrainConfig,
    run: dict,
    final: dict,
    rows: int,
    lora: LoRAConfig | None,
    dtype: torch.dtype,
) -> Path:
    if lora is None:
        method = "full fine-tune" + (f" (frozen: {', '.join(a.freeze)})" if a.freeze else "")
    else:
        kind = "QLoRA" if a.qlora else "LoRA"
        method = f"{kind} r={lora.r} alpha={lora.alpha} targets={','.join(lora.targets)}"
        method += ", merged" if a.merge else ", adapter only"
    data = f"{a.shapes} generated shapes scenes (seed {a.data_seed})" if a.shapes else run["data"]
    facts = {
        "base model": a.model or "(embedded demo model)" if not a.init_config
        else f"fresh model from --init-config {a.init_config}",
        "method": method,
        "data": f"{data} ({rows} usable rows)",
        "steps": final["step"],
        "learning rate": f"{a.lr:g} (warm-up {a.warmup}, cosine)",
        "batch": f"{a.batch_size} × grad-accum {a.grad_accum} × {run['world_size']} process(es)",
        "seed": a.seed,
        "final loss": f"{final['loss']} (mean of the last steps)" if final["loss"] is not None
        else "n/a",
        "weights saved as": dtype_name(dtype),
    }  # fmt: skip
    return write_card(out, f"{out.name} (fine-tuned with fastvlm train)", facts)
