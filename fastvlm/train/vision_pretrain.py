"""Supervised pre-training of a from-scratch vision tower on shapes scenes (demo model, phase 0).

Why: trained end to end from scratch, the tiny FastViTHD of the demo model learns colours, sizes
and counts from the captions but not shape *kinds*: with the language loss as its only signal it
settles on features that pool colour and area (a linear probe on its features finds kinds
barely above chance) and the captions' kind words stay at chance. The same tower trained directly
to classify kinds learns them (the probe runs are in dev/demo_model/README.md). So, as real VLMs
start from a pre-trained image encoder, the demo model's vision tower is first trained alone to
say which kinds, colours and sizes a scene contains, then `fastvlm train --init-vision` starts the
VLM from it.

Design decisions:
* Targets: one multi-hot vector per image, kinds ∪ colours ∪ sizes present (6 + 6 + 2), binary
  cross-entropy on a linear head over the spatial max of the tower's output (a kind detector
  anywhere in the image must fire, so detectors form at every position; the head is dropped).
* Images come from the same generator and preprocessing (`Processor.pixels`) as the VLM data,
  drawn on the fly (deterministic from `--data-seed`) in `--workers` processes; the tower is in
  whatever form the config says (train form with BatchNorm for the demo model) and is saved in
  that form, so its state dict loads into `fastvlm train --init-config ... --init-vision`.
* AdamW, linear warm-up + cosine decay (the trainer's `lr_at`), bf16 autocast on CUDA.

    python -m fastvlm.train.vision_pretrain --init-config config.json --out vision.safetensors \\
        --steps 500 --batch-size 128 --lr 2e-3 --device cuda --workers 14
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..device import resolve_device
from ..config import FastVLMConfig
from ..model.fastvlm import FastVLMModel
from ..processing import Processor
from .schedule import lr_at
from .shapes import COLORS, KINDS, SIZES, draw_scene, image_rng

LABELS = [*KINDS, *COLORS, *SIZES]


def scene_targets(scene) -> torch.Tensor:
    t = torch.zeros(len(LABELS))
    for s in scene.shapes:
        for v in (s.kind, s.color, s.size):
            t[LABELS.index(v)] = 1.0
    return t


class SceneAttributes(torch.utils.data.Dataset):
    """Image `i` of data seed `seed` → (pixels (3, S, S), multi-hot targets)."""

    def __init__(self, processor, n: int, seed: int) -> None:
        self.processor, self.n, self.seed = processor, n, seed
        self.size = processor.config.vision.image_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img, scene = draw_scene(image_rng(self.seed, i), self.size)
        return self.processor.pixels([img])[0], scene_targets(scene)


def head_logits(tower: nn.Module, head: nn.Linear, px: torch.Tensor) -> torch.Tensor:
    return head(tower(px).amax(dim=(2, 3)))


def evaluate(tower, head, processor, device, n: int = 256, seed: int = 999) -> dict[str, float]:
    """Exact-set accuracy per attribute group on fresh images (another seed)."""
    ds = SceneAttributes(processor, n, seed)
    xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
    was = tower.training
    tower.eval()
    with torch.no_grad():
        pred = head_logits(tower, head, torch.stack(xs).to(device)).float().cpu() > 0
    tower.train(was)
    y = torch.stack(ys) > 0.5
    out = {}
    for name, vals in (("kinds", KINDS), ("colors", COLORS), ("sizes", SIZES)):
        idx = [LABELS.index(v) for v in vals]
        out[name] = (pred[:, idx] == y[:, idx]).all(dim=1).float().mean().item()
    return out


def pretrain(a: argparse.Namespace) -> dict[str, float]:
    device = resolve_device(a.device)
    cfg = FastVLMConfig.from_dict(json.loads(Path(a.init_config).read_text()))
    torch.manual_seed(a.seed)
    model = FastVLMModel(cfg)
    model.init_weights()
    tower = model.vision_tower.to(device).train()
    del model
    head = nn.Linear(cfg.vision.hidden_size, len(LABELS)).to(device)  # the tower's out channels
    processor = Processor(cfg, None)
    ds = SceneAttributes(processor, a.steps * a.batch_size, a.data_seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=a.batch_size, shuffle=False, num_workers=a.workers, drop_last=True,
        prefetch_factor=4 if a.workers else None,
    )  # fmt: skip
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    bar = tqdm(total=a.steps, desc="vision", disable=a.quiet, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step, (px, y) in enumerate(loader):
        if step >= a.steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.warmup, a.lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = head_logits(tower, head, px.to(device, non_blocking=True))
        loss = F.binary_cross_entropy_with_logits(logits.float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        if a.log_every and (step + 1) % a.log_every == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 5)}), file=sys.stderr)
    bar.close()
    acc = evaluate(tower, head, processor, device)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in tower.state_dict().items()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, a.out, metadata={"format": "pt", "accuracy": json.dumps(acc)})
    secs = time.perf_counter() - t0
    shown = json.dumps({k: round(v, 3) for k, v in acc.items()})
    msg = f"vision pre-training: {a.steps} steps in {secs:.0f}s, held-out exact-set accuracy"
    print(f"{msg} {shown} → {a.out}", file=sys.stderr)
    return acc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastvlm.train.vision_pretrain", description=__doc__.split("\n")[0]
    )
    p.add_argument("--init-config", required=True, help="our config.json (vision tower shape)")
    p.add_argument("--out", required=True, help="vision tower weights (.safetensors)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    pretrain(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
