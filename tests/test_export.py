"""Export tests: ONNX (+ ONNX Runtime backend), Core ML (spec validation on Linux), TFLite.

Each target's test skips cleanly when its optional dependency is missing; the TFLite converter
(litert-torch) lives in its own virtualenv on the dev machine (see README "Export")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import has_module, make_tiny_model

import fastvlm
from fastvlm.errors import ConfigError

needs_ort = pytest.mark.skipif(
    not (has_module("onnx") and has_module("onnxruntime")), reason="onnx/onnxruntime missing"
)


@pytest.fixture(scope="module")
def demo():
    return fastvlm.load()  # embedded demo model, 256 px, fp32 on CPU


@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory, demo):
    """The demo model exported once per preset (shared by the ONNX tests)."""
    if not (has_module("onnx") and has_module("onnxruntime")):
        pytest.skip("onnx/onnxruntime missing")
    from fastvlm.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    return {
        p: export_onnx(demo.model, root / p, p, demo.tokenizer, log=lambda *_: None)
        for p in ("quality", "balanced", "small")
    }


# ---------------------------------------------------------------------- precision specs
def test_precision_presets_and_specs():
    from fastvlm.export.onnx import ALLOWED
    from fastvlm.export.precision import resolve_precision

    p = resolve_precision("small", None, ALLOWED, "ONNX")
    assert p == {"vision": "fp16", "projector": "fp16", "embed": "fp16", "llm": "int4"}
    p = resolve_precision(None, "vision=fp16, llm=q8", ALLOWED, "ONNX")
    assert p == {"vision": "fp16", "projector": "fp32", "embed": "fp32", "llm": "int8"}
    with pytest.raises(ConfigError, match="vision=int4"):
        resolve_precision(None, "vision=int4", ALLOWED, "ONNX")
    with pytest.raises(ConfigError, match="component=precision"):
        resolve_precision(None, "decoder=int4", ALLOWED, "ONNX")
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_precision("tiny", None, ALLOWED, "ONNX")


# ---------------------------------------------------------------------- ONNX
@needs_ort
def test_onnx_fp32_matches_pytorch_tiny_random(tmp_path, tokenizer):
    """fp32 logits within 1e-4 and identical greedy tokens, checked here independently of the
    built-in parity check (which must agree)."""
    from fastvlm.engine.generate import generate_step
    from fastvlm.engine.sampling import SamplingParams
    from fastvlm.export.onnx import export_onnx
    from fastvlm.backends.ort import OrtModel, ort_generate_step

    model = make_tiny_model(vocab_size=tokenizer.get_vocab_size())
    res = export_onnx(model, tmp_path / "o", None, tokenizer, log=print)
    names = {"onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx", "onnx/decoder_model_merged.onnx"}
    assert names <= set(res.files)
    for f in ("config.json", "tokenizer.json", "README.md", "fastvlm_export.json"):
        assert (tmp_path / "o" / f).exists()
    assert res.parity.passed, str(res.parity)
    assert res.parity.logits_max_abs < 1e-4 and res.parity.greedy_identical

    ort_model = OrtModel(tmp_path / "o", intra_op_threads=1)
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    px = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = [5, 6, 7] + [cfg.image_token_id] * cfg.num_image_tokens + [8, 9, 10, 11]
    with torch.no_grad():
        ref = model(torch.tensor([ids]), px).numpy()
    emb = ort_model.embed_images(px)
    out = ort_model.logits(ids, emb)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < 1e-4
    p = SamplingParams(max_tokens=32, ignore_eos=True)
    want = list(generate_step(model, ids, px, p))
    got = list(ort_generate_step(ort_model, ids, px, p))
    assert got == want
    io = {i.name: i.shape for i in ort_model.sessions["decoder"].get_inputs()}
    assert io["inputs_embeds"] == ["batch_size", "sequence_length", cfg.text.hidden_size]
    assert io["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert ort_model.sessions["decoder"].get_outputs()[1].name == "present.0.key"


@needs_ort
def test_onnx_presets_on_demo_model(demo_exports, capsys):
    q, b, s = (demo_exports[p] for p in ("quality", "balanced", "small"))
    for r in (q, b, s):
        print(r.parity)
        assert r.parity.passed, str(r.parity)
    assert q.parity.logits_max_abs < 1e-4 and q.parity.greedy_identical
    # quantized decoders: the demo model is trained, so greedy must mostly agree
    assert b.parity.teacher_forced >= 0.9 and s.parity.teacher_forced >= 0.9
    assert b.parity.greedy_match >= 0.9 and s.parity.greedy_match >= 0.9
    dec, vis = "decoder_model_merged", "vision_encoder"
    assert s.size(dec) < b.size(dec) < q.size(dec)
    assert s.size(dec) <= 0.3 * q.size(dec)
    assert s.size(vis) <= 0.55 * q.size(vis)
    # transformers.js picks files by dtype suffix: the quantized decoders must carry theirs
    assert "onnx/decoder_model_merged_quantized.onnx" in b.files
    assert "onnx/decoder_model_merged_q4.onnx" in s.files
    assert "onnx/vision_encoder_fp16.onnx" in s.files
    manifest = json.loads((s.out / "fastvlm_export.json").read_text())
    assert manifest["precision"]["llm"] == "int4" and manifest["parity"]["passed"]


@needs_ort
def test_onnx_backend_api_matches_torch(demo_exports, demo):
    from fastvlm.backends.ort import OrtBackend
    from fastvlm.export.parity import sample_image

    vlm = fastvlm.load(demo_exports["quality"].out)
    assert isinstance(vlm.backend, OrtBackend) and vlm.backend.name == "onnxruntime"
    img = sample_image(256)
    want = demo.describe(img, max_tokens=24)
    assert vlm.describe(img, max_tokens=24) == want
    assert "".join(vlm.stream(img, max_tokens=24)) == want
    chunks = list(vlm.stream_chunks(vlm.describe_messages([img], "Describe this image."),
                                    max_tokens=24))  # fmt: skip
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].stats.image_tokens == 16 and vlm.last_stats.generation_tokens >= 1
    # stop strings go through the shared text logic
    word = want.split()[1]
    cut = vlm.describe(img, max_tokens=24, stop=[word])
    assert cut == want[: want.index(word)]
    # bench hook: ids in, ids out, stats filled
    ids, px = vlm.encode(vlm.describe_messages([img], "Describe this image."))
    out = vlm.generate_ids(ids, px, max_tokens=8, ignore_eos=True)
    assert len(out) == 8 and vlm.last_stats.generation_tokens == 8
    assert vlm.last_stats.vision_s > 0 and vlm.last_stats.decode_s > 0
    # same folder forced onto the torch backend is a clear error, not a crash
    with pytest.raises(fastvlm.FastVLMError):
        fastvlm.load(demo_exports["quality"].out, backend="torch")


@needs_ort
def test_onnx_cli_and_parity_failure_exit(tmp_path, tiny_dir):
    from fastvlm.cli import main

    assert main(["export", "onnx", str(tiny_dir), str(tmp_path / "a")]) == 0
    # a non-empty output folder is refused without --force
    assert main(["export", "onnx", str(tiny_dir), str(tmp_path / "a")]) == 1
    # beyond tolerance → non-zero exit (an impossible agreement floor)
    rc = main(["export", "onnx", str(tiny_dir), str(tmp_path / "b"), "--precision", "llm=int4",
               "--min-agreement", "1.01"])  # fmt: skip
    assert rc == 1
    assert main(["export", "onnx", str(tiny_dir), str(tmp_path / "c"), "--precision", "x=1"]) == 1


# ---------------------------------------------------------------------- TFLite
needs_litert = pytest.mark.skipif(
    not (has_module("litert_torch") and has_module("ai_edge_litert")),
    reason="litert-torch / ai-edge-litert missing (they live in their own venv, README 'Export')",
)


@needs_litert
def test_tflite_vision_fp32_matches_pytorch(tmp_path):
    from fastvlm.export.tflite import TFLiteVision, export_tflite

    model = make_tiny_model()
    res = export_tflite(model, tmp_path / "t", "quality", None, log=lambda *_: None)
    path = tmp_path / "t" / "vision_encoder.tflite"
    assert path.exists() and res.parity.passed, str(res.parity)
    px = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.embed_images(px).numpy()
    run = TFLiteVision(path)
    assert run.inp["shape"].tolist() == [1, 3, 128, 128]
    out = run(px)
    assert out.shape == ref.shape == (2, 4, 64)
    assert np.abs(out - ref).max() < 1e-4


@pytest.mark.slow
@needs_litert
@pytest.mark.parametrize("vision", ["fp16", "int8"])
def test_tflite_vision_weight_quantized(tmp_path, vision):
    from fastvlm.export.tflite import export_tflite

    model = make_tiny_model()
    res = export_tflite(model, tmp_path / "t", f"vision={vision}", None, log=lambda *_: None)
    assert res.parity.passed and res.parity.embeds_cos > 0.999, str(res.parity)
    fp32_bytes = 4 * sum(
        p.numel() for m in (model.vision_tower, model.mm_projector) for p in m.parameters()
    )
    assert res.files["vision_encoder.tflite"] < (0.6 if vision == "fp16" else 0.4) * fp32_bytes


# ---------------------------------------------------------------------- Core ML
needs_coreml = pytest.mark.skipif(not has_module("coremltools"), reason="coremltools missing")


@needs_coreml
def test_coreml_small_preset_spec(tmp_path, tokenizer):
    """Conversion runs on Linux; the saved packages re-load with the documented I/O."""
    from fastvlm.export.coreml import export_coreml, validate_package

    model = make_tiny_model(vocab_size=tokenizer.get_vocab_size())
    res = export_coreml(model, tmp_path / "c", "small", tokenizer, context=128, log=print)
    assert res.parity.passed and res.parity.greedy_identical, str(res.parity)
    t = model.config.text
    vis = validate_package(tmp_path / "c" / "vision_encoder.mlpackage")
    assert vis["inputs"]["pixel_values"]["shape"] == [1, 3, 128, 128]
    assert vis["outputs"]["image_embeds"]["shape"] == [1, 4, t.hidden_size]
    emb = validate_package(tmp_path / "c" / "embed_tokens.mlpackage")
    assert emb["inputs"]["input_ids"]["ranges"] == [[1, 1], [1, 128]]
    dec = validate_package(tmp_path / "c" / "decoder.mlpackage")
    assert set(dec["inputs"]) == {"inputs_embeds", "causal_mask"}
    assert dec["inputs"]["inputs_embeds"]["ranges"] == [[1, 1], [1, 128], [64, 64]]
    assert dec["inputs"]["causal_mask"]["ranges"] == [[1, 1], [1, 1], [1, 128], [1, 128]]
    assert list(dec["outputs"]) == ["logits"]
    cache = [t.num_hidden_layers, 1, t.num_key_value_heads, 128, t.head_dim]
    assert dec["states"]["key_cache"]["shape"] == dec["states"]["value_cache"]["shape"] == cache
    assert dec["ops"]["write_state"] == 2 * t.num_hidden_layers
    assert dec["ops"].get("constexpr_blockwise_shift_scale", 0) >= 8  # int4 weights
    manifest = json.loads((tmp_path / "c" / "fastvlm_export.json").read_text())
    assert manifest["format"] == "coreml" and manifest["precision"]["llm"] == "int4"


# ---------------------------------------------------------------------- onnx-community side files
CHATS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                  {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
     {"role": "assistant", "content": "two"}, {"role": "user", "content": "and now?"}],
]  # fmt: skip


@pytest.mark.parametrize("style", ["apple", "hf"])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_exported_chat_template_renders_like_ours(style, chat):
    """tokenizer_config.json's Jinja template (rendered as HF renderers do: trim_blocks) gives
    exactly processing.render_chat's prompt, for both template styles and a custom system."""
    import dataclasses

    jinja2 = pytest.importorskip("jinja2")
    from fastvlm.export.onnx_community import chat_template
    from fastvlm.processing import render_chat

    cfg = dataclasses.replace(make_tiny_model().config, chat_template=style,
                              system_prompt="You are terse.")  # fmt: skip
    msgs = CHATS[chat]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    got = env.from_string(chat_template(cfg)).render(messages=msgs, add_generation_prompt=True)
    ours = [{**m, "content": m["content"] if isinstance(m["content"], str) else
             [{**p, "image": None} if p["type"] == "image" else p for p in m["content"]]}
            for m in msgs]  # fmt: skip
    want, _ = render_chat(ours, style, cfg.system_prompt)
    assert got == want


