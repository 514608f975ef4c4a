"""`fastvlm train`: full fine-tuning, LoRA (or training from a fresh config) on LLaVA-style data.

One script for one CPU, one GPU, or many under `torchrun` (gloo on CPU, nccl on CUDA): the
per-epoch order is a seeded permutation sharded by rank, so every rank and every resume sees the
same order. AdamW + linear warm-up + cosine decay, gradient accumulation and clipping, bf16
autocast where the device has it (fp32 on CPU), optional gradient checkpointing, a progress bar
with loss and tokens/s, and periodic checkpoints that `--resume` continues from, step for step.

Design decisions:
* The loss of a step is the *sum* of next-token losses over the step's labelled tokens divided by
  their count over all micro-batches and ranks, so a step's gradient is the same however the
  batch is split into `--grad-accum` micro-batches and processes (up to BatchNorm in a trained
  vision tower, which normalises each micro-batch by its own statistics).
* Data parallelism is one bucketed all-reduce (sum) of the gradients per optimizer step, not the
  DDP wrapper: a rank whose micro-batch was skipped (bad image) just contributes nothing instead
  of hanging DDP's backward hooks, and accumulation needs no `no_sync`. The price is no overlap
  of communication with the backward pass.
* Checkpoints (`OUT/checkpoint-N/`) are the exact training state: the weights as trained (train
  form of the vision tower when it was built so; never fused mid-run) or, with LoRA, only the
  adapter; plus the AdamW state of the trainable parameters (safetensors) and `trainer_state.json`.
  Dropout is re-seeded from (seed, step, rank) every step, so a resumed run repeats the
  uninterrupted one. Weights are saved in `--save-dtype` (auto = the source's, see
  checkpoint.py); each checkpoint records the run's settings, and `--resume` refuses one made by
  a different run (run_config.py). Flags are checked before anything is loaded (args.py).
* `--vision-lr-mult` puts the vision tower + projector in AdamW groups of their own whose lr is
  the schedule's times the factor (a from-scratch image side learns slower than the LLM);
  `--shapes-max-count` restricts generated shapes scenes to at most k shapes (curriculum stages,
  chained with `--stop-after` / `--resume` over one schedule).
* Frozen BatchNorm layers (frozen vision tower, any LoRA run) stay in eval mode: their running
  statistics are part of the base weights and must not drift.

What `--output OUT` holds at the end:
* full fine-tune: OUT is a model folder (fused vision tower, config, tokenizer):
  `fastvlm.load(OUT)`.
* `--lora` / `--qlora`: `OUT/adapter/` (adapter_model.safetensors + adapter_config.json, which
  records r, alpha, targets and the base model). With `--merge`, OUT is *also* the merged full
  model, `fastvlm.load(OUT)`, identical to `fastvlm lora merge BASE OUT/adapter MERGED`. Without
  it nothing heavy is written: merge later, or keep the small adapter next to its base.
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
from torch import nn

from ..errors import FastVLMError
from .data import IGNORE, VLMDataset, load_records
from .loader import micro_batches
from ..dtypes import resolve_save_dtype, size_summary
from .args import build_parser, check_model_config, check_schedule, check_train_args
from .card import write_train_card
from .checkpoint import (
    OPTIMIZER_FILE,
    checkpoints,
    load_optimizer,
    restore_weights,
    save_checkpoint,
    save_model,
)
from .lora import (
    LoRAConfig,
    apply_lora,
    merge_lora,
    merge_to_folder,
    require_qlora,
    save_adapter,
)
from .run_config import check_resume, describe_run, prepare_output

__all__ = ["OPTIMIZER_FILE", "build_parser", "save_model", "save_checkpoint", "main", "train"]


# ---------------------------------------------------------------------- model setup
def build_model(a: argparse.Namespace, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, processor, tokenizer, source folder) from --model or --init-config."""
    from ..config import FastVLMConfig
    from ..hub import resolve
    from ..model.fastvlm import FastVLMModel
    from ..processing import Processor
    from ..tokenization import load_tokenizer
    from ..weights import load_config, load_model

    if a.init_config:
        if not a.tokenizer:
            raise FastVLMError("--init-config needs --tokenizer tokenizer.json")
        from tokenizers import Tokenizer

        try:
            cfg = FastVLMConfig.from_dict(json.loads(Path(a.init_config).read_text()))
            cfg.validate()
        except (ValueError, TypeError, KeyError) as e:
            raise FastVLMError(f"--init-config {a.init_config}: not a usable config ({e})") from e
        try:  # the tokenizers library raises its own exception type for a bad file
            tok = Tokenizer.from_file(a.tokenizer)
        except Exception as e:  # noqa: BLE001
            raise FastVLMError(f"--tokenizer {a.tokenizer}: not a tokenizer.json ({e})") from e
        torch.manual_seed(a.seed)
        model = FastVLMModel(cfg).to(device=device, dtype=dtype)
        model.init_weights()
        if a.init_vision:  # a pre-trained tower (train.vision_pretrain)
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                sd = load_file(a.init_vision)
            except (SafetensorError, OSError) as e:
                raise FastVLMError(f"--init-vision {a.init_vision}: not safetensors ({e})") from e
            missing, unexpected = model.vision_tower.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise FastVLMError(
                    f"--init-vision {a.init_vision} does not fit this config's vision tower "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        src = None
    else:
        src = resolve(a.model)
        check_model_config(load_config(src), a.model)  # before reading any weights
        model = load_model(src, device=device, dtype=dtype, trust_pickle=a.trust_pickle)
        tok = load_tokenizer(src)
    return model, Processor(model.config, tok), tok, src


def lora_config(a: argparse.Namespace, src: Path | None) -> LoRAConfig | None:
    if not (a.lora or a.qlora):
        return None
    targets = tuple(t for x in a.lora_targets for t in x.split(",") if t)
    if src is None:
        base = None
    elif a.model and not Path(a.model).exists():
        base = a.model  # a hub id
    else:
        base = str(Path(src).resolve())
    return LoRAConfig(
        r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=targets,
        include_projector=a.lora_projector, include_vision=a.lora_vision, base_model=base,
    )  # fmt: skip


def apply_freeze(model, freeze: list[str]) -> None:
    parts = {
        "vision": model.vision_tower,
        "projector": model.mm_projector,
        "llm": model.language_model,
    }
    for name in freeze:
        if name not in parts:
            raise FastVLMError(f"--freeze takes vision, projector, llm; got {name!r}")
        for p in parts[name].parameters():
            p.requires_grad_(False)
    if "llm" in freeze and not model.config.text.tie_word_embeddings:
        model.lm_head.weight.requires_grad_(False)


def set_train_mode(model: nn.Module) -> None:
    """train(), but BatchNorm layers with frozen parameters stay in eval (stats = base weights)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters(recurse=False)
        ):
            m.eval()


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


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def n_targets(labels: torch.Tensor) -> int:
    """Labelled next-token positions of a batch (the first position predicts nothing)."""
    return int((labels[:, 1:] != IGNORE).sum())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """*Summed* next-token cross entropy over labelled positions (0 when there are none)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


# ---------------------------------------------------------------------- data parallel
def broadcast_params(params: list[torch.Tensor]) -> None:
    """Start every rank from rank 0's trainable weights (as DDP does)."""
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)


