"""Saving and restoring `fastvlm train` state: the final model folder and `checkpoint-N/`.

Design decisions:
* Model weights (final output and each checkpoint's `model.safetensors`) are written in the save
  dtype (`--save-dtype`, auto = the source checkpoint's), so a fine-tune of an fp16 model is the
  size of its source. Training itself runs in fp32: a checkpoint whose weights were rounded to
  fp16 also stores the fp32 values of every tensor the rounding changed (trained weights, BatchNorm
  statistics: "master." tensors in the optimizer file, which stays fp32), so `--resume`
  continues from the exact training state.
* `trainer_state.json` records the step, the AdamW param groups and the run configuration
  (`run_config.py`) that `--resume` checks before continuing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..dtypes import resolve_save_dtype
from ..errors import CheckpointError, FastVLMError
from ..model_card import copy_source_files
from ..weights import load_model
from ..weights import save_checkpoint as save_weights
from .lora import (
    ADAPTER_CONFIG,
    LoRAConfig,
    load_adapter,
    lora_layers,
    read_adapter_config,
    save_adapter,
)

# In a subfolder: every *.safetensors next to config.json is read as model weights.
OPTIMIZER_FILE = "optimizer/optimizer.safetensors"
MASTER = "master."  # optimizer-file prefix of the fp32 copies of tensors saved rounded


def save_model(
    folder: Path, model, tok, src: Path | None, dtype: torch.dtype | None = None
) -> Path:
    """A loadable model folder: weights (fused vision form) in `dtype` (default: the model's
    source dtype), config, tokenizer files. The source's README is not copied (see model_card)."""
    assert not lora_layers(model), "merge_lora() before saving a full model"
    folder = Path(folder)
    net = model.module if hasattr(model, "module") else model
    dtype = dtype or resolve_save_dtype("auto", net)
    if not net.config.vision.inference_mode:  # save the fused form that inference loads
        net = copy.deepcopy(net)
        net.vision_tower.reparameterize()
    save_weights(net.state_dict(), net.config, folder, "fastvlm", dtype=dtype)
    if tok is not None:
        tok.save(str(folder / "tokenizer.json"))
    copy_source_files(src, folder)
    return folder


def save_checkpoint(
    folder: Path,
    model,
    tok,
    optimizer,
    state: dict,
    lora: LoRAConfig | None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Training state (weights as trained, or the adapter) + optimizer + trainer state; atomic."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    masters: dict[str, torch.Tensor] = {}
    if lora is not None:
        save_adapter(tmp, model, lora)
    else:
        save_weights(model.state_dict(), model.config, tmp, "fastvlm", dtype=dtype)
        if tok is not None:
            tok.save(str(tmp / "tokenizer.json"))
        seen: set[int] = set()  # a tied weight is stored once
        for name, t in model.state_dict().items():  # weights and BatchNorm statistics
            if not t.is_floating_point() or t.dtype == dtype or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if not torch.equal(t, t.to(dtype).to(t.dtype)):  # the cast would change it
                masters[MASTER + name] = t.detach().contiguous().cpu().clone()
    opt = optimizer.state_dict()
    tensors = {
        f"{i}.{k}": v.contiguous().cpu()
        for i, st in opt["state"].items()
        for k, v in st.items()
        if torch.is_tensor(v)
    }
    (tmp / "optimizer").mkdir()
    save_file({**tensors, **masters}, str(tmp / OPTIMIZER_FILE))
    state = {**state, "param_groups": opt["param_groups"]}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _optimizer_path(folder: Path) -> Path:
    path = folder / OPTIMIZER_FILE
    if not path.exists() and (folder / "optimizer.safetensors").exists():
        path = folder / "optimizer.safetensors"  # checkpoints of fastvlm 0.1.0
    return path


def _damaged(folder: Path, e: Exception) -> FastVLMError:
    return FastVLMError(
        f"{folder} is incomplete or corrupt ({e}); delete it to resume from the checkpoint "
        "before it, or start over with --overwrite"
    )


def _read_optimizer_file(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(_optimizer_path(folder)))
    except (OSError, SafetensorError) as e:
        raise _damaged(folder, e) from e


def restore_weights(ck: Path, model, lora: LoRAConfig | None, device: torch.device):
    """The model to continue training from checkpoint `ck` (full weights or adapter)."""
    has_adapter = (ck / ADAPTER_CONFIG).exists()
    if lora is None:
        if has_adapter:
            raise FastVLMError(f"{ck} holds a LoRA adapter: resume it with the same --lora flags")
        if (ck / "optimizer.safetensors").exists():  # 0.1.0 layout: hide it from the loader
            with tempfile.TemporaryDirectory() as tmp:
                for f in ck.iterdir():
                    if f.name != "optimizer.safetensors":
                        os.symlink(f.resolve(), Path(tmp) / f.name)
                return load_model(Path(tmp), device=device, dtype=torch.float32)
        try:
            model = load_model(ck, device=device, dtype=torch.float32)
        except CheckpointError as e:
            raise _damaged(ck, e) from e
        if _optimizer_path(ck).exists():  # the fp32 training values of tensors saved rounded
            state = model.state_dict()
            with torch.no_grad():
                for k, v in _read_optimizer_file(ck).items():
                    if k.startswith(MASTER):
                        state[k[len(MASTER) :]].copy_(v)
        return model
    if not has_adapter:
        raise FastVLMError(
            f"{ck} holds a full model but this is a --lora run; resume without --lora, "
            "or choose a new --output"
        )
    saved = read_adapter_config(ck)
    mine = (lora.r, lora.alpha, tuple(lora.targets), lora.include_projector, lora.include_vision)
    theirs = (saved.r, saved.alpha, tuple(saved.targets), saved.include_projector,
              saved.include_vision)  # fmt: skip
    if mine != theirs:
        raise FastVLMError(
            f"{ck} was trained with LoRA r={saved.r} alpha={saved.alpha} targets="
            f"{list(saved.targets)} projector={saved.include_projector} "
            f"vision={saved.include_vision}; resume with the same --lora-* flags"
        )
    load_adapter(model, ck)
    return model


def load_optimizer(folder: Path, optimizer) -> dict:
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        state["step"], state["param_groups"]  # noqa: B018 - both must be there
    except (OSError, ValueError, KeyError) as e:
        raise _damaged(folder, e) from e
    tensors = _read_optimizer_file(folder)
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(MASTER):
            continue
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = v
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    except ValueError as e:
        raise FastVLMError(
            f"the optimizer state in {folder} does not fit this run's trainable parameters ({e}); "
            "resume with the same --freeze / --lora flags"
        ) from e
    return state


def checkpoints(out: Path) -> list[Path]:
    """`checkpoint-N` folders of OUT, oldest first (unfinished `.tmp` ones excluded)."""
    found = [p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: Path) -> Path | None:
    cks = checkpoints(out)
    return cks[-1] if cks else None


def read_state(ck: Path) -> dict:
    """A checkpoint's trainer_state.json (an empty dict when missing or unreadable)."""
    try:
        return json.loads((ck / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}
