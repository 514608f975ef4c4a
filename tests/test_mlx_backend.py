"""The MLX backend (mlx-vlm's FastVLM run by MLX) against the torch model, on MLX's CPU backend.

Random-weight folders in every checkpoint format give the same logits (fp32, max-abs <= 1e-4),
the same greedy and seeded-sampling tokens, the same `tokens_per_image` pooling and multi-image
merging; the demo model's greedy tokens on the shipped examples are identical.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvlm.config import FastVLMConfig, TextConfig, VisionConfig
from fastvlm.engine.generate import generate_step
from fastvlm.engine.sampling import SamplingParams
from fastvlm.errors import ConfigError
from fastvlm.model.fastvlm import FastVLMModel
from fastvlm.weights import convert_checkpoint, save_checkpoint

from conftest import make_tiny_model, random_pixels, random_prompt, randomize

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_vlm")

from fastvlm.backends.mlx import MlxBackend, pool_matrix  # noqa: E402

ROOT = Path(__file__).parent.parent
TOL = 1e-4


@pytest.fixture(autouse=True)
def mlx_cache(tmp_path, monkeypatch):
    """Conversions of hf / fastvlm folders go to a per-test cache, never the user's."""
    monkeypatch.setenv("FASTVLM_MLX_CACHE", str(tmp_path / "mlx-cache"))
    return tmp_path / "mlx-cache"


def save_all_formats(model: FastVLMModel, root: Path, formats=("fastvlm", "hf", "apple", "mlx")):
    out = {}
    for fmt in formats:
        if fmt == "mlx":  # an mlx-vlm layout folder, written by `fastvlm convert --to mlx`
            out[fmt] = convert_checkpoint(out["apple"], root / "mlx", "mlx")
        else:
            save_checkpoint(model.state_dict(), model.config, root / fmt, fmt)
            out[fmt] = root / fmt
    return out


def mlx_logits(b: MlxBackend, ids: list[int], px, k: int | None = None) -> np.ndarray:
    """Full-sequence logits (T, V) of the mlx model for one prompt (no cache)."""
    rows = None if px is None else b._image_rows(px, k)
    emb = b._embed(ids, rows)
    out = b.model.language_model(mx.array([ids]), inputs_embeds=emb)
    return np.array(out.logits[0].astype(mx.float32))


@torch.no_grad()
def torch_logits(m: FastVLMModel, ids: list[int], px, k: int | None = None) -> np.ndarray:
    emb = None if px is None else m.embed_images(px, k)
    return m(torch.tensor([ids]), image_embeds=emb)[0].numpy()


@pytest.fixture(scope="module")
def tiny_untied():
    return make_tiny_model(seed=1, tie=False)


# ---------------------------------------------------------------------- logit parity
@pytest.mark.parametrize("fmt", ["fastvlm", "hf", "apple", "mlx"])
@pytest.mark.parametrize("tie", [True, False])
def test_logit_parity_every_format(tmp_path, fmt, tie):
    m = make_tiny_model(seed=2, tie=tie)
    folder = save_all_formats(m, tmp_path)[fmt]
    b = MlxBackend.from_folder(folder)
    ids = random_prompt(m.config, 20, 3, image=True)
    px = random_pixels(4)
    want, got = torch_logits(m, ids, px), mlx_logits(b, ids, px)
    assert np.abs(want - got).max() <= TOL
    text = random_prompt(m.config, 9, 5)  # text only: no image rows to merge
    assert np.abs(torch_logits(m, text, None) - mlx_logits(b, text, None)).max() <= TOL
    assert b.dtype == "float32" and b.name == "mlx" and not b.batches_concurrently


