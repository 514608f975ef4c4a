"""Multi-image prompts, token reduction (tokens_per_image) and video input: tiny random models and
the embedded demo model on CPU; images and videos are generated in the test (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import has_module, randomize, tiny_config
from PIL import Image

import fastvlm
from fastvlm.cli import main
from fastvlm.engine.engine import Engine
from fastvlm.engine.generate import generate_step
from fastvlm.engine.sampling import SamplingParams
from fastvlm.errors import ImageError, VideoError
from fastvlm.model.fastvlm import FastVLMModel
from fastvlm.processing import Processor

EXAMPLES = Path(__file__).parent.parent / "examples"
needs_av = pytest.mark.skipif(not has_module("av"), reason="PyAV not installed (fastvlm[video])")


def image(seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the consecutive runs of `token` in `ids`."""
    out, n = [], 0
    for i in [*ids, None]:
        if i == token:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def img_part(im) -> dict:
    return {"type": "image", "image": im}


TEXT = {"type": "text", "text": "Describe this image."}


# ---------------------------------------------------------------------- multi-image
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory, tokenizer):
    from conftest import make_tiny_model

    from fastvlm.weights import save_checkpoint

    d = tmp_path_factory.mktemp("tiny") / "m"
    model = make_tiny_model(seed=1, vocab_size=tokenizer.get_vocab_size(), tie=False)
    save_checkpoint(model.state_dict(), model.config, d, "fastvlm")
    tokenizer.save(str(d / "tokenizer.json"))
    return fastvlm.load(str(d), device="cpu")


@pytest.fixture(scope="module")
def demo():
    return fastvlm.load(device="cpu")  # the trained demo model: its image features matter


def test_two_images_two_runs_and_the_model_sees_both(demo):
    vlm, a, b = demo, EXAMPLES / "shapes3.png", EXAMPLES / "shapes4.png"
    n = vlm.num_image_tokens
    ids, px = vlm.encode(user(img_part(a), img_part(b), TEXT))
    assert runs(ids, vlm.image_token_id) == [n, n] and px.shape[0] == 2

    def last_logits(*ims):
        ids, px = vlm.encode(user(*[img_part(i) for i in ims], TEXT))
        with torch.no_grad():
            return vlm.model(torch.tensor([ids]), px)[0, -1]

    ab = last_logits(a, b)
    for other in (last_logits(a, a), last_logits(b, b), last_logits(b, a), last_logits(a)):
        assert (ab - other).abs().max() > 1e-2
    text = vlm.describe(images=[a, b], max_tokens=4)
    assert isinstance(text, str) and vlm.last_stats.image_tokens == 2 * n


def test_images_across_a_conversation(tiny_vlm):
    vlm = tiny_vlm
    msgs = [
        *user(img_part(image(1)), TEXT),
        {"role": "assistant", "content": "a square"},
        *user(img_part(image(2)), {"type": "text", "text": "And this one?"}),
    ]
    ids, px = vlm.encode(msgs)
    assert len(runs(ids, vlm.image_token_id)) == 2 and px.shape[0] == 2
    vlm.chat(msgs, max_tokens=3)


def test_max_images_is_a_clear_error(tiny_vlm, tmp_path):
    with pytest.raises(ImageError, match=r"3 images .* limit is 2"):
        tiny_vlm.describe(images=[image(1), image(2), image(3)], max_images=2, max_tokens=2)
    paths = []
    for i in range(3):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        image(i).save(paths[-1])
    assert main(["describe", *paths, "--model", str(tiny_vlm.path), "--max-images", "2"]) == 1


