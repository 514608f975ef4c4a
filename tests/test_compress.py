"""Compression suite, part 1: pruning surgery is exact, pruned folders reload (here and in
transformers), QAT computes exactly what `fastvlm quantize` stores (also through `fastvlm train
--qat`), `optimize` meets its size target, `bench --prune`. Part 2: test_compress_tools.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import has_module, make_tiny_model, random_pixels, random_prompt
from fastvlm import quant
from fastvlm.compress import importance, optimize, prune, qat
from fastvlm.errors import ConfigError, FastVLMError
from fastvlm.train.data import IGNORE

RATIOS = {
    "mlp": prune.Ratios(mlp=0.5, multiple_of=8),
    "heads": prune.Ratios(heads=0.5),
    "layers": prune.Ratios(layers=0.5),
    "projector": prune.Ratios(projector=0.25, multiple_of=8),
    "all": prune.Ratios(mlp=0.25, heads=0.5, layers=0.5, projector=0.5, multiple_of=16),
}


def _inputs(cfg, seed=1, dtype=torch.float64):
    ids = torch.tensor([random_prompt(cfg, 12, seed, image=True)])
    return ids, random_pixels(seed).to(dtype)


def _calib(cfg, n=2):
    """Tiny calibration batches: random prompts with an image, the tail labelled."""
    out = []
    for s in range(n):
        ids, px = _inputs(cfg, 10 + s, torch.float32)
        labels = ids.clone()
        labels[:, : ids.shape[1] - 4] = IGNORE
        out.append({"input_ids": ids, "labels": labels, "pixel_values": px})
    return out


@pytest.mark.parametrize("method", importance.METHODS)
@pytest.mark.parametrize("what", list(RATIOS))
def test_pruned_equals_masked_unpruned(what, method):
    torch.manual_seed(0)
    base = make_tiny_model(seed=3)
    scores = importance.compute_scores(base, method, _calib(base.config))
    keep = prune.plan(base, scores, RATIOS[what])
    model = base.double()
    pruned = prune.prune_model(model, keep)
    masked = copy.deepcopy(model)
    prune.mask_model(masked, keep)
    ids, px = _inputs(model.config)
    with torch.no_grad():
        got, ref, full = pruned(ids, px), masked(ids, px), model(ids, px)
    assert parameter_shrunk(model, pruned)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert (got - full).abs().max() > 1e-3  # the pruning removed something that mattered


@pytest.mark.parametrize("what", ["mlp", "projector"])
def test_pruned_model_shares_no_storage_with_its_source(what):
    """Training the pruned copy (healing, distillation) must not move the source's weights."""
    base = make_tiny_model(seed=3)
    before = copy.deepcopy(base.state_dict())
    keep = prune.plan(base, importance.magnitude_scores(base), RATIOS[what])
    pruned = prune.prune_model(base, keep)
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(1.0)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def parameter_shrunk(a, b) -> bool:
    return prune.parameter_count(b) < prune.parameter_count(a)


def test_head_pruning_keeps_whole_gqa_groups():
    base = make_tiny_model(seed=1)
    scores = importance.magnitude_scores(base)
    scores.heads = [torch.tensor([0.0, 1.0]) for _ in scores.heads]  # keep KV group 1 only
    keep = prune.plan(base, scores, prune.Ratios(heads=0.5))
    pruned = prune.prune_model(base, keep)
    t, a0 = pruned.config.text, base.language_model.layers[0].self_attn
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (2, 1, 16)
    a1 = pruned.language_model.layers[0].self_attn
    # KV head 1 and the query heads 2, 3 that read it (4 heads / 2 KV heads: 2 per group)
    assert torch.equal(a1.k_proj.weight, a0.k_proj.weight[16:32])
    assert torch.equal(a1.q_proj.weight, a0.q_proj.weight[32:64])
    assert torch.equal(a1.o_proj.weight, a0.o_proj.weight[:, 32:64])


@pytest.mark.parametrize("n,ratio,mult,want", [(768, 0.25, 32, 576), (768, 0.5, 64, 384),
                                               (4864, 0.25, 64, 3648), (10, 0.5, 32, 5),
                                               (2, 0.25, 1, 2), (4, 0.9, 1, 1)])  # fmt: skip
def test_kept_count(n, ratio, mult, want):
    assert prune.kept_count(n, ratio, mult) == want


