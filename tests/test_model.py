"""Model math and checkpoint handling on tiny random configs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, randomize, tiny_config

import fastvlm
from fastvlm.config import VisionConfig
from fastvlm.engine.generate import generate_step
from fastvlm.engine.sampling import SamplingParams
from fastvlm.errors import CheckpointError, ConfigError
from fastvlm.model.fastvithd import FastViTHD
from fastvlm.weights import KeyMap, convert_checkpoint, load_model, save_checkpoint


def prompt_ids(cfg, n_images=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, cfg.text.vocab_size, (12,), generator=g).tolist()
    return text[:5] + [cfg.image_token_id] * cfg.num_image_tokens * n_images + text[5:]


def test_reparameterize_matches_train_form():
    vc = VisionConfig(
        layers=(1, 2, 1, 1, 1),
        embed_dims=(8, 16, 32, 64, 128),
        image_size=128,
        inference_mode=False,
    )
    torch.manual_seed(0)
    net = randomize(FastViTHD(vc))
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        before = net(x)
        net.reparameterize()
        after = net(x)
    fused_keys = set(
        FastViTHD(
            VisionConfig(layers=(1, 2, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128))
        ).state_dict()
    )
    assert set(net.state_dict()) == fused_keys  # same names as released checkpoints
    assert before.shape == (2, 256, 2, 2)
    assert torch.allclose(before, after, atol=1e-4 * before.abs().max().item())
    assert before.std() > 0.05  # not a degenerate comparison


def test_full_size_vision_parameter_count():
    with torch.device("meta"):
        net = FastViTHD(VisionConfig())
    assert sum(p.numel() for p in net.parameters()) == 122_714_208  # FASTVLM_REFERENCE §1.6


@pytest.mark.parametrize("fmt", ["apple", "hf", "fastvlm"])
def test_keymap_round_trip_and_save_load(tmp_path, fmt):
    model = make_tiny_model()
    km = KeyMap(fmt, model.config.vision)
    for k in model.state_dict():
        if not k.endswith("num_batches_tracked"):  # junk, dropped on purpose
            assert km.to_internal(km.from_internal(k)) == k
    save_checkpoint(model.state_dict(), model.config, tmp_path, fmt)
    loaded = load_model(tmp_path)
    ids = torch.tensor([prompt_ids(model.config)])
    px = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, px), loaded(ids, px), rtol=0, atol=1e-5)
    assert loaded.lm_head.weight is loaded.language_model.embed_tokens.weight


def test_hf_names_follow_timm_layout(tmp_path):
    model = make_tiny_model()
    save_checkpoint(model.state_dict(), model.config, tmp_path, "hf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    prefix = "model.vision_tower.timm_model."
    for k in [
        "stem.0.reparam_conv.weight",
        "stages.1.downsample.proj.0.reparam_conv.weight",
        "stages.3.pos_emb.reparam_conv.weight",
        "stages.3.blocks.0.layer_scale_1.gamma",
        "stages.0.blocks.0.mlp.conv.bn.running_var",
        "final_conv.se.fc1.weight",
    ]:
        assert prefix + k in keys, k
    assert "model.multi_modal_projector.linear_2.bias" in keys
    assert "model.language_model.layers.1.self_attn.q_proj.bias" in keys


def test_untied_head(tmp_path):
    model = make_tiny_model(tie=False)
    assert model.lm_head.weight is not model.language_model.embed_tokens.weight
    save_checkpoint(model.state_dict(), model.config, tmp_path, "apple")
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_kv_cached_greedy_equals_uncached_argmax():
    model = make_tiny_model(seed=3, tie=False)  # untied: a random model then wanders, not repeats
    ids = prompt_ids(model.config)
    px = torch.rand(1, 3, 128, 128)
    fast = list(generate_step(model, ids, px, SamplingParams(max_tokens=24, ignore_eos=True)))
    seq, slow = list(ids), []
    with torch.no_grad():
        for _ in range(24):
            nxt = int(model(torch.tensor([seq]), px)[0, -1].argmax())
            slow.append(nxt)
            seq.append(nxt)
    assert fast == slow
    assert len(set(fast)) > 3  # a non-degenerate sequence


def test_image_count_mismatch_is_an_error():
    model = make_tiny_model()
    ids = torch.tensor([prompt_ids(model.config)[:-3] + [model.config.image_token_id]])
    with pytest.raises(ValueError, match="do not match"):
        model(ids, torch.rand(1, 3, 128, 128))


# ---------------------------------------------------------------- broken checkpoints
def _saved(tmp_path, fmt="fastvlm"):
    model = make_tiny_model()
    save_checkpoint(model.state_dict(), model.config, tmp_path, fmt)
    return model


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("language_model.norm.weight")
    sd["language_model.bogus.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"language_model\.norm\.weight.*language_model\.bogus"
    ):
        load_model(tmp_path)


def test_shape_mismatch(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text"]["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path)


def test_corrupt_safetensors(tmp_path):
    _saved(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt|truncated|cannot read"):
        load_model(tmp_path)


def test_pickle_refused_unless_trusted(tmp_path):
    model = _saved(tmp_path)
    sd = {k: v for k, v in model.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        fastvlm.load(str(tmp_path))
    vlm = fastvlm.load(str(tmp_path), trust_pickle=True)
    assert torch.equal(vlm.model.lm_head.weight, model.lm_head.weight)


def test_wrong_config(tmp_path):
    _saved(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="not a FastVLM"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path)


def test_sharded_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _saved(tmp_path, "hf")
    sd = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate([keys[:half], keys[half:]]):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("src_fmt,dst_fmt", [("hf", "apple"), ("apple", "hf"), ("fastvlm", "hf")])
def test_convert_round_trip_is_lossless(tmp_path, src_fmt, dst_fmt):
    from safetensors.torch import load_file

    model = make_tiny_model()
    model.config.image_aspect_ratio = "crop" if src_fmt == "hf" else "pad"
    save_checkpoint(model.state_dict(), model.config, tmp_path / "a", src_fmt)
    convert_checkpoint(tmp_path / "a", tmp_path / "b", dst_fmt)
    convert_checkpoint(tmp_path / "b", tmp_path / "c", src_fmt)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert a.keys() == c.keys()
    assert all(torch.equal(a[k], c[k]) for k in a)
    b = load_model(tmp_path / "b")
    assert b.config.format == dst_fmt
    assert b.config.image_aspect_ratio == model.config.image_aspect_ratio  # kept via extras
    ids = torch.tensor([prompt_ids(model.config)])
    px = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, px), b(ids, px), rtol=0, atol=1e-5)


def test_convert_refuses_non_empty_destination(tmp_path):
    _saved(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert_checkpoint(tmp_path / "a", tmp_path / "b", "hf")
    assert (tmp_path / "b" / "x").read_text() == "keep me"


def test_image_size_override_changes_token_count(tiny_dir):
    vlm = fastvlm.load(str(tiny_dir), image_size=192)
    assert vlm.num_image_tokens == 9
    assert vlm.preprocess(torch.rand(50, 80, 3)).shape == (1, 3, 192, 192)
    with pytest.raises(ConfigError, match="multiple"):
        fastvlm.load(str(tiny_dir), image_size=100)


def test_tiny_config_validation():
    cfg = tiny_config()
    cfg.vision.embed_dims = (8, 16, 32, 48, 128)
    with pytest.raises(ConfigError):
        cfg.validate()


def test_unknown_model_is_a_typed_error(monkeypatch):
    from fastvlm.errors import ModelNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        fastvlm.load("nobody/no-such-model-xyz")
    with pytest.raises(ModelNotFoundError, match="neither a local folder"):
        fastvlm.load("./no/such/folder")


def test_channels_last_vision_tower_matches_contiguous():
    """`prepare_for_device(model, "cpu")` (what fastvlm.load does) changes only the memory layout
    and the execution plan of the tower: same features, same parameters, same state dict."""
    from fastvlm.device import CPUFastViTHD, prepare_for_device

    model = make_tiny_model(seed=4)
    keys = list(model.state_dict())
    px = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.encode_images(px)
        assert prepare_for_device(model, "cpu") is model
        assert type(model.vision_tower) is CPUFastViTHD
        assert model.vision_tower.patch_embed[0].reparam_conv.weight.is_contiguous(
            memory_format=torch.channels_last
        )
        got = model.encode_images(px)
        prepare_for_device(model, torch.device("cpu"))  # idempotent
        again = model.encode_images(px)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["meta", "cuda", "mps"])
def test_prepare_for_device_leaves_other_devices_alone(device):
    """Only CPU has an execution policy: for other devices the model is returned untouched."""
    from fastvlm.device import prepare_for_device

    model = make_tiny_model(seed=4)
    classes = {n: type(m) for n, m in model.named_modules()}
    assert prepare_for_device(model, device) is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert type(model.vision_tower) is FastViTHD


def test_load_prepares_the_model_for_cpu(tiny_dir):
    """fastvlm.load on CPU applies the CPU plan through prepare_for_device."""
    from fastvlm import kernels
    from fastvlm.device import CPUFastViTHD

    vlm = fastvlm.load(str(tiny_dir), device="cpu")
    assert type(vlm.model.vision_tower) is CPUFastViTHD
    if kernels.available():
        assert type(vlm.model.lm_head) is kernels.FastLinear


def _cpu_tower(tower):
    from fastvlm.device import prepare_cpu_vision_tower

    return prepare_cpu_vision_tower(tower)


@pytest.mark.parametrize("micro_batch", [1, 2, 0])
def test_cpu_batched_vision_matches_one_image_at_a_time(micro_batch):
    """On CPU a batch runs its high-resolution stages `micro_batch` images at a time and the
    low-resolution tail (from the first attention stage's PatchEmbed on) batched: same features
    as the device-blind tower and as encoding each image alone, and the split sits right before
    that stage's downsampling."""
    import copy

    from conftest import make_tiny_model

    from fastvlm.model.fastvithd import AttentionBlock, PatchEmbed

    plain = make_tiny_model(seed=4).vision_tower.eval()
    tower = _cpu_tower(copy.deepcopy(plain))
    tower.micro_batch = micro_batch
    split = tower.tail_start()
    assert isinstance(tower.network[split], PatchEmbed)
    first_attn = next(
        i for i, m in enumerate(tower.network)
        if isinstance(m, torch.nn.Sequential) and isinstance(m[0], AttentionBlock)
    )  # fmt: skip
    assert split < first_attn and all(
        not isinstance(m, torch.nn.Sequential) for m in tower.network[split:first_attn]
    )
    px = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched = tower(px)
        alone = torch.cat([tower(px[i : i + 1]) for i in range(3)])
        blind = plain(px)
    assert batched.shape == alone.shape == blind.shape
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, blind, rtol=1e-4, atol=1e-5)
    assert batched.abs().mean() > 0.01


