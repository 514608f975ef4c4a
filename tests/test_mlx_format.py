"""MLX-layout folders on torch and `fastvlm convert --to mlx`: round trips bit-exact in fp32,
affine 2-8 bit dequantization identical to `mx.dequantize`, folders mlx-vlm itself loads, and a
clear message for Apple's MLX-app bundles (vision tower only as Core ML)."""

from __future__ import annotations

import json

import pytest
import torch

from fastvlm.errors import ConfigError
from fastvlm.mlx_format import dequantize, quantization_of
from fastvlm.weights import convert_checkpoint, load_model, save_checkpoint

from conftest import make_tiny_model, random_prompt

mx = pytest.importorskip("mlx.core")


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("src_fmt", ["fastvlm", "hf", "apple"])
@pytest.mark.parametrize("tie", [True, False])
def test_torch_mlx_torch_round_trip_is_bit_exact(tmp_path, src_fmt, tie):
    m = make_tiny_model(seed=7, tie=tie)
    save_checkpoint(m.state_dict(), m.config, tmp_path / "src", src_fmt)
    out = convert_checkpoint(tmp_path / "src", tmp_path / "mlx", "mlx")
    keys = set(json.loads((out / "config.json").read_text()))
    assert {"model_type", "vision_config", "mm_hidden_size"} <= keys
    back = load_model(out)
    want, got = state_of(m), state_of(back)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # and on to every other format and back to mlx again: still identical tensors
    convert_checkpoint(out, tmp_path / "hf2", "hf")
    convert_checkpoint(tmp_path / "hf2", tmp_path / "mlx2", "mlx")
    again = state_of(load_model(tmp_path / "mlx2"))
    assert all(torch.equal(want[k], again[k]) for k in want)


def test_mlx_layout_is_channels_last_with_mlx_names(tmp_path):
    from safetensors import safe_open

    m = make_tiny_model(seed=8)
    save_checkpoint(m.state_dict(), m.config, tmp_path / "src", "fastvlm")
    out = convert_checkpoint(tmp_path / "src", tmp_path / "mlx", "mlx")
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        keys = set(h.keys())
        w = h.get_tensor("vision_tower.vision_model.patch_embed.blocks.0.reparam_conv.weight")
        ls = h.get_tensor("vision_tower.vision_model.network.0.0.layer_scale")
    torch_w = m.vision_tower.patch_embed[0].reparam_conv.weight
    assert w.shape == (8, 3, 3, 3) and torch.equal(w, torch_w.permute(0, 2, 3, 1))
    assert ls.shape == (1, 1, 8)
    assert "language_model.model.embed_tokens.weight" in keys and "mm_projector.0.weight" in keys
    assert "vision_tower.vision_model.head.proj" in keys  # mlx-vlm loads strictly


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dequantize_is_bit_identical_to_mx(bits, dtype):
    from fastvlm.mlx_format import from_mx

    w = mx.random.normal((48, 256), key=mx.random.key(bits)).astype(getattr(mx, dtype))
    for group in (32, 64, 128):
        q, s, b = mx.quantize(w, group_size=group, bits=bits)
        want = from_mx(mx.dequantize(q, s, b, group_size=group, bits=bits))
        got = dequantize(from_mx(q), from_mx(s), from_mx(b), bits, group)
        assert got.dtype == want.dtype and torch.equal(got, want), (bits, dtype, group)


