"""Weight-only quantization (fastvlm/quant/): error bounds, kernel == reference path, model-level swaps,
save/load in our format, and the `fastvlm quantize` CLI. Tiny shapes, CPU, seconds."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors import safe_open
from torch import nn

import fastvlm
from fastvlm import kernels, quant
from fastvlm.cli import main as cli_main
from fastvlm.engine.generate import generate_step
from fastvlm.engine.sampling import SamplingParams
from fastvlm.errors import ConfigError
from fastvlm.quant import Int4Linear, Int8Linear, Scheme
from fastvlm.weights import load_model, save_checkpoint

needs_int4 = pytest.mark.skipif(not quant.HAS_INT4_KERNEL, reason="no int4 CPU kernel in torch")
needs_int8 = pytest.mark.skipif(not quant.HAS_INT8_KERNEL, reason="no int8 CPU kernel in torch")


def rand_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    w[0, 3] = 5.0  # an outlier, as real checkpoints have
    w[1] = 0.0  # an all-zero row
    return w


def inputs(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, cfg.text.vocab_size, (10,), generator=g).tolist()
    ids = torch.tensor([text[:4] + [cfg.image_token_id] * cfg.num_image_tokens + text[4:]])
    return ids, torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(
        a.flatten().double(), b.flatten().double(), 0
    ).item()


# ---------------------------------------------------------------------- quantize / dequantize
def test_int8_error_within_half_a_step():
    w = rand_weight(48, 80)
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    err = (quant.dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert q[1].eq(0).all() and q.abs().max() == 127


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_group_error_within_half_a_step(group_size, symmetric):
    w = rand_weight(32, 256)
    q, s, z = quant.quantize_int4(w, group_size, symmetric)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert s.shape == z.shape == (32, 256 // group_size)
    err = (quant.dequantize_int4(q, s, z, group_size) - w).abs().reshape(32, -1, group_size)
    assert (err <= s[..., None] / 2 * (1 + 1e-4) + 1e-7).all()
    assert torch.equal(quant.unpack_nibbles(quant.pack_nibbles(q)), q)


# ---------------------------------------------------------------------- kernel vs reference path
@needs_int8
def test_int8_kernel_matches_dequantized_path():
    lin = nn.Linear(96, 80)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(5, 96)
    ref = m._dequant(x)
    torch.testing.assert_close(m._kernel(x, torch.float32), ref, rtol=1e-5, atol=1e-5)
    # The default CPU path computes in bf16 (fast kernel): bf16-level agreement.
    torch.testing.assert_close(m(x[None])[0], ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ref, lin(x), rtol=0, atol=0.05)  # and close to the float layer


@needs_int4
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_matches_dequantized_path(group_size, monkeypatch):
    monkeypatch.setattr(kernels, "_enabled", False)  # torch's int4 path (test_kernels)
    lin = nn.Linear(256, 48)
    m = Int4Linear.from_linear(lin, Scheme(4, group_size, False))
    x = torch.randn(7, 256)
    ref = m._dequant(x)  # before packing: from the portable nibbles
    m.repack()
    assert m.packed.numel() and not m.qweight.numel()  # the packed copy replaced the portable one
    torch.testing.assert_close(m._kernel(x, torch.float32), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x[None])[0], ref, rtol=3e-2, atol=3e-2)


@needs_int4
def test_int4_state_dict_is_portable_after_packing():
    m = Int4Linear.from_linear(nn.Linear(128, 32, bias=False), Scheme(4, 32, True))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.repack()  # CPU kernel layout (ISA-specific), portable copy freed
    after = m.state_dict()
    assert set(after) == {"qweight", "scales", "zeros"}
    for k in before:
        assert torch.equal(before[k], after[k]), k
    fresh = Int4Linear(128, 32, bias=False, group_size=32, symmetric=True)
    fresh.load_state_dict(after)
    fresh.repack()
    x = torch.randn(3, 128)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


def test_fallback_path_for_unsupported_dtype():
    m = Int8Linear.from_linear(nn.Linear(32, 16))
    x = torch.randn(2, 32, dtype=torch.float64)  # no kernel for float64: dequantized path
    assert m(x).dtype == torch.float64
    torch.testing.assert_close(m(x), m._dequant(x))


def test_int4_without_cpu_kernel_keeps_portable_form(monkeypatch, tmp_path):
    """What CUDA / MPS (or a torch without the op) get: the dequantize-then-matmul path."""
    monkeypatch.setattr(quant.int4, "HAS_INT4_KERNEL", False)
    monkeypatch.setattr(kernels, "_enabled", False)
    model = make_tiny_model(vocab_size=304)
    ids, px = inputs(model.config)
    quant.quantize_model(model, "int4-g32")
    down = model.language_model.layers[0].mlp.down_proj
    assert down.qweight.shape == (64, 64) and not down.packed.numel()
    x = torch.randn(3, 128)
    torch.testing.assert_close(down(x), down._dequant(x), rtol=0, atol=0)
    save_checkpoint(model.state_dict(), model.config, tmp_path, "fastvlm")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids, px), model(ids, px), rtol=0, atol=0)


# ---------------------------------------------------------------------- model level
def test_int8_model_logits_close_and_generation_runs():
    ref_model = make_tiny_model()
    model = make_tiny_model()
    ids, px = inputs(model.config)
    summary = quant.quantize_model(model, "int8")
    assert summary.components["llm"].layers == 15  # 2 layers x 7 + lm_head
    assert summary.bytes_after < summary.bytes_before
    with torch.no_grad():
        ref, out = ref_model(ids, px), model(ids, px)
    assert cosine(out, ref) > 0.99
    toks = list(
        generate_step(model, ids[0].tolist(), px, SamplingParams(max_tokens=8, ignore_eos=True))
    )
    assert len(toks) == 8


@needs_int4
def test_int4_model_close_and_bf16_runs():
    ref_model = make_tiny_model()
    model = make_tiny_model()
    ids, px = inputs(model.config)
    summary = quant.quantize_model(model, "int4-g32")
    assert summary.skipped == ["lm_head"]  # 300 rows: not a multiple of 16 → stays float
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.language_model.layers[0].mlp.down_proj, Int4Linear)
    with torch.no_grad():
        assert cosine(model(ids, px), ref_model(ids, px)) > 0.95
        out16 = model.to(torch.bfloat16)(ids, px)  # scales follow the model dtype
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()


def test_vision_convs_untouched_and_attention_linears_swapped():
    ref = make_tiny_model()
    model = make_tiny_model()
    quant.quantize_model(model, "llm=none,projector=int8,vision=int8")
    convs = {n: m for n, m in model.vision_tower.named_modules() if isinstance(m, nn.Conv2d)}
    ref_convs = {n: m for n, m in ref.vision_tower.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs.keys() == ref_convs.keys() and convs
    for n, m in convs.items():
        assert type(m) is nn.Conv2d and torch.equal(m.weight, ref_convs[n].weight), n
    swapped = [n for n, m in model.vision_tower.named_modules() if isinstance(m, Int8Linear)]
    assert sorted(n.rsplit(".", 1)[-1] for n in swapped) == ["proj", "proj", "qkv", "qkv"]
    assert type(model.language_model.layers[0].mlp.up_proj) is nn.Linear  # llm=none


def test_tied_embedding_stays_float(tmp_path):
    model = make_tiny_model(tie=True)
    emb = model.language_model.embed_tokens.weight.detach().clone()
    summary = quant.quantize_model(model, "int8")
    assert summary.untied_lm_head and not model.config.text.tie_word_embeddings
    assert isinstance(model.lm_head, Int8Linear)
    e = model.language_model.embed_tokens.weight
    assert isinstance(e, nn.Parameter) and e.dtype == torch.float32 and torch.equal(e, emb)
    assert model.lm_head.weight.dtype == torch.float32  # dtype/device probe still works
    save_checkpoint(model.state_dict(), model.config, tmp_path, "fastvlm")
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.language_model.embed_tokens.weight, emb)
    assert isinstance(loaded.lm_head, Int8Linear)


@pytest.mark.parametrize("spec", ["int8", "llm=int4-g32,projector=int8,vision=int8"])
def test_save_load_round_trip_identical_logits(tmp_path, spec):
    if "int4" in spec and not quant.HAS_INT4_KERNEL:
        pytest.skip("no int4 CPU kernel")
    model = make_tiny_model(vocab_size=304)  # 304 rows: lm_head takes int4 too
    ids, px = inputs(model.config)
    quant.quantize_model(model, spec)
    save_checkpoint(model.state_dict(), model.config, tmp_path, "fastvlm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization"] == quant.spec_to_config(quant.parse_spec(spec))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as h:
        keys = set(h.keys())
        q_proj = "language_model.layers.0.self_attn.q_proj"
        assert {f"{q_proj}.qweight", f"{q_proj}.scales", f"{q_proj}.bias"} <= keys
        assert f"{q_proj}.weight" not in keys and "lm_head.qweight" in keys
        if "int4" in spec:  # portable nibbles, (N, K/2) uint8
            assert h.get_slice(f"{q_proj}.qweight").get_shape() == [64, 32]
            assert f"{q_proj}.zeros" in keys
    loaded = load_model(tmp_path)
    assert loaded.config.quantization == cfg["quantization"]
    with torch.no_grad():  # not bitwise: oneDNN convs round differently for weights at
        # unaligned addresses (safetensors offsets; cloning the loaded weights makes it bitwise)
        torch.testing.assert_close(loaded(ids, px), model(ids, px), rtol=0, atol=1e-5)


def test_prepare_for_load_matches_quantized_keys():
    model = make_tiny_model(vocab_size=304)
    quant.quantize_model(model, "llm=int4-g64,projector=int8,vision=int8", finalize_now=False)
    with torch.device("meta"):
        meta = type(model)(model.config)
    quant.prepare_for_load(meta, model.config.quantization)
    got = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want


# ---------------------------------------------------------------------- specs and CLI
def test_presets_and_spec_parsing():
    s = quant.parse_spec("int4")
    assert (str(s["llm"]), str(s["projector"]), str(s["vision"])) == ("int4-g128", "int8", "none")
    assert str(quant.parse_spec("int4-g32")["llm"]) == "int4-g32"
    assert str(quant.parse_spec("llm=int4", group_size=64)["llm"]) == "int4-g64"
    assert str(quant.parse_spec("int4", group_size=32)["llm"]) == "int4-g32"
    assert str(quant.parse_spec("llm=int4-g32-sym, vision=int8")["llm"]) == "int4-g32-sym"
    assert quant.parse_spec(quant.spec_to_config(s)) == s


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("llm=int3", "unknown quantization scheme"),
        ("decoder=int8", "unknown component"),
        ("llm=int4-g48", "group size"),
        ("fast", "expected a preset"),
        ("llm=int8,llm=int4", "twice"),
    ],
)
def test_bad_spec_is_a_clear_error(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        quant.parse_spec(spec)


def test_cli_quantize(tiny_dir, tmp_path, capsys):
    dst = tmp_path / "q"
    rc = cli_main(
        ["quantize", str(tiny_dir), str(dst), "--quant", "llm=int8,projector=int8", "--quiet"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "llm" in out and "wrote quantized checkpoint" in out
    assert (dst / "tokenizer.json").exists() and (dst / "model.safetensors").exists()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["llm"] == "int8"
    vlm = fastvlm.load(dst, device="cpu", dtype="float32")  # the user-facing path
    assert isinstance(vlm.model.language_model.layers[0].self_attn.q_proj, Int8Linear)
    image = torch.rand(3, 64, 80).mul(255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert isinstance(vlm.describe(image, max_tokens=4), str)
    assert cli_main(["quantize", str(tiny_dir), str(dst)]) == 1  # not empty: refused


def test_cli_bad_spec(tiny_dir, tmp_path, capsys):
    assert cli_main(["quantize", str(tiny_dir), str(tmp_path / "q"), "--quant", "llm=int2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "int2" in err
    assert not (tmp_path / "q").exists()
