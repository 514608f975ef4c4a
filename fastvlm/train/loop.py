"""`fastvlm train` and `train(cfg: TrainConfig)`: full fine-tuning, LoRA (or training from a
fresh config) on LLaVA-style data.

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
* Data parallelism: one bucketed gradient all-reduce per step, not DDP (distributed.py).
* Checkpoints (`OUT/checkpoint-N/`) are the exact training state: the weights as trained (train
  form of the vision tower when it was built so; never fused mid-run) or, with LoRA, only the
  adapter; plus the AdamW state of the trainable parameters (safetensors) and `trainer_state.json`.
  Dropout is re-seeded from (seed, step, rank) every step, so a resumed run repeats the
  uninterrupted one. Weights are saved in `--save-dtype` (auto = the source's, see
  checkpoint.py); each checkpoint records the run's settings, and `--resume` refuses one made by
  a different run (run_config.py). Settings are checked before anything is loaded (config.py).
* `--vision-lr-mult`: AdamW groups of their own for the vision side (schedule.py);
  `--shapes-max-count` restricts generated shapes scenes to at most k shapes (curriculum stages,
  chained with `--stop-after` / `--resume` over one schedule).
* Frozen BatchNorm layers stay in eval mode (setup.py): their statistics are base weights.
* A run is a `TrainConfig` (config.py); the CLI builds it from its flags (args.py).

What `--output OUT` holds at the end:
* full fine-tune: OUT is a model folder (fused vision tower, config, tokenizer):
  `fastvlm.load(OUT)`.
* `--lora` / `--qlora`: `OUT/adapter/` (adapter_model.safetensors + adapter_config.json, which
  records r, alpha, targets and the base model). With `--merge`, OUT is *also* the merged full
  model, `fastvlm.load(OUT)`, identical to `fastvlm lora merge BASE OUT/adapter MERGED`. Without
  it nothing heavy is written: merge later, or keep the small adapter next to its base.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..device import resolve_device
from ..dtypes import resolve_save_dtype, size_summary
from ..errors import FastVLMError
from . import distributed
from .args import build_parser, config_from_args
from .card import write_train_card
from .checkpoint import checkpoints, load_optimizer, restore_weights, save_checkpoint, save_model
from .config import TrainConfig, check_config, check_schedule, normalized
from .data import IGNORE, VLMDataset, load_records
from .loader import micro_batches
from .lora import LoRAConfig, apply_lora, merge_lora, require_qlora, save_adapter
from .merge import merge_to_folder
from .run_config import check_resume, describe_run, prepare_output
from .schedule import lr_at, param_groups, set_lr
from .setup import apply_freeze, build_model, lora_config, set_train_mode
from .shapes_data import shapes_records

__all__ = ["TrainConfig", "main", "train"]


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


# ---------------------------------------------------------------------- saving
def write_output(
    out: Path,
    model,
    tok,
    src: Path | None,
    lora: LoRAConfig | None,
    a: TrainConfig,
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
def train(cfg: TrainConfig) -> Path:
    """Run the training `cfg` describes; returns its output folder (see the module docstring)."""
    check_config(cfg)
    if cfg.qlora:
        require_qlora()
    a = normalized(cfg)  # the loop's own copy: check_schedule fills in warmup
    rank, world = distributed.world()
    device = distributed.init(resolve_device(a.device))
    out = Path(a.output)
    ck = prepare_output(out, a.resume, a.overwrite) if rank == 0 else None
    ck = distributed.broadcast_object(str(ck) if ck else None)  # every rank resumes the same
    ck = Path(ck) if ck else None
    model, processor, tok, src = build_model(
        a, device, torch.bfloat16 if a.qlora else torch.float32
    )
    out.mkdir(parents=True, exist_ok=True)  # only once the model loaded: a refusal writes nothing
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
        distributed.broadcast_params(params)
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
        set_lr(optimizer, lr)
        batches = []
        for _micro in range(a.grad_accum):
            batch, bad = next(loader)
            ds.skipped.update(bad)
            if batch is not None:
                batches.append(batch)  # kept on the host until its turn
        n_total = float(sum(n_targets(b["labels"]) for b in batches))
        if world > 1:  # labelled tokens of the whole step, all ranks
            n_total = distributed.all_reduce_sum(n_total, device)
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
            distributed.all_reduce_grads(params)
            loss_sum = distributed.all_reduce_sum(loss_sum, device)
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
        distributed.close()
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
    distributed.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """`fastvlm train` (and `torchrun -m fastvlm.train.loop`)."""
    train(config_from_args(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