@pytest.fixture(scope="module")
def shape_05b(tmp_path_factory):
    """The released shape (FastViTHD widths and depths + Qwen2-0.5B, 152000 vocab rows), fp32,
    random weights; reference logits of one short prompt, and a writer of checkpoint folders.
    At 128 px: MLX's CPU convolutions (x86) take minutes per 1024 px image, and the weights are
    what is under test."""
    text = TextConfig(
        vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
        tie_word_embeddings=True, max_position_embeddings=32768, eos_token_id=151645,
    )  # fmt: skip
    cfg = FastVLMConfig(vision=VisionConfig(image_size=128), text=text)
    torch.manual_seed(0)
    m = randomize(FastVLMModel(cfg), 0)
    ids = random_prompt(cfg, 12, 0, image=True)
    px = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    root = tmp_path_factory.mktemp("shape05b")

    def folder(fmt: str) -> Path:
        save_checkpoint(m.state_dict(), cfg, root / fmt, fmt)
        return root / fmt

    yield ids, px, torch_logits(m, ids, px), folder
    del m
    gc.collect()


@pytest.mark.parametrize("fmt", ["apple", pytest.param("hf", marks=pytest.mark.slow)])
def test_05b_shape_logit_parity(shape_05b, fmt):
    """One prefill at the 0.5B shape per format (hf adds a 2.5 GB conversion: marked slow)."""
    ids, px, want, folder = shape_05b
    b = MlxBackend.from_folder(folder(fmt))
    got = mlx_logits(b, ids, px)
    b.close()
    assert np.abs(want - got).max() <= TOL, (fmt, np.abs(want - got).max())


# ---------------------------------------------------------------------- tokens
def test_greedy_and_seeded_sampling_tokens_match_torch(tmp_path, tiny_untied):
    m = tiny_untied
    b = MlxBackend.from_folder(save_all_formats(m, tmp_path, ("hf",))["hf"])
    ids, px = random_prompt(m.config, 14, 6, image=True), random_pixels(7)
    cases = [
        SamplingParams(max_tokens=24, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.2, top_k=7, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.8, top_p=0.6, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=24, repetition_penalty=1.8, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.7, repetition_penalty=1.3, seed=9),
    ]
    for p in cases:
        want = list(generate_step(m, ids, px, p, eos_ids=[2]))
        g = b.submit(ids, px, p)
        assert list(g) == want, p
        assert g.stats.generation_tokens == len(want) and g.stats.prompt_tokens == len(ids)
        assert g.stats.image_tokens == m.config.num_image_tokens and g.stats.vision_s > 0
        assert g.stats.prefill_s > 0 and g.finish_reason in ("stop", "length")