def test_dequantize_refuses_mismatched_groups():
    q, s, b = mx.quantize(mx.random.normal((4, 128)), group_size=64, bits=4)
    from fastvlm.errors import CheckpointError
    from fastvlm.mlx_format import from_mx

    with pytest.raises(CheckpointError, match="groups"):
        dequantize(from_mx(q), from_mx(s), from_mx(b), 8, 64)


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_quantized_folder_on_torch_equals_mlx_dequantized(tmp_path, bits):
    """`--to mlx --q-bits N` → torch: every quantized weight equals what mlx-vlm's loaded model
    dequantizes to (mx.dequantize of its QuantizedLinear / QuantizedEmbedding), exactly."""
    import mlx.nn as nn

    from fastvlm.backends.mlx_load import load_mlx_model
    from fastvlm.mlx_format import from_mx, to_torch_layout

    m = make_tiny_model(seed=9, tie=False)
    save_checkpoint(m.state_dict(), m.config, tmp_path / "src", "apple")
    out = convert_checkpoint(tmp_path / "src", tmp_path / "q", "mlx", q_bits=bits)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    torch_state = state_of(load_model(out))
    mlx_model, _ = load_mlx_model(out)
    from fastvlm.weights import KeyMap

    keymap = KeyMap("mlx", m.config.vision)
    n_quant = 0
    for path, mod in mlx_model.named_modules():
        if isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(mod.weight, mod.scales, mod.biases, mod.group_size, mod.bits)
            ik = keymap.to_internal(f"{path}.weight")
            assert torch.equal(torch_state[ik], to_torch_layout(ik, from_mx(w))), path
            n_quant += 1
    # every decoder Linear (7 per layer), the untied head, the embedding, both projector layers
    assert n_quant == 7 * m.config.text.num_hidden_layers + 4
    # float tensors (vision tower, norms, biases) pass through unchanged
    want = state_of(m)
    assert torch.equal(torch_state["vision_tower.conv_exp.reparam_conv.weight"],
                       want["vision_tower.conv_exp.reparam_conv.weight"])  # fmt: skip
    err = (torch_state["lm_head.weight"] - want["lm_head.weight"]).abs().max()
    assert 0 < err < (0.05 if bits == 8 else 0.5)  # quantized, and close to the float weights


def test_mixed_precision_per_module_overrides(tmp_path):
    """mlx-vlm's mixed recipes keep per-module bits in config["quantization"][path]."""
    from safetensors.torch import load_file, save_file

    from fastvlm.mlx_format import from_mx, to_mx

    m = make_tiny_model(seed=10)
    save_checkpoint(m.state_dict(), m.config, tmp_path / "src", "apple")
    out = convert_checkpoint(tmp_path / "src", tmp_path / "q", "mlx", q_bits=4)
    st = load_file(str(out / "model.safetensors"))
    name = "language_model.model.layers.0.mlp.down_proj"
    w = m.language_model.layers[0].mlp.down_proj.weight
    q, s, b = mx.quantize(to_mx(w), group_size=64, bits=8)
    st.update({f"{name}.weight": from_mx(q), f"{name}.scales": from_mx(s),
               f"{name}.biases": from_mx(b)})  # fmt: skip
    save_file(st, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization"][name] = {"group_size": 64, "bits": 8}
    (out / "config.json").write_text(json.dumps(cfg))
    got = load_model(out).language_model.layers[0].mlp.down_proj.weight
    assert torch.equal(got, from_mx(mx.dequantize(q, s, b, group_size=64, bits=8)))


def test_bf16_mlx_folder_loads_on_torch_and_runs(tmp_path):
    m = make_tiny_model(seed=11)
    save_checkpoint(m.state_dict(), m.config, tmp_path / "src", "apple", dtype=torch.bfloat16)
    out = convert_checkpoint(tmp_path / "src", tmp_path / "mlx", "mlx")
    back = load_model(out)
    assert back.source_dtype == torch.bfloat16
    want = state_of(m)
    for k, v in state_of(back).items():
        ref = want[k].to(torch.bfloat16).float() if v.is_floating_point() else want[k]
        assert torch.equal(v, ref), k
    ids = torch.tensor([random_prompt(m.config, 6, 1)])
    assert back(ids).shape == (1, 6, m.config.text.vocab_size)


def test_mlx_vlm_load_reads_our_mlx_folder(tmp_path):
    """A folder from `convert --to mlx` in the released tower shape loads with mlx-vlm's own
    loader (`mlx_vlm.utils.load_model`, strict) and computes what torch computes."""
    pytest.importorskip("mlx_vlm")
    import numpy as np
    from mlx_vlm.utils import load_model as mlx_vlm_load_model

    from fastvlm.config import FastVLMConfig, TextConfig, VisionConfig
    from fastvlm.model.fastvlm import FastVLMModel

    from conftest import randomize

    text = TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      rope_theta=1e6, eos_token_id=2)  # fmt: skip
    cfg = FastVLMConfig(vision=VisionConfig(image_size=128), text=text)
    m = randomize(FastVLMModel(cfg), 3)
    save_checkpoint(m.state_dict(), cfg, tmp_path / "src", "hf")
    for q in (None, 8):
        out = convert_checkpoint(tmp_path / "src", tmp_path / f"mlx{q}", "mlx", q_bits=q)
        model = mlx_vlm_load_model(out)
        px = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
        _, feats, _ = model.vision_tower(mx.array(px.numpy()).transpose(0, 2, 3, 1))
        got = np.array(model.mm_projector(feats.reshape(1, 4, -1)))
        with torch.no_grad():
            want = m.embed_images(px).numpy()
        assert np.abs(got - want).max() <= (1e-4 if q is None else 0.1)


