"""config.shape: the one table of model shapes (FASTVLM_REFERENCE §3) every tool builds from."""

from __future__ import annotations

import pytest
import torch

from fastvlm.config import (
    APPLE_VOCAB_ROWS,
    QWEN2_IMAGE_TOKEN_ID,
    TEXT_SHAPES,
    TINY_VISION,
    VisionConfig,
    shape,
)
from fastvlm.model.fastvlm import FastVLMModel

# (hidden, layers, heads, kv heads, head_dim, intermediate, converted vocab rows, tied)
REFERENCE = {
    "0.5b": (896, 24, 14, 2, 64, 4864, 152000, True),
    "1.5b": (1536, 28, 12, 2, 128, 8960, 152000, True),
    "7b": (3584, 28, 28, 4, 128, 18944, 152128, False),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_released_shapes_match_the_reference_table(name):
    cfg = shape(name)
    t = cfg.text
    got = (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
           t.head_dim, t.intermediate_size, t.vocab_size, t.tie_word_embeddings)  # fmt: skip
    assert got == REFERENCE[name]
    # converted rows = Apple rows + <image>, padded to a multiple of 64
    assert t.vocab_size == -(-(APPLE_VOCAB_ROWS[name] + 1) // 64) * 64
    assert cfg.vision == VisionConfig(image_size=1024) and cfg.num_image_tokens == 256
    assert cfg.image_token_id == QWEN2_IMAGE_TOKEN_ID and t.rope_theta == 1e6
    cfg.validate()


@pytest.mark.parametrize("size", [64, 128, 256])
def test_tiny_shape_builds_and_runs(size):
    cfg = shape("tiny", size)
    assert cfg.vision.layers == TINY_VISION["layers"] and cfg.vision.image_size == size
    assert cfg.image_token_id == TEXT_SHAPES["tiny"]["vocab_size"] - 1
    model = FastVLMModel(cfg).eval()
    with torch.no_grad():
        emb = model.embed_images(torch.rand(1, 3, size, size))
    assert emb.shape == (1, cfg.num_image_tokens, cfg.text.hidden_size)


def test_overrides_do_not_touch_the_table():
    cfg = shape("0.5b", 128, vision=TINY_VISION, vocab_size=APPLE_VOCAB_ROWS["0.5b"],
                num_hidden_layers=2, eos_token_id=151645, chat_template="apple")  # fmt: skip
    assert (cfg.text.vocab_size, cfg.text.num_hidden_layers) == (151936, 2)
    assert cfg.text.eos_token_id == 151645 and cfg.chat_template == "apple"
    assert cfg.vision.embed_dims == TINY_VISION["embed_dims"]
    assert TEXT_SHAPES["0.5b"]["vocab_size"] == 152000
    assert TEXT_SHAPES["0.5b"]["num_hidden_layers"] == 24
    assert shape("0.5b").text.num_hidden_layers == 24


@pytest.mark.parametrize("bad", ["0.5B", "3b", "", "tiny "])
def test_unknown_shape_is_a_value_error(bad):
    with pytest.raises(ValueError, match="unknown shape"):
        shape(bad)
