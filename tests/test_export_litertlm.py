"""`fastvlm export litertlm`: argument validation and the chat template run everywhere; the
conversion tests need the LiteRT toolchain (litert-torch, ai-edge-litert, litert-lm-builder;
litert-lm-api for the bundle runs), which lives in its own virtualenv (README "Export") and are
skipped cleanly without it."""

from __future__ import annotations

import copy
import json
import sys

import jinja2
import numpy as np
import pytest
import torch
from conftest import make_tiny_model, random_prompt

import fastvlm
from fastvlm.cli import main
from fastvlm.errors import ConfigError
from fastvlm.export import litert_env
from fastvlm.export.litertlm import (
    chat_template,
    check_parity,
    convert_parts,
    export_litertlm,
    prefix_match,
    stop_token_ids,
)
from fastvlm.processing import render_chat


def _toolchain() -> bool:
    try:
        litert_env.require_converter()
        return True
    except ConfigError:
        return False


HAVE_LITERT = _toolchain()
needs_litert = pytest.mark.skipif(not HAVE_LITERT, reason="LiteRT toolchain not installed")
needs_runtime = pytest.mark.skipif(not litert_env.have_runtime(), reason="litert-lm-api missing")
FP32 = {"vision": "fp32", "projector": "fp32", "embed": "fp32", "llm": "fp32"}


# ----------------------------------------------------------------------------- no LiteRT needed
CONVERSATIONS = [
    [{"role": "user", "content": "How many shapes are there?"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
    [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "Compare."},
                {"type": "text", "text": "Be brief."},
            ],
        }
    ],  # fmt: skip
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Colours {of} the {{shapes}}?"},
    ],  # fmt: skip
]


