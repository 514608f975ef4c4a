"""Numerical parity with transformers' FastVlmForConditionalGeneration.

Default run: against golden fixtures made by scripts/make_fixtures.py (transformers + timm, see
tests/fixtures/README.md), so no reference library is needed. With transformers + timm installed
(`pip install -e ".[parity]"`), the `parity` tests also compare against a live reference; the
`slow` one does it at the full FastVLM-0.5B shape.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import FIXTURES, has_module

import fastvlm
from fastvlm.processing import render_chat

GOLDEN = FIXTURES / "tiny_golden.safetensors"
needs_fixtures = pytest.mark.skipif(not GOLDEN.exists(), reason="fixtures not generated")


@pytest.fixture(scope="module")
def golden():
    """Golden tensors; pixels are stored as the uint8 values the reference rescales by 1/255."""
    from safetensors.torch import load_file

    g = load_file(str(GOLDEN))
    for mode in ("crop", "pad"):
        g[f"pixel_values_{mode}"] = (g[f"pixel_values_{mode}_u8"].double() * (1 / 255)).float()
    return g


@pytest.fixture(scope="module")
def hf_vlm():
    return fastvlm.load(str(FIXTURES / "tiny_hf"), device="cpu")


@pytest.fixture(scope="module")
def apple_vlm():
    return fastvlm.load(str(FIXTURES / "tiny_apple"), device="cpu")


@needs_fixtures
def test_formats_detected(hf_vlm, apple_vlm):
    assert hf_vlm.config.format == "hf" and apple_vlm.config.format == "apple"
    assert hf_vlm.image_token_id == apple_vlm.image_token_id
    assert hf_vlm.num_image_tokens == apple_vlm.num_image_tokens == 9


@needs_fixtures
def test_pixels_match_both_references(golden, hf_vlm, apple_vlm):
    photo = FIXTURES / "photo.png"
    crop, pad = hf_vlm.preprocess(photo), apple_vlm.preprocess(photo)
    torch.testing.assert_close(crop, golden["pixel_values_crop"], rtol=0, atol=1e-6)
    torch.testing.assert_close(pad, golden["pixel_values_pad"], rtol=0, atol=1e-6)
    assert (crop - pad).abs().max() > 0.1  # the two framings really differ on this photo


@needs_fixtures
def test_logits_match_transformers(golden, hf_vlm):
    with torch.no_grad():
        logits = hf_vlm.model(golden["input_ids"], golden["pixel_values_crop"])
        logits_pad = hf_vlm.model(golden["input_ids"], golden["pixel_values_pad"])
    assert logits.shape == golden["logits"].shape
    assert (logits - golden["logits"]).abs().max() <= 1e-4
    assert (logits_pad - golden["logits_pad"]).abs().max() <= 1e-4
    assert (golden["logits"] - golden["logits_pad"]).abs().max() > 1e-2  # images matter


@needs_fixtures
def test_image_features_match(golden, hf_vlm):
    with torch.no_grad():
        feats = hf_vlm.model.embed_images(golden["pixel_values_crop"])
    torch.testing.assert_close(feats, golden["image_features"], rtol=0, atol=1e-4)


@needs_fixtures
def test_apple_format_gives_identical_logits(golden, hf_vlm, apple_vlm):
    ids, px = golden["input_ids"], golden["pixel_values_crop"]
    with torch.no_grad():
        a, h = apple_vlm.model(ids, px), hf_vlm.model(ids, px)
    torch.testing.assert_close(a, h, rtol=0, atol=1e-6)


@needs_fixtures
def test_greedy_tokens_match_transformers(golden, hf_vlm, apple_vlm):
    expected = golden["greedy_tokens"][0].tolist()
    for vlm in (hf_vlm, apple_vlm):
        out = vlm.generate_ids(
            golden["input_ids"][0].tolist(),
            golden["pixel_values_crop"],
            max_tokens=32,
            ignore_eos=True,
        )
        assert out == expected


# ---------------------------------------------------------------- chat templates
CHAT = FIXTURES / "chat_goldens.json"
QWEN_TOK = FIXTURES / "qwen2_tokenizer.json.gz"


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(gzip.decompress(QWEN_TOK.read_bytes()).decode())


@pytest.mark.skipif(not CHAT.exists(), reason="fixtures not generated")
def test_chat_template_and_ids_match_transformers(qwen_tokenizer):
    from fastvlm.config import FastVLMConfig
    from fastvlm.processing import Processor

    cases = json.loads(CHAT.read_text())
    assert len(cases) >= 8
    for case in cases:
        style = case["format"]
        prompt, images = render_chat(case["messages"], style)
        assert prompt == case["prompt"], case["name"]
        cfg = FastVLMConfig()  # 1024 px → 256 placeholders of id 151646, as the HF processor
        proc = Processor(cfg, qwen_tokenizer)
        assert proc.tokenize(prompt, len(images)) == case["input_ids"], case["name"]


# ---------------------------------------------------------------- live reference
live = pytest.mark.skipif(
    not (has_module("transformers") and has_module("timm")), reason="needs transformers + timm"
)


def _live_model(
    text_kw: dict, model_args: dict, image_size: int, seed: int = 0, gamma_std: float = 0.5
):
    """A random transformers FastVLM with every weight and BN statistic randomised."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

    cfg = FastVlmConfig(
        vision_config={
            "architecture": "fastvit_mci3",
            "model_args": {"inference_mode": True, **model_args},
            "hidden_size": model_args.get("embed_dims", (96, 192, 384, 768, 1536))[-1] * 2,
        },
        text_config={"model_type": "qwen2", **text_kw},
        image_token_id=text_kw["vocab_size"] - 1,
    )
    torch.manual_seed(seed)
    model = FastVlmForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.normal_(0, gamma_std)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model


def _compare_live(tmp_path, model, image_size: int, n_tokens: int) -> float:
    model.save_pretrained(tmp_path)
    pre = {
        "crop_size": {"height": image_size, "width": image_size},
        "size": {"shortest_edge": image_size},
        "image_mean": [0, 0, 0],
        "image_std": [1, 1, 1],
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    vlm = fastvlm.load(str(tmp_path), device="cpu", dtype="float32")
    img_id = model.config.image_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, img_id - 1, (1, 12), generator=g)
    ids = torch.cat([ids[:, :5], torch.full((1, n_tokens), img_id), ids[:, 5:]], 1)
    px = torch.rand(1, 3, image_size, image_size, generator=g)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
        ours = vlm.model(ids, px)
    assert torch.isfinite(ref).all() and ref.std() > 1e-2  # a meaningful comparison
    return float((ref - ours).abs().max())


@pytest.mark.parity
@live
def test_live_tiny_parity(tmp_path):
    text = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = _live_model(text, {"layers": (1, 1, 1, 1, 1), "embed_dims": (8, 16, 32, 64, 128)}, 128)
    assert _compare_live(tmp_path, model, 128, 4) <= 1e-4


@pytest.mark.slow
@pytest.mark.parity
@live
def test_live_full_05b_shape_parity(tmp_path):
    """FastVLM-0.5B shape (FastViTHD + Qwen2-0.5B), random weights, fp32, 1024² input."""
    from fastvlm.config import TEXT_SHAPES as SHAPES

    text = dict(SHAPES["0.5b"])  # the Qwen2-0.5B decoder config `fastvlm bench --shape 0.5b` uses
    model = _live_model(text, {}, 1024, gamma_std=0.05)  # 0.5 would blow up over 44 blocks
    diff = _compare_live(tmp_path, model, 1024, 256)
    print(f"0.5B-shape max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4
