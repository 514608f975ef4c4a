"""Knowledge distillation: a student (a pruned teacher, or a fresh smaller config) learns from a
teacher's next-token distributions on the answer tokens, optionally its hidden states, and —
for unlabelled images — from answers the teacher writes (sequence-level distillation).

Design decisions:
* Logit KD is KL(teacher_T ‖ student_T)·T² summed over the *labelled* (answer) positions only,
  mixed with the ordinary cross entropy: `loss = α·KD + (1−α)·CE`, each divided by the step's
  answer-token count (the normalisation `fastvlm train` uses), so α = 0 is plain fine-tuning on
  the same batches — the no-teacher baseline the tests compare against.
* Hidden-state matching compares the final decoder states at answer positions (MSE); when the
  widths differ a linear map student→teacher is learned alongside and thrown away after.
* Sequence-level targets are appended to a JSONL file (LLaVA rows) one line per (image,
  prompt) as the teacher writes them, so an interrupted run resumes where it stopped and the
  file is ordinary training data for `fastvlm train` as well.
* Data parallel exactly like `fastvlm train` (torchrun, gloo/nccl, one gradient all-reduce
  per step, the teacher replicated on every rank). The student's BatchNorm layers stay in eval
  mode: their running statistics are weights the teacher's features were made with, and
  per-micro-batch statistics would make the result depend on how a batch is split.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FastVLMError
from ..train.data import IGNORE
from ..train import distributed
from ..train.schedule import lr_at
from .data import batches as make_batches

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclass(slots=True)
class DistillConfig:
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    temperature: float = 2.0
    alpha: float = 0.9  # weight of the KD term; 0 = plain cross entropy (no teacher)
    hidden_weight: float = 0.0  # weight of hidden-state MSE (0 = off)
    clip: float = 1.0
    seed: int = 0
    max_length: int | None = None
    log_every: int = 0
    quiet: bool = False

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise FastVLMError("--steps and --batch-size must be >= 1")
        if self.temperature <= 0:
            raise FastVLMError(f"--temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise FastVLMError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.hidden_weight < 0:
            raise FastVLMError(f"--hidden-weight must be >= 0, got {self.hidden_weight}")


def check_pair(teacher, student) -> None:
    """The two must share a tokenizer and the image-token convention (KL over the same vocab)."""
    t, s = teacher.config, student.config
    if t.text.vocab_size != s.text.vocab_size or t.image_token_id != s.image_token_id:
        raise FastVLMError(
            f"teacher and student must share a tokenizer: vocab {t.text.vocab_size} vs "
            f"{s.text.vocab_size}, image token {t.image_token_id} vs {s.image_token_id}"
        )
    if t.vision.image_size != s.vision.image_size:
        raise FastVLMError(
            f"teacher and student read different image sizes ({t.vision.image_size} vs "
            f"{s.vision.image_size} px): use one --image-size for both"
        )


def forward_hidden(model, input_ids, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), final decoder states (B, T, D)) in one pass."""
    embeds = model.embed_images(pixel_values) if pixel_values is not None else None
    x = model.embed(input_ids, embeds)
    pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    h = model.language_model(x, pos)
    return model.lm_head(h), h


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Σ over answer positions of KL(softmax(t/T) ‖ softmax(s/T))·T² (next-token shift)."""
    sel = labels[:, 1:] != IGNORE
    s = student_logits[:, :-1][sel].float() / temperature
    t = teacher_logits[:, :-1][sel].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature**2


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    sl = logits[:, :-1].float()
    return F.cross_entropy(
        sl.reshape(-1, sl.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
        reduction="sum",
    )


def hidden_loss(hs: torch.Tensor, ht: torch.Tensor, labels: torch.Tensor, proj) -> torch.Tensor:
    sel = labels[:, 1:] != IGNORE
    a = hs[:, :-1][sel].float()
    b = ht[:, :-1][sel].float()
    if proj is not None:
        a = proj(a)
    return F.mse_loss(a, b, reduction="sum") / b.shape[-1]


def distill(
    teacher,
    student,
    records: Sequence,
    processor,
    cfg: DistillConfig,
    *,
    pad_id: int = 0,
    history: list | None = None,
) -> nn.Module:
    """Train `student` in place against `teacher` on `records`; returns the student.
    `history` (a list) receives each step's mean total loss per answer token."""
    from tqdm import tqdm

    cfg.check()
    check_pair(teacher, student)
    rank, world = distributed.world()
    device = student.lm_head.weight.device
    teacher.eval().requires_grad_(False)
    student.train()
    for m in student.modules():  # BN statistics are part of the weights: no per-batch drift
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    proj = None
    if cfg.hidden_weight > 0 and teacher.config.text.hidden_size != student.config.text.hidden_size:
        torch.manual_seed(cfg.seed)
        d_s, d_t = student.config.text.hidden_size, teacher.config.text.hidden_size
        proj = nn.Linear(d_s, d_t).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    extra = list(proj.parameters()) if proj is not None else []
    if world > 1:
        distributed.broadcast_params(params + extra)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2] + extra, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    stream = make_batches(
        records, processor, cfg.batch_size, seed=cfg.seed, pad_id=pad_id,
        max_length=cfg.max_length, rank=rank, world=world,
    )  # fmt: skip
    bar = tqdm(total=cfg.steps, desc="distill", disable=cfg.quiet or rank != 0, dynamic_ncols=True)
    for step in range(cfg.steps):
        lr = lr_at(step, cfg.steps, cfg.warmup, cfg.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        b = {k: v.to(device) for k, v in next(stream).items()}
        ids, px, labels = b["input_ids"], b.get("pixel_values"), b["labels"]
        n = float((labels[:, 1:] != IGNORE).sum())
        if world > 1:  # answer tokens of the whole step, all ranks
            n = distributed.all_reduce_sum(n, device)
        n_tok = max(1.0, n)
        s_logits, s_hidden = forward_hidden(student, ids, px)
        loss = (1 - cfg.alpha) * ce_loss(s_logits, labels)
        if cfg.alpha > 0 or cfg.hidden_weight > 0:
            with torch.no_grad():
                t_logits, t_hidden = forward_hidden(teacher, ids, px)
            if cfg.alpha > 0:
                loss = loss + cfg.alpha * kd_loss(s_logits, t_logits, labels, cfg.temperature)
            if cfg.hidden_weight > 0:
                loss = loss + cfg.hidden_weight * hidden_loss(s_hidden, t_hidden, labels, proj)
        (loss / n_tok).backward()
        if world > 1:
            distributed.all_reduce_grads(params + extra)
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params + extra, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach()) / n_tok
        if history is not None:
            history.append(value)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        if rank == 0 and cfg.log_every and (step + 1) % cfg.log_every == 0:
            print(json.dumps({"step": step + 1, "loss": round(value, 5)}), file=sys.stderr)
    bar.close()
    return student.eval()


