"""What the bench runs: real-size shapes with random weights (`config.shape`), the prompt (text,
one image's placeholders, text) and random images."""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..config import TEXT_SHAPES
from ..config import shape as config_shape
from ..model.fastvlm import FastVLMModel

SHAPES = TEXT_SHAPES
PROMPT_TEXT = (15, 9)  # text tokens before / after the image run (≈ the real chat template)


def build_shape(shape: str, image_size: int, seed: int = 0) -> FastVLMModel:
    """A `config.shape(shape)` model at `image_size` with random weights (no download)."""
    cfg = config_shape(shape, image_size)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = FastVLMModel(cfg)
    model = model.to_empty(device="cpu")
    model.init_weights()
    # Random weights make garbage text; scale the residual writes down so activations stay finite
    # (inf/NaN or denormals would change the speed being measured).
    with torch.no_grad():
        for layer in model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
        for name, p in model.vision_tower.named_parameters():
            if "layer_scale" in name:
                p.fill_(1e-2)
    return model.eval()


def prompt_ids(cfg, seed: int = 0, text: tuple[int, int] = PROMPT_TEXT) -> list[int]:
    """Benchmark prompt for a FastVLMConfig: text, one image's placeholders, text."""
    g = torch.Generator().manual_seed(seed)
    hi = min(cfg.text.vocab_size, 151643)  # ordinary (non-special) ids of Qwen2
    words = torch.randint(4, hi, (sum(text),), generator=g).tolist()
    words = [w + 1 if w == cfg.image_token_id else w for w in words]
    return words[: text[0]] + [cfg.image_token_id] * cfg.num_image_tokens + words[text[0] :]


def random_image(size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8))


def at_resolution(model, size: int):
    """A shallow copy of `model` sharing every weight, configured for `size`² inputs."""
    cfg = model.config
    m = copy.copy(model)  # FastViTHD is resolution-agnostic (convs + attention): only the config
    m.config = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=size))
    m.config.validate()
    return m
