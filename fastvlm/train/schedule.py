"""The optimisation schedule: learning rate per step (linear warm-up, cosine decay) and the
AdamW parameter groups (weight decay on matrices only, an optional vision lr factor)."""

from __future__ import annotations

import math

from torch import nn


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, weight_decay: float, vision_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay only on matrices / kernels, and
    with `vision_lr_mult` != 1 the vision tower + projector in groups of their own whose lr is
    the schedule's times `lr_mult` (a from-scratch image side learns slower than the LLM)."""
    vision = {id(p) for m in (model.vision_tower, model.mm_projector) for p in m.parameters()}
    groups: list[dict] = []
    for mult, part in ((1.0, False), (vision_lr_mult, True)):
        if vision_lr_mult == 1.0 and part:
            break
        mine = [
            p
            for p in model.parameters()
            if p.requires_grad and (vision_lr_mult == 1.0 or (id(p) in vision) == part)
        ]
        for decay in (True, False):
            ps = [p for p in mine if (p.ndim >= 2) == decay]
            if ps or not part:
                wd = weight_decay if decay else 0.0
                groups.append({"params": ps, "weight_decay": wd, "lr_mult": mult})
    return groups


def set_lr(optimizer, lr: float) -> None:
    """The schedule's lr for this step, times each group's `lr_mult`."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
