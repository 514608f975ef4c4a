"""Shared by the fixture scripts: the tiny model's settings, the real Qwen2 / FastVLM ids and chat
templates, logging and version records, the test photo and the CLIP preprocessing."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Must be set before timm is imported.  The HF convert script uses TIMM_FUSED_ATTN=0 (plain
# softmax(q k^T) v instead of SDPA) because the Apple reference does so; we follow it so the
# goldens come from the same attention formula as Apple's MHSA.  The measured difference to
# the fused path is recorded in the golden metadata ("fused_attn_max_abs_diff_logits").
os.environ.setdefault("TIMM_FUSED_ATTN", "0")
FUSED_ATTN_NOTE = (
    "TIMM_FUSED_ATTN=0 (plain attention in the timm vision tower, as in transformers' "
    "convert_fastvlm_weights_to_hf.py); Qwen2 uses transformers' default attention (sdpa)"
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures"

SEED = 20250917

# ----------------------------------------------------------------------------------------------
# Tiny model configuration
# ----------------------------------------------------------------------------------------------
IMAGE_SIZE = 192  # 192 / 64 = 3 -> 3x3 = 9 image tokens
PATCH_SIZE = 64  # total stride of FastViTHD
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2

# Widths must double from stage to stage (the PatchEmbed 7x7 conv has groups = in_channels and
# out = 2 * in, exactly like the real 96->192->...->1536), and the two attention stages must be
# multiples of head_dim = 32 -> (32, 64) = 1 and 2 heads.
VISION_LAYERS = [1, 2, 1, 2, 1]  # two blocks in one RepMixer stage and in one attention stage
VISION_EMBED_DIMS = [4, 8, 16, 32, 64]
VISION_MLP_RATIOS = [
    4,
    3,
    4,
    4,
    2,
]  # real: all 4; varied per stage so per-stage config reading is tested
VISION_HIDDEN = VISION_EMBED_DIMS[-1] * 2  # final_conv / conv_exp output = mm_hidden_size
HEAD_PROJ_DIM = 16  # Apple's unused MobileCLIP head.proj is (3072, 768) for the real model

TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
VOCAB_SIZE = 1024
MAX_POS = 512
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-6
IMAGE_TOKEN_ID = VOCAB_SIZE - 1  # 1023, stand-in for <image> = 151646
EOS_TOKEN_ID = VOCAB_SIZE - 2  # 1022, stand-in for <|im_end|> = 151645
BOS_TOKEN_ID = VOCAB_SIZE - 3  # 1021, stand-in for <|endoftext|> = 151643
TEXT_ID_RANGE = 1000  # random prompt ids are drawn from [0, 1000)
NUM_GREEDY = 32

# Qwen2 special tokens / FastVLM image token in the real vocabulary
QWEN_SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<image>": 151646,
}
REAL_IMAGE_TOKEN_ID = 151646
REAL_IMAGE_TOKENS_PER_IMAGE = 256  # (1024 / 64) ** 2

# Chat template set by transformers' convert_fastvlm_weights_to_hf.py (verbatim string).
FASTVLM_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Stock Qwen2-Instruct chat template (tokenizer_config.json of Qwen2-*-Instruct and of the
# apple/FastVLM-* hub repos): string contents, default system prompt.
QWEN2_STOCK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2 pre-tokenizer regex (transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def log(*args):
    print(*args, flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict:
    import PIL
    import timm
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "tokenizers": tokenizers.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def make_photo(path: Path) -> Image.Image:
    import skimage.data

    arr = skimage.data.chelsea()  # 300 x 451 RGB
    img = Image.fromarray(arr).convert("RGB").resize((300, 200), Image.LANCZOS)
    img.save(path, format="PNG", optimize=True)
    return Image.open(path).convert("RGB")


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Apple llava/mm_utils.py expand2square: paste centred (floor offsets) on a square canvas."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def clip_pil_processor(size: int):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        crop_size={"height": size, "width": size},
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        size={"shortest_edge": size},
    )


def preprocessor_config_json(size: int) -> dict:
    # As in the converted HF FastVLM repos (CLIPImageProcessor saved by LlavaProcessor).
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [1.0, 1.0, 1.0],
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size},
    }


PROCESSOR_CONFIG_JSON = {
    "image_token": "<image>",
    "num_additional_image_tokens": 0,
    "patch_size": PATCH_SIZE,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": None,
}


def write_json(path: Path, obj) -> None:
    path.write_text(
        json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8"
    )
