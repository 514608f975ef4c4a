"""Random-weight checkpoint folders for the real model shapes (0.5B / 1.5B / 7B), built in code.

`shape_folder("7b")` writes a bf16 checkpoint in our format (config.json + safetensors shards +
index), one tensor at a time, so building the 7B folder needs about one shard of memory, not
the model. The bench then loads it like any checkpoint (`--quant int4` streams it into int4), so
the load path measured is the one users run. Folders are cached (`FASTVLM_BENCH_CACHE`, default
~/.cache/fastvlm/bench-shapes) and reused while the recipe `VERSION` is unchanged.

Values follow `workload.build_shape`: N(0, 0.02) decoder / projector / embedding weights with
the residual writes (o_proj, down_proj) scaled by 0.1 so activations stay finite, unit norms,
zero biases, a He-initialised vision tower with small layer scales.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import shape as config_shape
from ..config_format import config_to_format
from ..model.fastvithd import RepCPE, RepMixer, identity_kernel
from ..model.fastvlm import FastVLMModel

VERSION = 1
SHARD_BYTES = 2**30
CHUNK = 2**24  # elements drawn at a time (bounds the fp32 temporaries)


def cache_root() -> Path:
    env = os.environ.get("FASTVLM_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastvlm" / "bench-shapes"


def shape_folder(
    name: str,
    image_size: int = 1024,
    dtype: torch.dtype = torch.bfloat16,
    root: Path | None = None,
    seed: int = 0,
) -> Path:
    """The cached folder of shape `name` (built on first use); `image_size` is the config's."""
    tag = str(dtype).replace("torch.", "")
    folder = Path(root or cache_root()) / f"{name}-{tag}-seed{seed}-v{VERSION}"
    done = folder / ".complete"
    if not done.exists():
        if folder.exists():
            shutil.rmtree(folder)  # an interrupted build
        _write(folder, name, dtype, seed)
        done.write_text("ok\n")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("vision", {}).get("image_size") != image_size:
        cfg["vision"]["image_size"] = image_size
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def _write(folder: Path, name: str, dtype: torch.dtype, seed: int) -> None:
    cfg = config_shape(name)
    with torch.device("meta"):
        model = FastVLMModel(cfg)
    vision = _vision_state(model, seed)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shard: dict[str, torch.Tensor] = {}
    size, index, n = 0, {}, 0
    gen = torch.Generator().manual_seed(seed)
    for key, meta in model.state_dict().items():
        if key == "lm_head.weight" and cfg.text.tie_word_embeddings:
            continue
        t = vision[key] if key in vision else _decoder_tensor(key, meta, gen)
        shard[key] = t.to(dtype) if t.is_floating_point() else t
        size += t.numel() * shard[key].element_size()
        if size >= SHARD_BYTES:
            n = _flush(tmp, shard, n, index)
            size = 0
    _flush(tmp, shard, n, index)
    total = sum((tmp / f).stat().st_size for f in set(index.values()))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1) + "\n"
    )
    (tmp / "config.json").write_text(json.dumps(config_to_format(cfg, "fastvlm"), indent=2))
    tmp.rename(folder)


def _flush(folder: Path, shard: dict, n: int, index: dict) -> int:
    if not shard:
        return n
    fname = f"model-{n:05d}.safetensors"
    save_file(shard, str(folder / fname), metadata={"format": "pt"})
    index.update((k, fname) for k in shard)
    shard.clear()
    return n + 1


def _decoder_tensor(key: str, meta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Decoder / head tensors drawn chunk by chunk (the 7B embedding is 545M values)."""
    if not meta.is_floating_point():
        return torch.zeros(meta.shape, dtype=meta.dtype)
    if key.endswith("norm.weight"):
        return torch.ones(meta.shape, dtype=torch.bfloat16)
    if key.endswith(".bias"):
        return torch.zeros(meta.shape, dtype=torch.bfloat16)
    std = 0.02 * (0.1 if key.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
    out = torch.empty(meta.numel(), dtype=torch.bfloat16)
    for i in range(0, out.numel(), CHUNK):
        j = min(out.numel(), i + CHUNK)
        out[i:j] = torch.randn(j - i, generator=gen).mul_(std)
    return out.reshape(meta.shape)


@torch.no_grad()
def _vision_state(model: FastVLMModel, seed: int) -> dict[str, torch.Tensor]:
    """The vision tower and projector materialised and initialised as `init_weights` does
    (small next to the decoder), returned by state-dict key."""
    torch.manual_seed(seed)
    parts = {"vision_tower": model.vision_tower, "mm_projector": model.mm_projector}
    out = {}
    for prefix, mod in parts.items():
        mod = mod.to_empty(device="cpu")
        for m in mod.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.zero_()
            elif "Norm" in type(m).__name__:  # BatchNorm2d, LayerNormChannel: identity
                for attr, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                                    ("running_var", 1.0)):  # fmt: skip
                    t = getattr(m, attr, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.fill_(value)
        for m in mod.modules():
            if isinstance(m, (RepMixer, RepCPE)) and hasattr(m, "reparam_conv"):
                w = m.reparam_conv.weight
                w.copy_(identity_kernel(m.dim, m.dim, w.shape[-1], w) + 0.02 * torch.randn_like(w))
        for name, p in mod.named_parameters():
            if "layer_scale" in name:
                p.fill_(1e-2)
        out.update({f"{prefix}.{k}": v for k, v in mod.state_dict().items()})
    return out