@pytest.mark.parametrize(
    "bad", [dict(mlp=1.0), dict(heads=-0.1), dict(layers=2), dict(multiple_of=0)]
)
def test_bad_ratios_are_config_errors(bad):
    with pytest.raises(ConfigError):
        prune.Ratios(**bad).check()


@pytest.mark.parametrize("what", ["mlp", "all"])
def test_pruned_folder_reloads(tmp_path, tokenizer, what):
    import fastvlm
    from fastvlm.train.checkpoint import save_model

    base = make_tiny_model(seed=2, vocab_size=tokenizer.get_vocab_size())
    keep = prune.plan(base, importance.magnitude_scores(base), RATIOS[what])
    pruned = prune.prune_model(base, keep)
    save_model(tmp_path / "p", pruned, tokenizer, None, torch.float32)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["text"]["head_dim"] == 16 and cfg["text"]["num_hidden_layers"] == len(keep.layers)
    vlm = fastvlm.load(tmp_path / "p", device="cpu", dtype="float32")
    ids, px = _inputs(pruned.config, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(vlm.model(ids, px), pruned(ids, px), rtol=1e-4, atol=1e-5)


def test_projector_pruned_model_refuses_foreign_formats(tmp_path):
    from fastvlm.config_format import config_to_format

    base = make_tiny_model(seed=2)
    keep = prune.plan(base, importance.magnitude_scores(base), RATIOS["projector"])
    cfg = prune.prune_model(base, keep).config
    assert cfg.mm_projector_hidden_size == 48
    for fmt in ("hf", "apple"):
        with pytest.raises(ConfigError, match="projector"):
            config_to_format(cfg, fmt)


@pytest.mark.skipif(not has_module("transformers"), reason="transformers not installed")
@pytest.mark.parametrize("what", ["mlp", "heads", "layers", "all"])
def test_pruned_decoder_matches_transformers_qwen2(what):
    """The pruned config is a standard Qwen2 one: transformers' Qwen2Model with our pruned
    weights computes the same hidden states (the decoder half of `fast_vlm`)."""
    from transformers import Qwen2Config, Qwen2Model

    from fastvlm.config_format import config_to_format

    base = make_tiny_model(seed=4)
    ratios = copy.copy(RATIOS[what])
    ratios.projector = 0.0  # the one setting outside the standard config
    keep = prune.plan(base, importance.magnitude_scores(base), ratios)
    pruned = prune.prune_model(base, keep).double()
    tc = config_to_format(pruned.config, "hf")["text_config"]
    ref = Qwen2Model(Qwen2Config(**tc)).double().eval()
    sd = {k.removeprefix("language_model."): v for k, v in pruned.state_dict().items()
          if k.startswith("language_model.")}  # fmt: skip
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randn(1, 9, pruned.config.text.hidden_size, dtype=torch.float64)
    pos = torch.arange(9)[None]
    with torch.no_grad():
        ours = pruned.language_model(x, pos)
        theirs = ref(inputs_embeds=x, position_ids=pos).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not (has_module("transformers") and has_module("timm")),
                    reason="transformers' FastVlm needs timm")  # fmt: skip