def test_apple_mlx_app_bundle_gets_a_clear_message(tmp_path):
    """apple/FastVLM-*-fp16/-int8/-int4: MLX decoder + projector, vision tower as Core ML."""
    from safetensors.torch import save_file

    m = make_tiny_model(seed=12)
    save_checkpoint(m.state_dict(), m.config, tmp_path / "src", "apple")
    out = convert_checkpoint(tmp_path / "src", tmp_path / "app", "mlx")
    from safetensors.torch import load_file

    st = {k: v for k, v in load_file(str(out / "model.safetensors")).items()
          if not k.startswith("vision_tower")}  # fmt: skip
    save_file(st, str(out / "model.safetensors"))
    (out / "fastvithd.mlpackage" / "Data").mkdir(parents=True)
    with pytest.raises(ConfigError, match="MLX-app bundle.*Core ML"):
        load_model(out)
    with pytest.raises(ConfigError, match="MLX-app bundle"):
        convert_checkpoint(out, tmp_path / "x", "hf")


def test_unsupported_quantization_modes_are_refused():
    assert quantization_of({}) is None
    assert quantization_of({"quantization": {"bits": 8, "group_size": 32}}) == {
        "bits": 8, "group_size": 32}  # fmt: skip
    for q in ({"mode": "mxfp4", "bits": 4, "group_size": 32}, {"bits": 7}, {"bits": 1},
              {"bits": 4, "group_size": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            quantization_of({"quantization": q})


def test_convert_q_bits_errors(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="--to mlx only"):
        convert_checkpoint(tiny_dir, tmp_path / "a", "hf", q_bits=4)
    with pytest.raises(ConfigError, match="q-bits"):
        convert_checkpoint(tiny_dir, tmp_path / "b", "mlx", q_bits=7)


def test_cli_convert_to_mlx_and_back(tmp_path, tiny_dir, capsys):
    from fastvlm.cli import main

    assert main(["convert", str(tiny_dir), str(tmp_path / "m"), "--to", "mlx"]) == 0
    q8 = ["convert", str(tiny_dir), str(tmp_path / "q"), "--to", "mlx", "--q-bits", "8"]
    assert main(q8) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8 and (tmp_path / "q" / "tokenizer.json").exists()
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "back"), "--to", "fastvlm"]) == 0
    want, got = state_of(load_model(tiny_dir)), state_of(load_model(tmp_path / "back"))
    assert all(torch.equal(want[k], got[k]) for k in want)
    capsys.readouterr()
    rc = main(["convert", str(tiny_dir), str(tmp_path / "h"), "--to", "hf", "--q-bits", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "--to mlx only" in err
