"""What a training run is, so `--resume` cannot silently continue a different one.

Design decisions:
* Every checkpoint's `trainer_state.json` records `run_config`: the settings that change the
  result (model and data *fingerprints*, schedule, batch, optimiser, freezing, LoRA); others
  (paths, save dtype) are recorded for messages and the card only. Paths are
  kept for messages only, so moving a folder does not block a resume, but editing the data does.
* `--resume` refuses a checkpoint whose recorded settings differ and lists each difference;
  `--resume --force` continues anyway (with a warning listing them). Settings that only change
  speed or logging (device, workers, save/log cadence, --stop-after) are not compared.
* A checkpoint left by `--stop-after` ends a stage of a staged schedule (a curriculum): the next
  stage may change the data (`DATA_FIELDS`), not the model or the hyper-parameters.
* A non-empty `--output` needs `--resume` (continue it) or `--overwrite` (start over); overwrite
  removes only what training writes there (checkpoints, weights, adapter, config, card).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

from ..errors import FastVLMError
from .checkpoint import checkpoints, read_state
from .config import TrainConfig

COMPARED = (
    "model_fingerprint", "data_fingerprint", "shapes", "data_seed", "shapes_layout",
    "shapes_max_count", "max_length", "epochs", "max_steps", "batch_size", "grad_accum",
    "world_size", "lr", "warmup", "weight_decay", "vision_lr_mult", "clip", "freeze", "seed",
    "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_projector",
    "lora_vision", "qlora", "qat",
)  # fmt: skip
DATA_FIELDS = ("data_fingerprint", "shapes", "data_seed", "shapes_layout", "shapes_max_count")
# Files and folders a training run writes into --output (what --overwrite may remove).
OWNED = (
    "adapter", "model.safetensors", "model.safetensors.index.json", "config.json",
    "trainer_state.json", "README.md", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "added_tokens.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.json", "chat_template.jinja", "LICENSE", "preprocessor_config.json",
)  # fmt: skip


def _hash_files(paths: list[Path], h=None) -> str:
    h = h or hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _sampled(path: Path, h, blocks: int = 64, size: int = 1 << 16) -> None:
    """Feed `h` the file's size and `blocks` evenly spaced chunks (all of a small file): any
    retrained weights change them, and a multi-GB checkpoint is not read in full at start-up."""
    n = path.stat().st_size
    h.update(f"{path.name}:{n};".encode())
    with open(path, "rb") as f:
        if n <= blocks * size:
            h.update(f.read())
            return
        for i in range(blocks):
            f.seek((n - size) * i // (blocks - 1))
            h.update(f.read(size))


def model_fingerprint(a: TrainConfig, src: Path | None) -> str:
    """config.json + sampled weight files, or the --init-config / --tokenizer / --init-vision
    file contents for a fresh model."""
    if src is None:
        files = [Path(p) for p in (a.init_config, a.tokenizer, a.init_vision) if p]
        return _hash_files(files)
    h = hashlib.sha256()
    for f in sorted(Path(src).glob("*.safetensors")) + sorted(Path(src).glob("*.bin")):
        _sampled(f, h)
    cfg = Path(src) / "config.json"
    return _hash_files([cfg] if cfg.exists() else [], h)


def describe_run(a: TrainConfig, src: Path | None, world: int) -> dict:
    """The run configuration recorded in each checkpoint (COMPARED keys + paths for messages)."""
    targets = sorted({t for x in a.lora_targets or [] for t in x.split(",") if t})
    lora = bool(a.lora or a.qlora)
    return {
        "model": a.model or a.init_config,
        "model_fingerprint": model_fingerprint(a, src),
        "data": str(a.data) if a.data else None,
        "data_fingerprint": _hash_files([Path(a.data)]) if a.data else None,
        "shapes": a.shapes, "data_seed": a.data_seed if a.shapes else None,
        "shapes_layout": a.shapes_layout if a.shapes else None,
        "shapes_max_count": a.shapes_max_count if a.shapes else None,
        "max_length": a.max_length, "epochs": a.epochs, "max_steps": a.max_steps,
        "batch_size": a.batch_size, "grad_accum": a.grad_accum, "world_size": world,
        "lr": a.lr, "warmup": a.warmup, "weight_decay": a.weight_decay,
        "vision_lr_mult": a.vision_lr_mult, "clip": a.clip, "freeze": sorted(a.freeze or []),
        "seed": a.seed, "lora": lora, "qlora": bool(a.qlora),
        "lora_r": a.lora_r if lora else None, "lora_alpha": a.lora_alpha if lora else None,
        "lora_dropout": a.lora_dropout if lora else None,
        "lora_targets": targets if lora else None,
        "lora_projector": a.lora_projector if lora else None,
        "lora_vision": a.lora_vision if lora else None,
        "save_dtype": getattr(a, "save_dtype", "auto"),
        "qat": getattr(a, "qat", None),
    }  # fmt: skip


def differences(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    return [(k, saved.get(k), now.get(k)) for k in COMPARED if saved.get(k) != now.get(k)]


def _explain(diffs: list[tuple[str, object, object]], saved: dict, now: dict) -> str:
    parts = []
    for k, old, new in diffs:
        if k == "data_fingerprint":
            old_new = f"{saved.get('data')} → {now.get('data')}"
            parts.append(f"data ({old_new}: the file's contents differ)")
        elif k == "model_fingerprint":
            parts.append(f"model ({saved.get('model')} → {now.get('model')}: different weights)")
        else:
            parts.append(f"--{k.replace('_', '-')} {old} → {new}")
    return "; ".join(parts)


def check_resume(ck: Path, now: dict, force: bool) -> None:
    """Refuse (or with --force, warn) when checkpoint `ck` was made by a different run."""
    state = read_state(ck)
    saved = state.get("run_config")
    if saved is None:
        print(f"warning: {ck} records no run configuration (older fastvlm): cannot check that it "
              "belongs to this run", file=sys.stderr)  # fmt: skip
        return
    diffs = differences(saved, now)
    if state.get("stage_end"):  # --stop-after ended a stage: the next may change the data
        staged = [d for d in diffs if d[0] in DATA_FIELDS]
        if staged:
            print(f"next stage from {ck.name}: {_explain(staged, saved, now)}", file=sys.stderr)
        diffs = [d for d in diffs if d[0] not in DATA_FIELDS]
    if not diffs:
        return
    what = _explain(diffs, saved, now)
    if force:
        print(f"warning: --force: resuming {ck} with different settings: {what}", file=sys.stderr)
        return
    raise FastVLMError(
        f"{ck} belongs to a run with different settings: {what}. Resuming would mix two runs: "
        "use the same flags, choose a new --output, start over with --overwrite, or pass "
        "--resume --force to continue with the new settings anyway"
    )


def prepare_output(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check / clear --output before training; returns the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise FastVLMError(f"--output {out} is a file, not a folder")
    contents = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if overwrite:
        removed = []
        for p in out.iterdir() if out.exists() else []:
            if p.name in OWNED or p.name.startswith("checkpoint-"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p.name)
        if removed:
            print(f"--overwrite: removed {len(removed)} entries of the old run in {out}",
                  file=sys.stderr)  # fmt: skip
        return None
    if not contents:
        if resume:
            print(f"--resume: {out} has no checkpoint yet, starting from step 0", file=sys.stderr)
        return None
    shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
    if not resume:
        raise FastVLMError(
            f"--output {out} is not empty ({shown}): pass --resume to continue the run it holds, "
            "--overwrite to replace it, or choose a new folder"
        )
    cks = checkpoints(out)
    finished = read_state(out).get("step")
    if finished is not None and (not cks or int(cks[-1].name.split("-")[1]) < finished):
        raise FastVLMError(
            f"{out} holds a finished run (step {finished}); there is nothing to resume: "
            "use --overwrite to train again, or choose a new --output"
        )
    if not cks:
        raise FastVLMError(
            f"--resume: {out} has no checkpoint-N folder to continue from ({shown}); "
            "use --overwrite to start over, or choose a new --output"
        )
    return cks[-1]