# ---------------------------------------------------------------------- sequence-level KD
def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FastVLMError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FastVLMError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _done_keys(cache: Path) -> set[tuple[str, str]]:
    """(image, prompt) pairs already in the cache; a torn last line (killed mid-write) is
    dropped so the pair is generated again."""
    done: set[tuple[str, str]] = set()
    if not cache.exists():
        return done
    good = []
    for line in cache.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            done.add((row["image"], row["prompt"]))
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    cache.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return done


def write_targets(
    vlm, images: Sequence[Path], prompts: Sequence[str], cache: Path, *,
    max_tokens: int = 64, progress: bool = True,
) -> int:  # fmt: skip
    """Let the teacher answer every (image, prompt); append LLaVA rows to `cache` (JSONL).
    Pairs already there are skipped (resumable). Returns how many rows were written now."""
    from tqdm import tqdm

    cache.parent.mkdir(parents=True, exist_ok=True)
    done = _done_keys(cache)
    todo = [(str(p.resolve()), q) for p in images for q in prompts]
    todo = [k for k in todo if k not in done]
    written = 0
    with open(cache, "a", encoding="utf-8") as f:
        for image, prompt in tqdm(todo, desc="teacher", disable=not progress, dynamic_ncols=True):
            answer = vlm.describe(image, prompt, max_tokens=max_tokens).strip()
            row = {
                "image": image, "prompt": prompt,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{prompt}"},
                    {"from": "gpt", "value": answer},
                ],
            }  # fmt: skip
            f.write(json.dumps(row) + "\n")
            f.flush()  # one complete line per pair: a kill loses at most the current one
            written += 1
    return written