def test_cli_repeated_image_is_one_prompt(tiny_vlm, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    image(1).save(a)
    image(2).save(b)
    argv = ["describe", "--image", str(a), "--image", str(b), "--model", str(tiny_vlm.path)]
    assert main([*argv, "--json", "--max-tokens", "4"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(rows) == 1 and rows[0]["image_tokens"] == 2 * tiny_vlm.num_image_tokens
    assert rows[0]["text"] == tiny_vlm.describe(images=[str(a), str(b)], max_tokens=4)


# ---------------------------------------------------------------------- token reduction
@pytest.fixture(scope="module")
def model_1024():
    cfg = tiny_config()
    cfg.vision.image_size = 1024  # native grid 16 × 16 = 256 tokens, like the released models
    torch.manual_seed(0)
    return randomize(FastVLMModel(cfg), 0)


def test_pooling_to_64_tokens(model_1024, tokenizer):
    m = model_1024
    assert m.config.num_image_tokens == 256
    px = torch.rand(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m.encode_images(px)  # (2, 256, C)
        pooled = m.embed_images(px, 64)
        feats = m.encode_images(px, 64)
    assert full.shape[1] == 256 and pooled.shape == (2, 64, m.config.text.hidden_size)
    grid = full.transpose(1, 2).reshape(2, -1, 16, 16)
    manual = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # 2×2 means, row-major
    torch.testing.assert_close(feats, manual)

    proc = Processor(m.config, tokenizer)
    msgs = user(img_part(image(1)), img_part(image(2)), TEXT)
    ids, pixels, _ = proc(msgs, tokens_per_image=64)
    assert runs(ids, m.config.image_token_id) == [64, 64]
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    ref = list(generate_step(m, ids, pixels, p, tokens_per_image=64))
    assert len(ref) == 6
    eng = Engine(m, slots=2, max_len=256)
    assert eng.submit(ids, pixels, p, tokens_per_image=64).result() == ref
    with pytest.raises(ValueError, match="placeholder"):  # 64-token runs, native pixels
        eng.submit(ids, pixels, p)
    # the vision cache keys include the pooling: same pixels, another size → a fresh encode
    ids16, _, _ = proc(msgs, tokens_per_image=16)
    calls = eng.counters["vision_calls"]
    assert len(eng.submit(ids16, pixels, p, tokens_per_image=16).result()) == 6
    assert eng.counters["vision_calls"] == calls + 1
    assert len(eng.submit(ids, pixels, p, tokens_per_image=64).result()) == 6
    assert eng.counters["vision_calls"] == calls + 1  # cached


@pytest.mark.parametrize("bad", [0, -4, 63, 300, 1024, 2.0])
def test_bad_tokens_per_image(model_1024, tokenizer, bad):
    proc = Processor(model_1024.config, tokenizer)
    with pytest.raises(ValueError, match="perfect square"):
        proc(user(img_part(image(1)), TEXT), tokens_per_image=bad)
    with pytest.raises(ValueError, match="perfect square"):
        Engine(model_1024, slots=1, max_len=64).submit(
            [1, 2],
            torch.zeros(1, 3, 1024, 1024),
            SamplingParams(max_tokens=2),
            tokens_per_image=bad,
        )


def test_demo_model_token_reduction_end_to_end(demo):
    vlm = demo  # 256 px demo model: 4 × 4 = 16 native tokens
    assert vlm.num_image_tokens == 16
    for k in (16, 4, 1):
        text = vlm.describe(EXAMPLES / "shapes3.png", max_tokens=8, tokens_per_image=k)
        assert text and vlm.last_stats.image_tokens == k
    ref = fastvlm.load(device="cpu", engine="reference") if _has_engine_kw() else vlm
    assert ref.describe(EXAMPLES / "shapes3.png", max_tokens=8, tokens_per_image=4) == vlm.describe(
        EXAMPLES / "shapes3.png", max_tokens=8, tokens_per_image=4
    )


def _has_engine_kw() -> bool:
    import inspect

    return "engine" in inspect.signature(fastvlm.load).parameters


# ---------------------------------------------------------------------- video
def make_video(path, seconds: float = 3, fps: int = 10, size: int = 64) -> None:
    """A clip whose frames show their index in binary (5 black/white bands), so the order of the
    decoded frames is checkable despite lossy compression."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            a = np.zeros((size, size, 3), np.uint8)
            for bit in range(5):
                if i >> bit & 1:
                    a[:, bit * size // 5 : (bit + 1) * size // 5] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    if not has_module("av"):
        pytest.skip("PyAV not installed (fastvlm[video])")
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    make_video(path)
    return path


def frame_number(frame) -> int:
    a = np.asarray(frame.image.convert("L"), dtype=np.float64)
    w = a.shape[1] // 5
    return sum(1 << b for b in range(5) if a[:, b * w + 2 : (b + 1) * w - 2].mean() > 128)


@needs_av
@pytest.mark.parametrize(
    "fps,max_frames,expect_times",
    [
        (None, 7, None),  # uniform: 7 frames spread over 0.0 .. 2.9 s
        (2, 16, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]),
        (1, 16, [0.0, 1.0, 2.0]),
        (10, 4, [0.0, 1.0, 1.9, 2.9]),  # 30 picks thinned evenly to 4
    ],
)
def test_video_frames_in_time_order(clip, fps, max_frames, expect_times):
    from fastvlm.video import read_frames

    frames = read_frames(clip, fps=fps, max_frames=max_frames)
    times = [f.time for f in frames]
    assert len(frames) == (max_frames if expect_times is None else len(expect_times))
    if expect_times is not None:
        assert times == pytest.approx(expect_times, abs=1e-3)
    else:
        assert times[0] == 0.0 and times[-1] == pytest.approx(2.9, abs=1e-3)
    assert times == sorted(times) and len(set(times)) == len(times)
    for f in frames:  # the decoded pixels are the frame shown at that time
        assert frame_number(f) == f.index == round(f.time * 10), (f.time, frame_number(f))
        assert f.image.size == (64, 64)


@needs_av
def test_video_prompt_has_timestamps_and_one_run_per_frame(clip, demo):
    vlm = demo
    part = {"type": "video", "video": str(clip), "fps": 1}
    ids, px, prompt = vlm.processor(user(part, TEXT), tokens_per_image=4)
    assert "Frame 1 (0.0 s): <image>\nFrame 2 (1.0 s): <image>\nFrame 3 (2.0 s): <image>" in prompt
    assert runs(ids, vlm.image_token_id) == [4, 4, 4] and px.shape[0] == 3
    assert vlm.chat(user(part, TEXT), tokens_per_image=4, max_tokens=6)
    assert vlm.last_stats.image_tokens == 12
    with pytest.raises(ImageError, match="limit is 2"):
        vlm.chat(user(part, TEXT), max_images=2, max_tokens=2)


@needs_av
def test_unreadable_video_clear_errors(tmp_path, clip):
    from fastvlm.video import read_frames

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    with pytest.raises(VideoError, match="bad.mp4: not a readable video"):
        read_frames(bad)
    with pytest.raises(VideoError, match="video not found"):
        read_frames(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="over the 0 MiB video limit"):
        read_frames(clip, max_bytes=100)
    with pytest.raises(VideoError, match="pixel limit"):
        read_frames(clip, max_pixels=100)
    # CLI: one `error:` line, exit 1; a bad video is a bad input like a bad image
    assert main(["describe", str(bad), "--max-tokens", "2"]) == 1


@needs_av
def test_cli_describe_video_and_watch(clip, capsys):
    argv = ["describe", str(clip), "--fps", "1", "--max-frames", "16", "--tokens-per-image", "4"]
    assert main([*argv, "--json", "--max-tokens", "5"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["image_tokens"] == 12 and row["text"]
    assert main(["watch", str(clip), "--every", "1s", "--frames", "2", "--json"]
                + ["--max-tokens", "4", "--tokens-per-image", "1"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(r["start"], r["end"]) for r in rows] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    assert all(len(r["frames"]) == 2 and r["text"] for r in rows)
    assert rows[1]["frames"][0] >= 1.0 and rows[1]["frames"][-1] < 2.0


def test_parse_seconds():
    from fastvlm.video import parse_seconds

    assert parse_seconds("2s") == 2.0 and parse_seconds("500ms") == 0.5
    assert parse_seconds("1m") == 60.0 and parse_seconds("1.5") == 1.5
    with pytest.raises(ValueError, match="duration"):
        parse_seconds("soon")