# ---------------------------------------------------------------------- fp16 cast hygiene
def _cast_after_layout(graph) -> list[str]:
    """Casts that read a layout op's output: the chain onnxruntime-node 1.30's
    MatmulTransposeFusion reorders (and crashes on when the Cast names a graph output)."""
    from fastvlm.export.onnx_casts import LAYOUT_OPS

    producer = {o: n for n in graph.node for o in n.output}
    return [n.name for n in graph.node if n.op_type == "Cast"
            and getattr(producer.get(n.input[0]), "op_type", None) in LAYOUT_OPS]  # fmt: skip


def _cast_graph(kind: str, layout: str = "Transpose"):
    """Small fp16 → fp32 graphs in the shapes the float16 converter leaves behind."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "w")]
    nodes = [h.make_node("Cast", ["x"], ["x16"], to=T.FLOAT16),
             h.make_node("Neg", ["x16"], ["h16"])]  # fp16 compute ends, layout ops follow
    if layout == "Transpose":
        nodes.append(h.make_node("Transpose", ["h16"], ["t"], perm=[0, 2, 1]))
    elif layout == "Reshape+Transpose":
        init.append(numpy_helper.from_array(np.array([2, 3, 4], np.int64), "shape"))
        nodes += [h.make_node("Reshape", ["h16", "shape"], ["r"]),
                  h.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1])]  # fmt: skip
    else:  # Unsqueeze + Squeeze + Flatten (rank-preserving overall: (2, 4, 3))
        init.append(numpy_helper.from_array(np.array([0], np.int64), "ax"))
        nodes += [h.make_node("Transpose", ["h16"], ["tt"], perm=[0, 2, 1]),
                  h.make_node("Unsqueeze", ["tt", "ax"], ["u"]),
                  h.make_node("Squeeze", ["u", "ax"], ["t"])]  # fmt: skip
    img_shape = [2, 4, 3] if kind == "two_outputs" else [2, 4, 5]
    outs = [h.make_tensor_value_info("feat", T.FLOAT, [2, 4, 3]),
            h.make_tensor_value_info("img", T.FLOAT, img_shape)]  # fmt: skip
    if kind == "duplicate":  # the converter's form: one cast per consumer
        nodes += [h.make_node("Cast", ["t"], ["feat"], to=T.FLOAT),
                  h.make_node("Cast", ["t"], ["t32"], to=T.FLOAT),
                  h.make_node("MatMul", ["t32", "w"], ["img"])]  # fmt: skip
    elif kind == "merged":  # after CSE: the cast names a graph output and feeds the MatMul
        nodes += [h.make_node("Cast", ["t"], ["feat"], to=T.FLOAT),
                  h.make_node("MatMul", ["feat", "w"], ["img"])]  # fmt: skip
    elif kind == "shared":  # the layout output has a non-cast consumer too: it must stay fp16
        nodes += [h.make_node("Cast", ["t"], ["feat"], to=T.FLOAT),
                  h.make_node("Neg", ["t"], ["n16"]),
                  h.make_node("Cast", ["n16"], ["n32"], to=T.FLOAT),
                  h.make_node("MatMul", ["n32", "w"], ["img"])]  # fmt: skip
    else:  # "two_outputs": two casts of one tensor, each naming its own graph output
        nodes += [h.make_node("Cast", ["t"], ["feat"], to=T.FLOAT),
                  h.make_node("Cast", ["t"], ["img"], to=T.FLOAT)]  # fmt: skip
    nodes.reverse()  # unsorted on purpose, as the converter leaves its casts
    graph = h.make_graph(nodes, kind, [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 4])],
                         outs, init)  # fmt: skip
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def _run(model, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


@needs_ort
@pytest.mark.parametrize("layout", ["Transpose", "Reshape+Transpose", "Unsqueeze+Squeeze"])
@pytest.mark.parametrize("kind", ["duplicate", "merged", "shared", "two_outputs"])
def test_tidy_casts_leaves_no_cast_after_layout_ops(kind, layout):
    import copy

    import onnx

    from fastvlm.export.onnx_casts import tidy_casts

    before = _cast_graph(kind, layout)
    topo = copy.deepcopy(before)
    topo.graph.node.reverse()
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    want = _run(topo, x)
    after = tidy_casts(copy.deepcopy(before))
    onnx.checker.check_model(after, full_check=True)  # valid and topologically sorted
    chains = _cast_after_layout(after.graph)
    if kind in ("duplicate", "merged"):  # the crashing shapes: no cast left behind the layout
        assert chains == [], chains
    else:  # the layout output has other readers (a node, a second graph output): kept as is
        assert len(chains) == (1 if kind == "shared" else 2), chains
    assert [o.name for o in after.graph.output] == ["feat", "img"]
    for got, ref in zip(_run(after, x), want, strict=True):
        # same values up to fp16 rounding (ORT CPU may run the fp16 Neg in fp32 either way)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.allclose(got, ref, rtol=2e-3, atol=2e-3), np.abs(got - ref).max()


@needs_ort
@pytest.mark.parametrize("second", ["float32", "float64", "int32"])
def test_tidy_casts_drops_fp16_round_trips(second):
    """fp32 → fp16 → fp32 on a blocked node's output only lost precision: it goes; before an
    integer cast the fp16 rounding is part of the result: it stays."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper

    from fastvlm.export.onnx_casts import tidy_casts

    to = {"float32": T.FLOAT, "float64": T.DOUBLE, "int32": T.INT32}[second]
    w = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"]),
             h.make_node("Cast", ["y"], ["y16"], to=T.FLOAT16),
             h.make_node("Cast", ["y16"], ["out"], to=to)]  # fmt: skip
    ins = [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 4])]
    outs = [h.make_tensor_value_info("out", to, [2, 3, 5])]
    g = h.make_graph(nodes, "rt", ins, outs, [numpy_helper.from_array(w, "w")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32) * 10
    before = _run(model, x)[0]
    tidy = tidy_casts(model)
    fp16 = [n for n in tidy.graph.node if n.op_type == "Cast" and n.attribute[0].i == T.FLOAT16]
    if second == "int32":
        assert len(fp16) == 1 and np.array_equal(_run(tidy, x)[0], before)
        return
    exact = (x @ w).astype(second)
    assert np.abs(before - exact).max() > 1e-3  # the fp16 rounding is visible
    assert fp16 == [] and np.abs(_run(tidy, x)[0] - exact).max() < 1e-4


@needs_ort
@pytest.mark.parametrize("spec", ["vision=fp16,projector=fp32", "vision=fp32,projector=fp16",
                                  "vision=fp16,projector=fp32,embed=fp16,llm=fp16"])  # fmt: skip
def test_onnx_precision_mixes_export_clean_graphs(demo, tmp_path, spec):
    """Every fp16 graph of a real export: valid, sorted, no cast behind a layout op, and the
    mixed vision graph's outputs match PyTorch (fp32 parts not rounded through fp16)."""
    import onnx

    from fastvlm.export.onnx import export_onnx
    from fastvlm.backends.ort import OrtModel
    from fastvlm.export.parity import sample_image

    res = export_onnx(demo.model, tmp_path / "m", spec, demo.tokenizer, parity=False,
                      log=lambda *_: None)  # fmt: skip
    for rel in res.files:
        if rel.endswith(".onnx") and "fp16" in rel:
            g = onnx.load(str(res.out / rel))
            onnx.checker.check_model(g, full_check=True)
            assert _cast_after_layout(g.graph) == [], rel
    px = demo.preprocess(sample_image(256))
    with torch.no_grad():
        want = demo.model.embed_images(px).numpy()
    ort_model = OrtModel(res.out)
    got, feats = ort_model.sessions["vision"].run(None, {"pixel_values": px.numpy()})
    if res.precision["projector"] == "fp32":  # image_features = the fp32 projector, not rounded
        proj = ort_model.sessions["projector"].run(None, {"vision_features": feats})[0]
        assert np.abs(proj - got).max() < 1e-4, np.abs(proj - got).max()
    cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cos > 0.9999 and np.abs(got - want).max() < 0.1, (cos, np.abs(got - want).max())


@needs_ort
def test_tidy_casts_leaves_control_flow_graphs_alone():
    """A subgraph may read an outer name a rewrite would change: such graphs are not touched."""
    import copy

    from onnx import TensorProto as T
    from onnx import helper as h

    from fastvlm.export.onnx_casts import tidy_casts

    model = _cast_graph("duplicate")
    g = model.graph
    branch = h.make_graph([h.make_node("Identity", ["t"], ["b"])], "branch", [],
                          [h.make_tensor_value_info("b", T.FLOAT16, None)])  # fmt: skip
    g.input.append(h.make_tensor_value_info("c", T.BOOL, []))
    g.node.append(h.make_node("If", ["c"], ["o"], then_branch=branch, else_branch=branch))
    g.output.append(h.make_tensor_value_info("o", T.FLOAT16, None))
    before = copy.deepcopy(model)
    assert tidy_casts(model) == before
