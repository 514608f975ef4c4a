"""`fastvlm train`: full fine-tuning (or training from a fresh config) on LLaVA-style data.

One script for one CPU, one GPU, or many under `torchrun` (DDP; gloo on CPU, nccl on CUDA): the
per-epoch order is a seeded permutation sharded by rank, so every rank and every resume sees the
same order. AdamW + linear warm-up + cosine decay, gradient accumulation and clipping, bf16
autocast where the device has it (fp32 on CPU), optional gradient checkpointing, a progress bar
with loss and tokens/s, and periodic checkpoints in safetensors (weights *and* optimizer state)
that `--resume` continues from, step for step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FastVLMError
from .data import IGNORE, VLMDataset, collate, load_records, shuffled


# ---------------------------------------------------------------------- model setup
def build_model(a: argparse.Namespace, device: torch.device):
    """(model, processor, tokenizer, source folder) from --model or --init-config."""
    from ..config import FastVLMConfig
    from ..hub import resolve
    from ..model.fastvlm import FastVLMModel
    from ..processing import Processor
    from ..tokenization import load_tokenizer
    from ..weights import load_model

    if a.init_config:
        cfg = FastVLMConfig.from_dict(json.loads(Path(a.init_config).read_text()))
        torch.manual_seed(a.seed)
        model = FastVLMModel(cfg).to(device)
        model.init_weights()
        from tokenizers import Tokenizer

        if not a.tokenizer:
            raise FastVLMError("--init-config needs --tokenizer tokenizer.json")
        tok = Tokenizer.from_file(a.tokenizer)
        src = None
    else:
        src = resolve(a.model)
        model = load_model(src, device=device, dtype=torch.float32, trust_pickle=a.trust_pickle)
        tok = load_tokenizer(src)
    return model, Processor(model.config, tok), tok, src


def apply_freeze(model, freeze: list[str]) -> None:
    parts = {"vision": model.vision_tower, "projector": model.mm_projector, "llm": model.language_model}
    for name in freeze:
        if name not in parts:
            raise FastVLMError(f"--freeze takes vision, projector, llm; got {name!r}")
        for p in parts[name].parameters():
            p.requires_grad_(False)
    if "llm" in freeze and not model.config.text.tie_word_embeddings:
        model.lm_head.weight.requires_grad_(False)


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross entropy over labelled positions, and their count."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    n = int((shift_labels != IGNORE).sum())
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE
    )
    return loss, n


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: Path, model, tok, optimizer, state: dict, src: Path | None) -> None:
    """Weights (fused vision form) + config + tokenizer + optimizer + trainer state; atomic."""
    import copy

    from safetensors.torch import save_file

    from ..weights import TOKENIZER_FILES, save_checkpoint as save_weights

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net = model.module if hasattr(model, "module") else model
    if not net.config.vision.inference_mode:  # save the fused form that inference loads
        net = copy.deepcopy(net)
        net.vision_tower.reparameterize()
    save_weights(net.state_dict(), net.config, tmp, "fastvlm")
    if tok is not None:
        tok.save(str(tmp / "tokenizer.json"))
    if src is not None:
        for name in TOKENIZER_FILES:
            if (src / name).exists() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
    if optimizer is not None:
        opt = optimizer.state_dict()
        tensors = {
            f"{i}.{k}": v.contiguous().cpu()
            for i, st in opt["state"].items()
            for k, v in st.items()
            if torch.is_tensor(v)
        }
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {**state, "param_groups": opt["param_groups"]}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_optimizer(folder: Path, optimizer) -> dict:
    from safetensors.torch import load_file

    state = json.loads((folder / "trainer_state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


def latest_checkpoint(out: Path) -> Path | None:
    cks = sorted(out.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return cks[-1] if cks else None


# ---------------------------------------------------------------------- main loop
def train(a: argparse.Namespace) -> Path:
    from .. import api

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = api.resolve_device(a.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    model, processor, tok, src = build_model(a, device)
    if a.resume and (ck := latest_checkpoint(out)) is not None:
        from ..weights import load_model

        model = load_model(ck, device=device, dtype=torch.float32)
        processor.config = model.config
    apply_freeze(model, a.freeze or [])
    if a.gradient_checkpointing:
        model.language_model.gradient_checkpointing = True
    model.train()

    if a.shapes:
        from .shapes_data import shapes_records

        records, report = shapes_records(a.shapes, a.data_seed, model.config.vision.image_size), None
    else:
        records, report = load_records(a.data, a.image_dir)
        if rank == 0:
            print(f"data: {report.summary()}", file=sys.stderr)
    if not records:
        raise FastVLMError("no usable training rows")
    ds = VLMDataset(records, processor, a.max_length)
    per_step = a.batch_size * a.grad_accum * world
    steps_per_epoch = max(1, len(ds) // per_step)
    total = a.max_steps or steps_per_epoch * a.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    step = 0
    if a.resume and (ck := latest_checkpoint(out)) is not None:
        step = load_optimizer(ck, optimizer)["step"]
        if rank == 0:
            print(f"resuming from {ck} at step {step}", file=sys.stderr)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    pad_id = tok.token_to_id("<|endoftext|>") if tok is not None else 0

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=rank != 0 or a.quiet, desc="train", dynamic_ncols=True)
    t_start, tokens_seen = time.perf_counter(), 0
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        order = shuffled(len(ds), a.seed, epoch)[rank::world]
        lr = lr_at(step, total, a.warmup, a.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum, n_sum = 0.0, 0
        for micro in range(a.grad_accum):
            start = (offset * a.grad_accum + micro) * a.batch_size
            batch = collate([ds[i] for i in order[start : start + a.batch_size]], pad_id)
            if batch is None:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = ddp_model(batch["input_ids"], batch.get("pixel_values"))
            loss, n = lm_loss(logits, batch["labels"])
            (loss / a.grad_accum).backward()
            loss_sum += float(loss.detach()) * n
            n_sum += n
            tokens_seen += int(batch["input_ids"].numel())
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tps = tokens_seen / (time.perf_counter() - t_start)
        bar.set_postfix(loss=f"{loss_sum / max(1, n_sum):.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if rank == 0 and a.log_every and step % a.log_every == 0:
            print(json.dumps({"step": step, "loss": round(loss_sum / max(1, n_sum), 5), "lr": lr}), file=sys.stderr, flush=True)
        if rank == 0 and a.save_every and step % a.save_every == 0 and step < total:
            save_checkpoint(out / f"checkpoint-{step}", model, tok, optimizer, {"step": step}, src)
            for old in sorted(out.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))[: -a.keep]:
                shutil.rmtree(old, ignore_errors=True)
    bar.close()
    if rank == 0:
        final = out / "final"
        save_checkpoint(final, model, tok, None, {"step": step}, src)
        for f in final.iterdir():  # the output folder itself is a loadable model
            shutil.copy2(f, out / f.name)
        shutil.rmtree(final)
        skipped = ds.skipped
        if skipped:
            print(f"skipped {len(skipped)} rows at run time, e.g. line {skipped[0][0]}: {skipped[0][1]}", file=sys.stderr)
        print(f"trained {step} steps in {time.perf_counter() - t_start:.0f}s → {out}", file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvlm train", description=__doc__.split("\n")[0])
    src = p.add_argument_group("model")
    src.add_argument("--model", "-m", default=None, help="checkpoint to fine-tune (id or folder)")
    src.add_argument("--init-config", default=None, help="train from scratch: our config.json")
    src.add_argument("--tokenizer", default=None, help="tokenizer.json for --init-config")
    src.add_argument("--trust-pickle", action="store_true")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="LLaVA .json/.jsonl or image,question,answer .csv")
    d.add_argument("--image-dir", default=None, help="image paths are relative to this folder")
    d.add_argument("--shapes", type=int, default=0, help="train on N generated shapes scenes instead")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the generated shapes data")
    d.add_argument("--max-length", type=int, default=2048)
    o = p.add_argument_group("optimisation")
    o.add_argument("--output", "-o", required=True)
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=0)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--lr", type=float, default=2e-5)
    o.add_argument("--warmup", type=int, default=50)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--clip", type=float, default=1.0)
    o.add_argument("--freeze", nargs="*", default=[], help="any of: vision projector llm")
    o.add_argument("--gradient-checkpointing", action="store_true")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto")
    o.add_argument("--save-every", type=int, default=0)
    o.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    o.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    o.add_argument("--log-every", type=int, default=0)
    o.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not (a.model or a.init_config):
        a.model = None  # fine-tune the embedded default
    if not (a.data or a.shapes):
        print("error: give --data FILE (or --shapes N)", file=sys.stderr)
        return 2
    train(a)
    return 0
