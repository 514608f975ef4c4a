"""Image loading, pixel preprocessing, chat templates, tokenization, detokenization."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastvlm.config import FastVLMConfig
from fastvlm.errors import ImageError, TokenizerError
from fastvlm.images import expand2square, load_image, preprocess_image
from fastvlm.processing import Processor, render_chat, render_segments
from fastvlm.tokenization import IncrementalDetokenizer


def png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------- loading
def test_inputs_of_every_kind_agree(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    path = tmp_path / "x.png"
    img.save(path)
    data = png_bytes(img)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for src in (str(path), path, data, img, arr, url, torch.from_numpy(arr).permute(2, 0, 1)):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (30, 20)
        assert np.array_equal(np.asarray(out), arr), type(src)
    f = arr.astype(np.float32) / 255  # float arrays in [0, 1]
    assert np.abs(np.asarray(load_image(f)).astype(int) - arr).max() <= 1


def test_modes_are_converted_sensibly():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 255, 0, 255))
    out = np.asarray(load_image(rgba))
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[1, 1]) == (0, 0, 0)  # onto black
    la = Image.new("LA", (2, 2), (200, 255))
    assert tuple(np.asarray(load_image(la))[0, 0]) == (200, 200, 200)
    p = Image.new("P", (2, 2))
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 1)
    assert tuple(np.asarray(load_image(p))[0, 0]) == (10, 20, 30)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert tuple(np.asarray(load_image(cmyk))[0, 0]) == (255, 0, 0)
    i16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert i16.mode.startswith("I;16")
    assert tuple(np.asarray(load_image(i16))[0, 0]) == (255, 255, 255)  # not clipped garbage
    half = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    assert 126 <= np.asarray(load_image(half))[0, 0, 0] <= 129


def test_exif_rotation_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° CW on display
    out = load_image(png_bytes(img, "JPEG", exif=exif))
    assert out.size == (20, 40)


def test_bad_images_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "bad.png")
    truncated = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    with pytest.raises(ImageError):
        load_image(truncated)
    with pytest.raises(ImageError, match="URLs are not fetched"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageError, match="base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="unsupported"):
        load_image(12345)


def test_decompression_bomb_guard_kept(monkeypatch):
    data = png_bytes(Image.new("L", (300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300² > 2x the limit
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data)


# ---------------------------------------------------------------- pixels
def test_pad_mode_letterboxes_with_black():
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    px = preprocess_image(img, 64, "pad")
    assert px.shape == (3, 64, 64) and px.dtype == torch.float32
    assert px[:, :14].abs().max() == 0 and px[:, -14:].abs().max() == 0  # top/bottom bars
    assert torch.allclose(px[:, 20:44], torch.ones(3, 24, 64))  # content white, range [0, 1]
    sq = expand2square(Image.new("RGB", (3, 6), (9, 9, 9)), (0, 0, 0))
    assert (
        sq.size == (6, 6) and sq.getpixel((0, 0)) == (0, 0, 0) and sq.getpixel((1, 0)) == (9, 9, 9)
    )


def test_crop_mode_cuts_long_axis():
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100] = 255  # white left third is cut off by a centre crop
    px = preprocess_image(Image.fromarray(arr), 64, "crop")
    assert px.shape == (3, 64, 64)
    assert px.max() < 0.2  # only the black middle survives


def test_normalisation_uses_mean_std():
    img = Image.new("RGB", (8, 8), (255, 0, 51))
    px = preprocess_image(img, 8, "pad", mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    assert torch.allclose(px[:, 0, 0], torch.tensor([1.0, -2.0, -0.6]), atol=1e-6)


# ---------------------------------------------------------------- chat template
MSGS = [
    {"role": "user", "content": [{"type": "image", "image": "a"}, {"type": "text", "text": "Q1"}]},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": [{"type": "text", "text": "Q2"}]},
]


def test_apple_template_matches_conv_qwen_2():
    prompt, images = render_chat(MSGS, "apple")
    assert images == ["a"]
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_hf_template_prefixes_text_with_newline():
    prompt, _ = render_chat(MSGS, "hf")
    assert "<|im_start|>user\n<image>\nQ1<|im_end|>" in prompt
    assert "<|im_start|>assistant\n\nA1<|im_end|>" in prompt
    assert "<|im_start|>user\n\nQ2<|im_end|>" in prompt


def test_system_message_replaces_default_and_openai_parts():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}, "hi"]},
    ]
    prompt, images = render_chat(msgs, "apple")
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "helpful" not in prompt and images == ["data:x"]


def test_bad_messages():
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="only allowed in user"):
        render_chat([{"role": "assistant", "content": [{"type": "image", "image": "a"}]}])
    with pytest.raises(ValueError, match="unsupported content part"):
        render_chat([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="empty"):
        render_chat([])


def test_segments_flag_only_assistant_replies():
    segs, _ = render_segments(MSGS, "apple", add_generation_prompt=False)
    trained = [t for t, flag in segs if flag]
    assert trained == ["A1<|im_end|>"]
    assert "".join(t for t, _ in segs) == render_chat(MSGS, "apple", add_generation_prompt=False)[0]


# ---------------------------------------------------------------- tokenization
def test_image_placeholders_expanded(tokenizer):
    cfg = FastVLMConfig()
    cfg.vision.image_size = 128  # 4 image tokens
    cfg.image_token_id = 3
    proc = Processor(cfg, tokenizer)
    ids = proc.tokenize("ab<image>cd<image>", 2)
    assert ids.count(3) == 8
    first = ids.index(3)
    assert ids[first : first + 4] == [3] * 4
    assert tokenizer.decode([i for i in ids if i != 3]) == "abcd"
    with pytest.raises(ValueError, match="markers"):
        proc.tokenize("<image>", 2)


def test_no_tokenizer_is_a_clear_error():
    proc = Processor(FastVLMConfig(), None)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        proc.tokenize("hello")


def test_incremental_detokenizer_never_splits_utf8(tokenizer):
    text = "héllo wörld ✓ 🙂 日本語 and 🙂🙂 done"
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len([d for d in deltas if d]) > 5  # really incremental