@pytest.mark.parametrize("system", ["You are a helpful assistant.", None, "Use {braces} {{x}}"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_renders_like_render_chat(conv, system):
    """The bundle's Jinja template must give LiteRT-LM the prompt our Processor builds."""
    msgs = CONVERSATIONS[conv]
    ours = [
        {**m, "content": m["content"] if isinstance(m["content"], str) else [
            {"type": "image", "image": "x.png"} if p["type"] == "image" else p
            for p in m["content"]]}
        for m in msgs
    ]  # fmt: skip
    want, _ = render_chat(ours, "apple", system)
    want = want.replace("<image>", "<image_soft_token>")
    env = jinja2.Environment()
    got = env.from_string(chat_template(system)).render(messages=msgs, add_generation_prompt=True)
    assert got == want
    # LiteRT-LM names the assistant role "model"
    as_model = [{**m, "role": "model"} if m["role"] == "assistant" else m for m in msgs]
    got_model = env.from_string(chat_template(system)).render(
        messages=as_model, add_generation_prompt=True
    )
    assert got_model == want


@pytest.mark.parametrize(
    "ref,got,want",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
        ([1, 2, 3, 4], [1, 2, 9, 4], 0.5),
        ([1, 2, 3, 4], [7], 0.0),
        ([1, 2, 3, 4], [1, 2], 0.5),  # stopped early
        ([1, 2], [1, 2, 3], 1.0),  # ran longer: the reference is reproduced
        ([], [], 1.0),
    ],
)
def test_prefix_match(ref, got, want):
    assert prefix_match(ref, got) == pytest.approx(want)


def test_stop_tokens_cover_eos_and_chat_end(tokenizer):
    model = make_tiny_model(vocab_size=tokenizer.get_vocab_size())
    ids = stop_token_ids(model, tokenizer)
    assert model.config.text.eos_token_id in ids
    for name in ("<|im_end|>", "<|endoftext|>"):
        if tokenizer.token_to_id(name) is not None:
            assert tokenizer.token_to_id(name) in ids
    assert stop_token_ids(model, None) == [model.config.text.eos_token_id]


BAD_ARGS = [
    (["--prefill", "abc"], "--prefill"),
    (["--prefill", "0"], "--prefill"),
    (["--prefill", ""], "--prefill"),
    (["--prefill", "64,200", "--max-len", "128"], "--prefill"),
    (["--max-len", "4"], "--max-len"),
    (["--max-len", str(1 << 30)], "--max-len"),
    (["--precision", "llm=fp16"], "llm=fp16"),
    (["--precision", "decoder=int8"], "decoder"),
    (["--parity-tokens", "0"], "--parity-tokens"),
    (["--parity-tokens", "2000", "--max-len", "128", "--prefill", "32"], "--parity-tokens"),
    (["--min-match", "1.5"], "--min-match"),
    (["--min-match", "-0.1"], "--min-match"),
]


@pytest.mark.parametrize("extra,needle", BAD_ARGS)
def test_cli_rejects_bad_arguments(tmp_path, capsys, extra, needle):
    rc = main(["export", "litertlm", "tiny", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["nonempty", "file"])
def test_cli_refuses_existing_output(tmp_path, capsys, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("keep me")
    assert main(["export", "litertlm", "tiny", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (out.read_text() if kind == "file" else (out / "keep.txt").read_text()) == "keep me"


@pytest.mark.parametrize("missing", ["ai_edge_litert", "litert_lm_builder", "litert_torch"])
def test_missing_toolchain_is_one_clear_error(tmp_path, capsys, monkeypatch, missing):
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")] + [missing]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of it raises ImportError
    rc = main(["export", "litertlm", "tiny", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error:") and "pip install" in err and "\n" not in err
    # with the toolchain installed, the package removed here is the one named
    assert "(missing: " in err and (missing in err or not HAVE_LITERT)


# ----------------------------------------------------------------------------- LiteRT toolchain
@pytest.fixture(scope="module")
def demo():
    return fastvlm.load(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def demo_fp32(tmp_path_factory, demo):
    """The demo model bundled once in fp32 (graphs kept for the tests below)."""
    if not HAVE_LITERT:
        pytest.skip("LiteRT toolchain not installed")
    out = tmp_path_factory.mktemp("litertlm") / "fp32"
    tok_json = demo.path / "tokenizer.json"
    files, res = export_litertlm(demo.model, out, None, demo.tokenizer, tok_json, max_len=128,
                                 prefill_lens=[32], keep_tflite=True,
                                 log=lambda *_: None)  # fmt: skip
    return out, files, res


@needs_litert
def test_demo_fp32_greedy_tokens_equal_pytorch(demo_fp32):
    out, files, res = demo_fp32
    assert (out / "model.litertlm").stat().st_size == files["model.litertlm"]
    names = [r[0] for r in res.rows]
    assert "interpreter greedy ids (image prompt)" in names
    assert "interpreter greedy ids (text prompt)" in names
    assert res.min_match == 1.0 and res.passed, str(res)
    image_row = res.rows[0]
    assert len(image_row[1]) > 4  # a real caption, not an immediate EOS
    manifest = json.loads((out / "fastvlm_export.json").read_text())
    assert manifest["format"] == "litertlm" and manifest["parity"]["passed"]


@needs_litert
@needs_runtime
def test_demo_bundle_runs_in_litert_lm(demo_fp32):
    """The LiteRT-LM Python API (tokenizer, template, vision encoder, decoder) agrees exactly."""
    _, _, res = demo_fp32
    lm = [r for r in res.rows if r[0].startswith("LiteRT-LM")]
    assert len(lm) == 2
    for name, want, got, score in lm:
        assert score == 1.0 and want == got and got, name


@needs_litert
def test_parity_check_catches_a_wrong_model(demo_fp32, demo, tmp_path):
    """The check can fail: the same graphs against a perturbed PyTorch model must not pass."""
    out, _, _ = demo_fp32
    parts = {k: out / "tflite" / f for k, f in
             (("decoder", "decoder.tflite"), ("embedder", "embedder.tflite"),
              ("vision", "vision_encoder.tflite"))}  # fmt: skip
    wrong = copy.deepcopy(demo.model)
    with torch.no_grad():
        wrong.language_model.layers[-1].mlp.down_proj.weight.mul_(-3.0)
    res = check_parity(wrong, demo.tokenizer, tmp_path, parts, None, 128, 8, None)
    assert not res.passed, str(res)


@needs_litert
@pytest.mark.parametrize(
    "spec,decoder_shrink",
    [("llm=int8,vision=int8,embed=int8", 3.0), ("llm=int4,vision=fp16,embed=int4", 5.0)],
)
def test_quantized_bundles(demo, demo_fp32, tmp_path, spec, decoder_shrink):
    _, fp32_files, _ = demo_fp32
    files, res = export_litertlm(demo.model, tmp_path / "q", spec, demo.tokenizer,
                                 demo.path / "tokenizer.json", max_len=128, prefill_lens=[32],
                                 log=lambda *_: None)  # fmt: skip
    dec = files["(decoder.tflite inside)"]
    assert dec * decoder_shrink < fp32_files["(decoder.tflite)"], (dec, fp32_files)
    assert files["model.litertlm"] < fp32_files["model.litertlm"] / 2
    assert res.min_match == 0.5 and res.passed, str(res)


@needs_litert
@pytest.mark.parametrize("tie,seed", [(True, 0), (False, 1)])
def test_random_models_interpreter_greedy(tmp_path, tie, seed):
    """Random weights give non-degenerate greedy runs; prompts longer than every prefill
    signature exercise chunked prefill and the choice between signatures."""
    from fastvlm.export.litertlm_run import InterpreterVLM, torch_greedy

    model = make_tiny_model(seed=seed, tie=tie)
    parts = convert_parts(model, tmp_path / "g", FP32, 96, [8, 16])
    run = InterpreterVLM(parts["decoder"], parts["embedder"], parts["vision"])
    cfg = model.config
    px = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(seed))
    nhwc = px.permute(0, 2, 3, 1).numpy()
    for n, image in ((5, False), (37, False), (11, True)):
        ids = random_prompt(cfg, n, seed + n, image=image)
        ref = torch_greedy(model, ids, px if image else None, 12, set())
        got = run.greedy(ids, cfg.image_token_id, nhwc if image else None, 12, set())
        assert len(set(ref)) > 2, ref  # degenerate references would prove little
        assert got == ref, (n, image)
    with pytest.raises(ConfigError, match="--max-len"):
        run.generate(np.zeros((90, cfg.text.hidden_size), np.float32), 5, 10, set())


def test_export_usage_lists_litertlm(capsys):
    assert main(["export", "-h"]) == 0
    assert "litertlm" in capsys.readouterr().out
