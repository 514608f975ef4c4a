"""The model a training run starts from: loaded (`model`) or fresh (`init_config`), its LoRA
config, which parts are frozen, and train mode with frozen BatchNorm kept in eval."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from ..config import FastVLMConfig
from ..errors import FastVLMError
from ..hub import resolve
from ..model.fastvlm import FastVLMModel
from ..processing import Processor
from ..tokenization import load_tokenizer
from ..weights import load_config, load_model
from .config import TrainConfig, check_model_config
from .lora import LoRAConfig


def build_model(a: TrainConfig, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, processor, tokenizer, source folder) from `model` or `init_config`."""
    if a.init_config:
        if not a.tokenizer:
            raise FastVLMError("--init-config needs --tokenizer tokenizer.json")
        try:
            cfg = FastVLMConfig.from_dict(json.loads(Path(a.init_config).read_text()))
            cfg.validate()
        except (ValueError, TypeError, KeyError) as e:
            raise FastVLMError(f"--init-config {a.init_config}: not a usable config ({e})") from e
        try:  # the tokenizers library raises its own exception type for a bad file
            tok = Tokenizer.from_file(str(a.tokenizer))
        except Exception as e:  # noqa: BLE001
            raise FastVLMError(f"--tokenizer {a.tokenizer}: not a tokenizer.json ({e})") from e
        torch.manual_seed(a.seed)
        model = FastVLMModel(cfg).to(device=device, dtype=dtype)
        model.init_weights()
        if a.init_vision:  # a pre-trained tower (train.vision_pretrain)
            try:
                sd = load_file(str(a.init_vision))
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


def lora_config(a: TrainConfig, src: Path | None) -> LoRAConfig | None:
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