def test_finish_reasons_eos_length_cancel(tmp_path, tiny_untied):
    m = tiny_untied
    b = MlxBackend.from_folder(save_all_formats(m, tmp_path, ("hf",))["hf"])
    ids = random_prompt(m.config, 10, 8)
    first = list(b.submit(ids, None, SamplingParams(max_tokens=3, ignore_eos=True)))
    # make the first greedy token an EOS id: generation stops there with "stop"
    eos_b = MlxBackend(b.model, b.config, eos_ids=[first[0]])
    g = eos_b.submit(ids, None, SamplingParams(max_tokens=10))
    assert list(g) == [first[0]] and g.finish_reason == "stop"
    g = eos_b.submit(ids, None, SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(list(g)) == 4 and g.finish_reason == "length"
    g = b.submit(ids, None, SamplingParams(max_tokens=50, ignore_eos=True))
    got = []
    for tok in g:
        got.append(tok)
        if len(got) == 2:
            g.cancel()
    assert len(got) == 2 and g.finish_reason == "cancelled"


def test_demo_model_greedy_tokens_identical_on_examples():
    import fastvlm
    from fastvlm.hub import DEFAULT_MODEL

    vlm = fastvlm.load(engine="reference")
    b = MlxBackend.from_folder(
        DEFAULT_MODEL, dtype="float32", eos_ids=vlm.eos_ids, vocab_limit=vlm.vocab_limit
    )
    images = sorted((ROOT / "examples").glob("*.png"))
    assert len(images) >= 4
    for path in images:
        msgs = vlm.describe_messages([str(path)], "Describe this image.")
        ids, px = vlm.encode(msgs)
        p = SamplingParams(max_tokens=48)
        want = list(generate_step(vlm.model, ids, px, p, eos_ids=vlm.eos_ids,
                                  vocab_limit=vlm.vocab_limit))  # fmt: skip
        got = list(b.submit(ids, px, p))
        assert got == want, path.name
        assert want[-1] in vlm.eos_ids  # a whole caption, not a truncated one
        # the torch path gives the exact ground-truth caption; same ids, same text
        assert vlm.tokenizer.decode(got[:-1]) == vlm.describe(str(path))


# ---------------------------------------------------------------------- pooling, multi-image
def test_pool_matrix_is_adaptive_avg_pool():
    for size, out in [(16, 4), (16, 6), (5, 2), (5, 3), (7, 7), (3, 1)]:
        x = torch.randn(2, size)
        want = torch.nn.functional.adaptive_avg_pool1d(x[:, None], out)[:, 0]
        assert torch.allclose(x @ torch.from_numpy(pool_matrix(size, out)).T, want, atol=1e-6)


def test_tokens_per_image_parity(tmp_path):
    """A 5×5 feature grid (320 px) pools to 1, 4, 9, 16 and 25 tokens with uneven bins."""
    m = make_tiny_model(seed=3)
    m.config.vision.image_size = 320
    b = MlxBackend.from_folder(save_all_formats(m, tmp_path, ("fastvlm",))["fastvlm"])
    px = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    for k in (1, 4, 9, 16, 25):
        with torch.no_grad():
            want = m.embed_images(px, k)
        got = b.encode_images(px, k)
        assert got.shape == want.shape == (2, k, 64)
        assert (got - want).abs().max() <= TOL, k
        ids = random_prompt(m.config, 8, k)[:3] + [3] * (2 * k) + random_prompt(m.config, 5, 1)
        assert np.abs(torch_logits(m, ids, px, k) - mlx_logits(b, ids, px, k)).max() <= TOL
        p = SamplingParams(max_tokens=12, ignore_eos=True)
        want_ids = list(generate_step(m, ids, px, p, tokens_per_image=k))
        assert list(b.submit(ids, px, p, tokens_per_image=k)) == want_ids
    with pytest.raises(ValueError, match="perfect square"):
        b.encode_images(px, 8)


def test_multi_image_parity(tmp_path):
    m = make_tiny_model(seed=4)
    b = MlxBackend.from_folder(save_all_formats(m, tmp_path, ("apple",))["apple"])
    n = m.config.num_image_tokens
    g = torch.Generator().manual_seed(2)
    # three very different images (random noise alone gives near-identical pooled features)
    px = torch.stack([torch.zeros(3, 128, 128), torch.full((3, 128, 128), 2.0),
                      torch.randn(3, 128, 128, generator=g) * 3])  # fmt: skip
    text = random_prompt(m.config, 12, 9)
    # images interleaved with text, and two back to back: rows are merged in order
    ids = text[:2] + [3] * n + text[2:5] + [3] * (2 * n) + text[5:]
    assert np.abs(torch_logits(m, ids, px) - mlx_logits(b, ids, px)).max() <= TOL
    p = SamplingParams(max_tokens=16, ignore_eos=True)
    assert list(b.submit(ids, px, p)) == list(generate_step(m, ids, px, p))
    # The merge itself, with distinct rows per image (this random tower is nearly blind to
    # its input): rows land at their placeholders in image order, as torch's masked scatter.
    rows = torch.randn(3, n, 64, generator=g)
    with torch.no_grad():
        want = m.embed(torch.tensor([ids]), rows)[0].numpy()
    got = np.array(b._embed(ids, mx.array(rows.numpy()))[0])
    assert np.array_equal(want, got)
    assert not np.array_equal(np.array(b._embed(ids, mx.array(rows[[2, 1, 0]].numpy()))[0]), got)


# ---------------------------------------------------------------------- errors
def test_submit_refuses_bad_requests(tmp_path, tiny_untied):
    m = tiny_untied
    b = MlxBackend.from_folder(save_all_formats(m, tmp_path, ("hf",))["hf"])
    n = m.config.num_image_tokens
    ids = random_prompt(m.config, 6, 1, image=True)
    px = random_pixels(1)
    bad = [
        (ids, None, {}, "placeholder"),  # image tokens, no image
        (ids[:-1] + [3] * 0, torch.cat([px, px]), {}, "placeholder"),  # 2 images, 1 run
        (ids, px, {"tokens_per_image": 3}, "perfect square"),
        (ids, px, {"tokens_per_image": 4 * n}, "perfect square"),
        ([], None, {}, "empty"),
        (ids * 200, px.repeat(200, 1, 1, 1), {}, "context"),
    ]
    for prompt, pixels, kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            b.submit(prompt, pixels, SamplingParams(max_tokens=4), **kw)
    with pytest.raises(ValueError, match="max_tokens"):
        b.submit(ids, px, SamplingParams(max_tokens=0))
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(ids, px, SamplingParams(max_tokens=1))
    with pytest.raises(RuntimeError, match="closed"):
        b.encode_images(px)


@pytest.mark.parametrize(
    "change,msg",
    [
        (lambda c: setattr(c.vision, "head_dim", 16), "head_dim"),
        (lambda c: setattr(c.vision, "layer_norm_eps", 1e-6), "layer_norm_eps"),
        (lambda c: setattr(c.text, "head_dim", 32), "decoder head_dim"),
    ],
)
def test_unsupported_configs_say_so(tmp_path, change, msg):
    cfg = make_tiny_model().config
    change(cfg)
    from fastvlm.backends.mlx_load import check_supported

    with pytest.raises(ConfigError, match=f"not supported on the mlx backend: .*{msg}"):
        check_supported(cfg)


def test_fastvlm_quantized_folder_is_refused(tiny_dir):
    import json

    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["quantization"] = {"version": 1, "llm": "int8", "projector": "int8", "vision": "none"}
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    out = tiny_dir
    with pytest.raises(ConfigError, match="not supported on the mlx backend: fastvlm int8/int4"):
        MlxBackend.from_folder(out)


def test_missing_mlx_vlm_is_a_config_error_naming_pip(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlx_vlm", None)
    monkeypatch.setitem(sys.modules, "mlx_vlm.models", None)
    monkeypatch.setitem(sys.modules, "mlx_vlm.utils", None)
    m = make_tiny_model()
    save_checkpoint(m.state_dict(), m.config, tmp_path / "a", "apple")
    with pytest.raises(ConfigError, match="pip install"):
        MlxBackend.from_folder(tmp_path / "a")


# ---------------------------------------------------------------------- conversion cache
def test_converted_folder_is_cached_and_refreshed(tmp_path, mlx_cache):
    m = make_tiny_model(seed=5)
    src = save_all_formats(m, tmp_path, ("hf",))["hf"]
    MlxBackend.from_folder(src)
    (made,) = list(mlx_cache.iterdir())
    stamp = (made / "model.safetensors").stat().st_mtime_ns
    MlxBackend.from_folder(src)  # second load: no new conversion
    assert list(mlx_cache.iterdir()) == [made]
    assert (made / "model.safetensors").stat().st_mtime_ns == stamp
    m2 = make_tiny_model(seed=6)
    save_checkpoint(m2.state_dict(), m2.config, src, "hf")  # new weights in the same folder
    b = MlxBackend.from_folder(src)
    assert len(list(mlx_cache.iterdir())) == 2
    ids = random_prompt(m2.config, 9, 2)
    assert np.abs(torch_logits(m2, ids, None) - mlx_logits(b, ids, None)).max() <= TOL
    assert not [p for p in mlx_cache.iterdir() if p.name.startswith(".tmp")]
    assert os.environ["FASTVLM_MLX_CACHE"] == str(mlx_cache)


# ---------------------------------------------------------------------- through fastvlm.load
def test_load_backend_mlx_api(monkeypatch):
    """`fastvlm.load(backend="mlx")` and $FASTVLM_BACKEND: the same captions as torch, multi-image
    and token reduction through the shared API, refusals worded 'not supported on the mlx
    backend'."""
    import fastvlm

    torch_vlm = fastvlm.load(backend="torch")
    vlm = fastvlm.load(backend="mlx")
    assert vlm.backend.name == "mlx" and vlm.backend.info()["batches_concurrently"] is False
    assert vlm.backend.dtype == "float32"  # stored fp16, computed fp32 on MLX's CPU build
    imgs = sorted(str(p) for p in (ROOT / "examples").glob("*.png"))
    for img in imgs:
        assert vlm.describe(img) == torch_vlm.describe(img)
    two = dict(images=imgs[:2], max_tokens=12)
    assert vlm.describe(**two) == torch_vlm.describe(**two)
    pooled = dict(max_tokens=12, tokens_per_image=4)
    assert vlm.describe(imgs[0], **pooled) == torch_vlm.describe(imgs[0], **pooled)
    seeded = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=5, stop=["."])
    assert vlm.describe(imgs[1], **seeded) == torch_vlm.describe(imgs[1], **seeded)
    monkeypatch.setenv("FASTVLM_BACKEND", "mlx")
    assert fastvlm.load().backend.name == "mlx"
    for kw, msg in [
        (dict(device="cuda"), "device 'cuda'"),
        (dict(engine_options={"slots": 4}), "engine options"),
        (dict(vision_dtype="bf16"), "vision_dtype='bf16'"),
        (dict(prefill_dtype="fp32"), "vision_dtype='fp32' / prefill_dtype='fp32'"),
    ]:
        with pytest.raises(ConfigError, match=f"not supported on the mlx backend: {msg}"):
            fastvlm.load(backend="mlx", **kw)


def test_bench_mlx_rows_and_mlx_vlm_compare(capsys):
    import json

    from fastvlm import bench

    rc = bench.main(
        ["--shape", "tiny", "--image-size", "64", "--quant", "fp32,int4", "--max-tokens", "4",
         "--backend", "torch,mlx", "--compare", "mlx-vlm", "--vision-batch", "1",
         "--concurrency", "1", "--repeats", "1"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    names = [r["name"] for r in result["runs"]]
    assert {"fastvlm fp32", "mlx fp32", "mlx int4"} <= set(names)
    ref = result["transformers"][0]  # the reference rows of the table (here mlx-vlm's)
    assert ref["name"] == "mlx-vlm" and ref["decode_tok_s"] > 0 and ref["tokens"] >= 2
    for r in result["runs"]:
        if r["name"].startswith("mlx"):
            assert r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["device"] == "mlx:cpu"
    assert "mlx fp32 decode / mlx-vlm best decode" in result["ratios"]
    assert "mlx-vlm" in out.splitlines()[2]  # a column of the same table


def test_server_on_mlx_serialises_and_says_so():
    """The OpenAI server on the mlx backend: /v1/models says requests are serialised, and
    concurrent chats all succeed with the torch backend's answer."""
    import base64
    import threading

    import httpx
    from server_harness import Server

    import fastvlm
    from fastvlm.server.app import ServerConfig, create_app

    img = ROOT / "examples" / "shapes1.png"
    want = fastvlm.load(backend="torch").describe(str(img), max_tokens=12)
    srv = Server(create_app(ServerConfig(), vlm=fastvlm.load(backend="mlx")))
    try:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert card["backend"] == "mlx" and card["requests_serialized"] is True
        assert card["device"] == "mlx:cpu" and card["dtype"] == "float32"
        url = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
        body = {"model": card["id"], "max_tokens": 12, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe this image."}]}]}  # fmt: skip
        replies: list = []

        def chat():
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
            replies.append((r.status_code, r.json()["choices"][0]["message"]["content"]))

        threads = [threading.Thread(target=chat) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert replies == [(200, want)] * 3
    finally:
        srv.stop()


def test_describe_verbose_prints_the_chosen_backend(capsys, monkeypatch):
    from fastvlm.cli import main

    img = str(ROOT / "examples" / "shapes1.png")
    monkeypatch.setenv("FASTVLM_BACKEND", "mlx")
    assert main(["describe", img, "-v", "--max-tokens", "4"]) == 0
    assert "backend mlx on mlx:cpu, float32]" in capsys.readouterr().err
    assert main(["describe", img, "-v", "--max-tokens", "4", "--backend", "torch"]) == 0
    assert "backend torch on cpu, float32]" in capsys.readouterr().err