def all_reduce_grads(params: list[nn.Parameter], bucket_numel: int = 1 << 24) -> None:
    """Sum gradients over ranks in flat buckets; a parameter no rank touched keeps grad None."""
    import torch.distributed as dist

    if not params:
        return
    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(used)
    live = [p for p, u in zip(params, used.tolist(), strict=True) if u > 0]
    bucket: list[nn.Parameter] = []

    def flush() -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        bucket.clear()

    size = 0
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p)
        size += p.numel()
        if size >= bucket_numel:
            flush()
            size = 0
    if bucket:
        flush()


# ---------------------------------------------------------------------- saving
def write_output(
    out: Path,
    model,
    tok,
    src: Path | None,
    lora: LoRAConfig | None,
    a: argparse.Namespace,
    dtype: torch.dtype | None = None,
) -> None:
    """The final output layout described in the module docstring (weights in `dtype`)."""
    if lora is None:
        save_model(out, model, tok, src, dtype)
        return
    adapter = save_adapter(out / "adapter", model, lora)
    if a.merge and a.qlora:  # merge into the full-precision base, never into NF4 weights
        merge_to_folder(src, adapter, out, trust_pickle=a.trust_pickle, dtype=dtype)
    elif a.merge:
        save_model(out, merge_lora(model), tok, src, dtype)
    elif src is None:
        print(
            f"adapter → {adapter}; its base is a fresh --init-config model that no folder holds, "
            "so only --merge can turn it into a loadable model",
            file=sys.stderr,
        )
    else:
        print(
            f"adapter → {adapter}; merge it with: fastvlm lora merge {lora.base_model} {adapter} "
            "MERGED_FOLDER (or train with --merge)",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------- main loop
def train(a: argparse.Namespace) -> Path:
    from tqdm import tqdm

    from .. import api

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = api.resolve_device(a.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if a.qlora:
        require_qlora()
    out = Path(a.output)
    ck = prepare_output(out, a.resume, a.overwrite) if rank == 0 else None
    if world > 1:  # every rank resumes from what rank 0 found
        box = [str(ck) if ck else None]
        dist.broadcast_object_list(box, 0)
        ck = Path(box[0]) if box[0] else None
    out.mkdir(parents=True, exist_ok=True)
    model, processor, tok, src = build_model(
        a, device, torch.bfloat16 if a.qlora else torch.float32
    )
    save_dtype = resolve_save_dtype(a.save_dtype, model)
    run_config = describe_run(a, src, world)
    if ck is not None:
        check_resume(ck, run_config, a.force)
    lora = lora_config(a, src)
    if lora is not None:
        torch.manual_seed(a.seed)  # the lora_A init
        apply_lora(
            model, lora.r, lora.alpha, lora.dropout, lora.targets,
            lora.include_projector, lora.include_vision, quantize=a.qlora,
        )  # fmt: skip
    if ck is not None:
        if lora is None:
            model = None  # free the base first: a full checkpoint holds every weight
        model = restore_weights(ck, model, lora, device)
        processor.config = model.config
    apply_freeze(model, a.freeze or [])
    if a.gradient_checkpointing:
        model.language_model.gradient_checkpointing = True
    set_train_mode(model)

    if a.shapes:
        from .shapes_data import shapes_records

        records = shapes_records(
            a.shapes,
            a.data_seed,
            model.config.vision.image_size,
            a.shapes_max_count,
            a.shapes_layout,
        )
    else:
        records, report = load_records(a.data, a.image_dir)
        if rank == 0:
            print(f"data: {report.summary()}", file=sys.stderr)
    if not records:
        raise FastVLMError("no usable training rows (see the data report above)")
    ds = VLMDataset(records, processor, a.max_length)
    per_step = a.batch_size * a.grad_accum * world
    steps_per_epoch = max(1, len(ds) // per_step)
    total = a.max_steps or steps_per_epoch * a.epochs
    check_schedule(a, total)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FastVLMError("nothing to train: --freeze froze every parameter")
    optimizer = torch.optim.AdamW(
        param_groups(model, a.weight_decay, a.vision_lr_mult), lr=a.lr, betas=(0.9, 0.95), eps=1e-8
    )
    step = 0
    if ck is not None:
        step = load_optimizer(ck, optimizer)["step"]
        if rank == 0:
            print(f"resuming from {ck} at step {step}", file=sys.stderr)
    if world > 1:
        broadcast_params(params)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    pad_id = tok.token_to_id("<|endoftext|>") if tok is not None else None
    pad_id = 0 if pad_id is None else pad_id

    bar = tqdm(
        total=total, initial=step, disable=rank != 0 or a.quiet, desc="train", dynamic_ncols=True
    )
    t_start, tokens_seen, losses = time.perf_counter(), 0, []
    state = {"run_config": run_config}
    stop = min(total, a.stop_after) if a.stop_after else total
    loader = iter(micro_batches(ds, step, stop, steps_per_epoch, a, rank, world, pad_id))
    while step < stop:
        torch.manual_seed((a.seed * 1_000_003 + step) * 4096 + rank)  # dropout: resume-exact
        lr = lr_at(step, total, a.warmup, a.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        batches = []
        for _micro in range(a.grad_accum):
            batch, bad = next(loader)
            ds.skipped.update(bad)
            if batch is not None:
                batches.append(batch)  # kept on the host until its turn
        n_total = float(sum(n_targets(b["labels"]) for b in batches))
        if world > 1:  # labelled tokens of the whole step, all ranks
            n_total = _all_reduce_cpu(torch.tensor([n_total]), device).item()
        loss_sum = 0.0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(batch["input_ids"], batch.get("pixel_values"))
            loss = lm_loss(logits, batch["labels"])
            (loss / max(1.0, n_total)).backward()
            loss_sum += float(loss.detach())
            tokens_seen += int(batch["input_ids"].numel())
        if world > 1:
            all_reduce_grads(params)
            loss_sum = _all_reduce_cpu(torch.tensor([loss_sum]), device).item()
        if n_total > 0:  # a step whose rows were all skipped changes nothing
            if a.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, a.clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        mean_loss = loss_sum / max(1.0, n_total)
        losses = [*losses[-9:], mean_loss] if n_total > 0 else losses
        tps = tokens_seen / (time.perf_counter() - t_start)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if rank == 0 and a.log_every and step % a.log_every == 0:
            log = {"step": step, "loss": round(mean_loss, 5), "lr": lr}
            print(json.dumps(log), file=sys.stderr, flush=True)
        if rank == 0 and a.save_every and step % a.save_every == 0 and step < total:
            save_checkpoint(
                out / f"checkpoint-{step}", model, tok, optimizer, {**state, "step": step}, lora,
                save_dtype,
            )
            for old in checkpoints(out)[: -a.keep]:
                shutil.rmtree(old, ignore_errors=True)
    bar.close()
    if step < total:  # --stop-after: leave a resumable checkpoint that ends this stage
        if rank == 0:
            stage = {**state, "step": step, "stage_end": True}
            save_checkpoint(out / f"checkpoint-{step}", model, tok, optimizer, stage, lora,
                            save_dtype)  # fmt: skip
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return out
    if rank == 0:
        model.eval()
        write_output(out, model, tok, src, lora, a, save_dtype)
        final = {"step": step, "loss": round(sum(losses) / len(losses), 5) if losses else None}
        (out / "trainer_state.json").write_text(json.dumps({**final, **state}, indent=2) + "\n")
        write_train_card(out, a, run_config, final, len(records), lora, save_dtype)
        if ds.skipped:
            line, why = next(iter(ds.skipped.items()))
            print(
                f"skipped {len(ds.skipped)} rows at run time, e.g. line {line}: {why}",
                file=sys.stderr,
            )
        elapsed = time.perf_counter() - t_start
        print(f"trained {step} steps in {elapsed:.0f}s → {out}", file=sys.stderr)
        if lora is None or a.merge:
            print(size_summary(src, out), file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def _all_reduce_cpu(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small host tensor over ranks (via the device for nccl)."""
    import torch.distributed as dist

    on = t.to(device)
    dist.all_reduce(on)
    return on.cpu()


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not (a.data or a.shapes):
        raise FastVLMError("give --data FILE (or --shapes N)")
    check_train_args(a)
    if a.merge and not (a.lora or a.qlora):
        raise FastVLMError("--merge folds a LoRA adapter into the model: use it with --lora")
    if (a.lora or a.qlora) and a.freeze:
        raise FastVLMError("--lora already freezes every base weight; drop --freeze")
    if a.qlora:
        require_qlora()
    train(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