def test_cpu_batched_vision_when_every_stage_is_attention():
    """Tail from network[0] (the first stage is already attention): the stem runs once per
    image, then everything after it as one batch."""
    import dataclasses

    from conftest import randomize, tiny_config

    cfg = dataclasses.replace(tiny_config().vision, token_mixers=("attention",) * 5, head_dim=8)
    tower = _cpu_tower(randomize(FastViTHD(cfg), seed=1).eval())
    assert tower.tail_start() == 0
    px = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched = tower(px)
        alone = torch.cat([tower(px[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert batched.abs().mean() > 0.01


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_export_friendly_hooks_attention_and_norm_then_restores(kv_heads):
    """`export_friendly` swaps the fused ops through the model's own hooks (no copied forward):
    the modules keep their class and forward, the plain ops give the same logits for every GQA
    ratio, and on exit the model is exactly as before (the hooks are gone, fused again)."""
    import dataclasses

    from fastvlm.export.wrappers import DecoderStep, export_friendly, plain_attention
    from fastvlm.model.fastvlm import FastVLMModel
    from fastvlm.model.qwen2 import Qwen2Attention, RMSNorm, sdpa_attention

    cfg = tiny_config()
    cfg.text = dataclasses.replace(cfg.text, num_attention_heads=4, num_key_value_heads=kv_heads)
    model = randomize(FastVLMModel(cfg), seed=kv_heads).eval()
    hooked = [m for m in model.modules() if isinstance(m, (RMSNorm, Qwen2Attention))]
    classes = [type(m) for m in hooked]
    step = DecoderStep(model)
    d, n = cfg.text.hidden_size, cfg.text.num_hidden_layers
    x = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 0] = 0  # a padded row
    pos = torch.arange(3, 8)[None].expand(2, 5)
    hd = cfg.text.head_dim
    past = [torch.randn(2, kv_heads, 3, hd) for _ in range(2 * n)]
    with torch.no_grad():
        want = step(x, mask, pos, *past)
        with export_friendly(model):
            assert [type(m) for m in hooked] == classes  # no class swap, no copied forward
            attn = next(m for m in hooked if isinstance(m, Qwen2Attention))
            assert attn.attention.func is plain_attention
            assert attn.attention.keywords == {"rep": 4 // kv_heads}
            got = step(x, mask, pos, *past)
        after = step(x, mask, pos, *past)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(after, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all("attention" not in m.__dict__ and "normalize" not in m.__dict__ for m in hooked)
    assert attn.attention is sdpa_attention


def test_export_friendly_restores_a_custom_hook_even_on_error():
    """A hook a user set on one layer survives an export (even a failed one)."""
    from fastvlm.export.wrappers import export_friendly
    from fastvlm.model.qwen2 import Qwen2Attention

    model = make_tiny_model(seed=1)
    attn = next(m for m in model.modules() if isinstance(m, Qwen2Attention))

    def mine(q, k, v, mask):
        raise AssertionError("not called")

    attn.attention = mine
    with pytest.raises(RuntimeError, match="boom"), export_friendly(model):
        assert attn.attention is not mine
        raise RuntimeError("boom")
    assert attn.attention is mine


@pytest.mark.parametrize("seed", [0, 3])
def test_prepare_for_device_keeps_decode_logits(seed):
    """The CPU plan swaps the decoder's Linears for the fast kernels (when they build) and keeps
    the logits of a prefill + one decode step, with tied weights still tied."""
    from fastvlm import kernels
    from fastvlm.device import prepare_for_device
    from fastvlm.engine.kv_cache import KVCache

    model = make_tiny_model(seed=seed)
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(seed))

    def logits():
        cache = KVCache.for_model(model, 1, 16)
        with torch.no_grad():
            a = model(ids, positions=torch.arange(7)[None], cache=cache)
            b = model(ids[:, -1:], positions=torch.tensor([[7]]), cache=cache)
        return torch.cat([a[:, -1], b[:, -1]])

    want = logits()
    prepare_for_device(model, "cpu")
    if kernels.available():
        assert type(model.lm_head) is kernels.FastLinear
        assert type(model.language_model.layers[0].mlp.down_proj) is kernels.FastLinear
    if model.config.text.tie_word_embeddings:
        assert model.lm_head.weight is model.language_model.embed_tokens.weight
    torch.testing.assert_close(logits(), want, rtol=1e-4, atol=1e-4)