def test_pruned_folder_loads_in_transformers_fast_vlm(tmp_path, tokenizer):
    from transformers import FastVlmForConditionalGeneration

    from fastvlm.weights import save_checkpoint

    base = make_tiny_model(seed=2, vocab_size=tokenizer.get_vocab_size())
    keep = prune.plan(base, importance.magnitude_scores(base), RATIOS["all"].__class__(
        mlp=0.25, heads=0.5, layers=0.5, multiple_of=16))  # fmt: skip
    pruned = prune.prune_model(base, keep)
    save_checkpoint(pruned.state_dict(), pruned.config, tmp_path / "hf", "hf")
    ref = FastVlmForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, px = _inputs(pruned.config, dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(input_ids=ids, pixel_values=px).logits
        torch.testing.assert_close(pruned(ids, px), theirs, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- QAT
def _dequant_reference(model, spec):
    """`fastvlm quantize`'s model, each quantized layer replaced by a dense Linear holding its
    dequantized weight (the arithmetic without the kernels' activation rounding)."""
    q = copy.deepcopy(model)
    quant.quantize_model(q, spec, finalize_now=False)
    for name, m in list(q.named_modules()):
        if isinstance(m, quant.QUANT_TYPES):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(q.get_submodule(parent) if parent else q, leaf, lin)
    return q


QAT_SPECS = ["llm=int4-g32,projector=int8", "int8", "llm=int4-g64-sym", "vision=int8,llm=int8"]


@pytest.mark.parametrize("spec", QAT_SPECS)
def test_qat_forward_equals_quantize_dequantize(spec):
    model = make_tiny_model(seed=5)
    ref = _dequant_reference(model, spec)
    done = qat.apply_qat(model, spec)
    assert done and model.lm_head.weight is model.language_model.embed_tokens.weight
    ids, px = _inputs(model.config, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, px), ref(ids, px), rtol=0, atol=0)


@pytest.mark.parametrize("spec", QAT_SPECS[:3])
def test_qat_grads_flow_straight_through_and_quantize_matches(spec):
    model = make_tiny_model(seed=6)
    qat.apply_qat(model, spec)
    ids, px = _inputs(model.config, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(ids, px).square().mean().backward()
        g = model.language_model.layers[0].mlp.down_proj.weight.grad
        assert g is not None and g.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    # STE: the gradient w.r.t. the float weight is the gradient w.r.t. the fake-quantized one
    lin = model.language_model.layers[1].mlp.up_proj
    x = torch.randn(3, lin.in_features)
    lin(x).sum().backward()
    w_fq = qat.fake_quantize(lin.weight.detach(), lin.qat_scheme).requires_grad_(True)
    torch.nn.functional.linear(x, w_fq).sum().backward()
    torch.testing.assert_close(lin.weight.grad, w_fq.grad)
    # what QAT trained with is what `fastvlm quantize` of the result stores
    with torch.no_grad():
        want = {
            n: qat.fake_quantize(m.weight, m.qat_scheme).clone()
            for n, m in model.named_modules()
            if isinstance(m, qat.FakeQuantLinear)
        }
    qat.strip_qat(model)
    assert not qat.qat_layers(model) and type(model.lm_head) is torch.nn.Linear
    quant.quantize_model(model, spec, finalize_now=False)
    for name, w in want.items():
        got = model.get_submodule(name).dequantized_weight()
        torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_qat_with_lora_fake_quantizes_the_merged_weight():
    from fastvlm.train.lora import apply_lora, merge_lora

    model = make_tiny_model(seed=7)
    apply_lora(model, 4, 8.0, 0.0, ("q_proj", "down_proj"), False, False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    done = qat.apply_qat(model, "llm=int8")
    assert any(n.endswith("q_proj") for n in done) and any(n.endswith("gate_proj") for n in done)
    ids, px = _inputs(model.config, dtype=torch.float32)
    with torch.no_grad():
        got = model(ids, px)
    qat.strip_qat(model)
    ref = _dequant_reference(merge_lora(model), "llm=int8")
    with torch.no_grad():
        torch.testing.assert_close(got, ref(ids, px), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["llm=int4-g256", "llm=int4-g256,vision=int4-g256"])
def test_qat_refuses_when_no_layer_fits(spec):
    with pytest.raises(ConfigError):
        qat.apply_qat(make_tiny_model(seed=1), spec)


# ---------------------------------------------------------------------- optimize
@pytest.fixture(scope="module")
def demo():
    import fastvlm

    return fastvlm.load(None, device="cpu", dtype="float32", engine="reference")


def test_optimize_meets_its_size_target_on_the_demo_model(demo, tmp_path, monkeypatch):
    from fastvlm.train.evaluate import load_rows
    import argparse

    ns = argparse.Namespace(shapes=3, data=None, data_seed=1000, shapes_size=256)
    rows, _ = load_rows(ns)
    keep_for = optimize.keep_planner(demo.model, importance.magnitude_scores(demo.model), 32)
    space = optimize.SearchSpace(llm=("none", "int8", "int4-g64"), projector=("none", "int8"),
                                 vision=("none",), prune=(0.0, 0.25), tokens=(16,))  # fmt: skip
    state = tmp_path / "state.json"
    kw = dict(target_mb=13.0, max_drop=100.0, space=space, state_path=state, keep_for=keep_for,
              max_candidates=2, max_tokens=16, progress=False)  # fmt: skip
    cands, best, base = optimize.search(demo, rows, **kw)
    assert best is not None and best.size_mb <= 13.0
    assert any(c.size_mb > 13.0 and c.skipped == "over size" for c in cands)
    model = optimize.build(demo.model, keep_for, best)
    from fastvlm.train.checkpoint import save_model

    save_model(tmp_path / "out", model, demo.tokenizer, None)
    assert (tmp_path / "out" / "model.safetensors").stat().st_size <= 13.0 * 2**20
    table = optimize.table(cands, best, base)
    assert "<- chosen" in table and "decode tok/s" in table
    # resumable: a second run evaluates nothing
    monkeypatch.setattr(
        "fastvlm.train.evaluate.evaluate", lambda *a, **k: pytest.fail("re-evaluated")
    )
    cands2, best2, _ = optimize.search(demo, rows, **kw)
    assert best2.key == best.key


def test_state_bytes_matches_the_saved_file(demo, tmp_path):
    from fastvlm.train.checkpoint import save_model

    for spec in (None, "llm=int4-g64,projector=int8"):
        m = copy.deepcopy(demo.model)
        if spec:
            quant.quantize_model(m, spec)
        save_model(tmp_path / str(spec), m, None, None, torch.float16)
        size = (tmp_path / str(spec) / "model.safetensors").stat().st_size
        want = optimize.state_bytes(m, torch.float16)
        assert want <= size < want + 64 * 1024  # the safetensors header


# ---------------------------------------------------------------------- fastvlm train --qat
def _train_qat(tmp_path, tiny_dir, name, *extra):
    from fastvlm.train.loop import main as train_main

    out = tmp_path / name
    assert train_main(["--model", str(tiny_dir), "--shapes", "8", "--max-steps", "3",
                       "--batch-size", "2", "--lr", "1e-3", "--warmup", "1", "--device", "cpu",
                       "--quiet", "-o", str(out), *extra]) == 0  # fmt: skip
    return out


@pytest.mark.parametrize("spec", ["llm=int4-g32", "int8"])
def test_train_qat_writes_a_float_model_that_quantizes_to_what_it_trained(
    tmp_path, tiny_dir, spec
):
    import fastvlm

    plain = _train_qat(tmp_path, tiny_dir, "plain")
    qat_out = _train_qat(tmp_path, tiny_dir, "qat", "--qat", spec)
    a = fastvlm.load(plain, device="cpu", dtype="float32").model
    b = fastvlm.load(qat_out, device="cpu", dtype="float32").model
    assert b.config.quantization is None  # a float model, loadable and trainable as usual
    w_a = a.language_model.layers[0].mlp.up_proj.weight
    w_b = b.language_model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w_a, w_b)  # the fake-quantized forward changed the gradients
    # `fastvlm quantize` of the result stores exactly fake_quantize(trained weight)
    scheme = quant.parse_spec(spec)["llm"]
    want = qat.fake_quantize(w_b.detach(), scheme)
    quant.quantize_model(b, spec, finalize_now=False)
    got = b.language_model.layers[0].mlp.up_proj.dequantized_weight()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("argv, match", [(["--qat", "int3"], "scheme"),
                                         (["--qat", "llm=int4-g100"], "group size"),
                                         (["--qat", "int4", "--qlora"], "qlora")])  # fmt: skip
def test_train_qat_refuses_bad_specs_before_loading(tmp_path, argv, match):
    from fastvlm.train.loop import main as train_main

    with pytest.raises(FastVLMError, match=match):
        train_main(["--model", str(tmp_path / "missing"), "--shapes", "4", "-o",
                    str(tmp_path / "o"), *argv])  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_cli_dispatches_compression_tools_with_one_error_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent.parent)}
    for argv in (["prune", "demo", str(tmp_path / "o"), "--ratio", "2"],
                 ["optimize", "demo", str(tmp_path / "o"), "--target-size", "-1"],
                 ["distill", "--teacher", "demo", "-o", str(tmp_path / "o")]):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "fastvlm", *argv], capture_output=True,
                           text=True, env=env, timeout=120)  # fmt: skip
        assert r.returncode == 1 and r.stderr.startswith("error: "), (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ---------------------------------------------------------------------- bench --prune
@pytest.mark.parametrize("text, want", [("0.25,0.5", [0.25, 0.5]), ("", []), (" 0.5 ", [0.5])])
def test_bench_prune_list(text, want):
    from fastvlm.bench.cli import _prune_list

    assert _prune_list(text) == want


@pytest.mark.parametrize("text", ["1.0", "x", "0.5,-1"])
def test_bench_prune_list_refuses_bad_ratios(text):
    from fastvlm.bench.cli import _prune_list

    with pytest.raises(ConfigError):
        _prune_list(text)


def test_bench_pruned_model_is_smaller_with_whole_kv_groups():
    from fastvlm.bench.cli import pruned

    base = make_tiny_model(seed=1)
    t = pruned(base, 0.5).config.text
    assert (t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (64, 2, 1)
