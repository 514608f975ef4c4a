"""transformers.js (pinned in fastvlm/export/js) loads our ONNX exports as is, in Node.

For every preset the folder is loaded with AutoProcessor + AutoModelForImageTextToText, the chat
template is applied, and greedy tokens for examples/shapes*.png are compared with PyTorch:
fp32 identical, quantized presets at or above the floors README "Export" documents.
Skips only where node / npm are absent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import has_module

import fastvlm
from fastvlm.export.js_deps import ensure_node_modules, node_available

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [str(p) for p in sorted((ROOT / "examples").glob("shapes*.png"))]
PROMPT = "Describe this image."
MAX_NEW = 32
# greedy agreement floors vs PyTorch fp32 (README "Export"; measured 1.0 on the demo model)
FLOORS = {"quality": 1.0, "balanced": 0.95, "small": 0.9}
# --precision mixes: floor by decoder precision (the vision/projector/embed fp16 parts cost less)
MIX_FLOORS = {"fp32": 0.95, "fp16": 0.95, "int8": 0.95, "int4": 0.9}
pytestmark = [
    pytest.mark.skipif(not node_available(), reason="node / npm not installed"),
    pytest.mark.skipif(
        not (has_module("onnx") and has_module("onnxruntime")), reason="onnx/onnxruntime missing"
    ),
]


@pytest.fixture(scope="module")
def js_root():
    return ensure_node_modules(log=print)


@pytest.fixture(scope="module")
def demo():
    return fastvlm.load(engine="reference")


@pytest.fixture(scope="module")
def torch_ref(demo):
    """(prompt ids, greedy tokens incl. EOS) per example image, from PyTorch fp32."""
    out = {}
    for img in EXAMPLES:
        ids, px = demo.encode(demo.describe_messages([img], PROMPT))
        out[img] = (ids, demo.generate_ids(ids, px, max_tokens=MAX_NEW))
    return out


def export(demo, out: Path, preset: str, external: bool = False) -> Path:
    import fastvlm.export.onnx as onnx_mod

    old = onnx_mod.EXTERNAL_DATA_BYTES
    onnx_mod.EXTERNAL_DATA_BYTES = 0 if external else old  # every graph → .onnx + .onnx_data
    try:
        onnx_mod.export_onnx(demo.model, out, preset, demo.tokenizer, parity=False,
                             log=lambda *_: None)  # fmt: skip
    finally:
        onnx_mod.EXTERNAL_DATA_BYTES = old
    return out


def run_js(js_root: Path, folder: Path) -> dict[str, dict]:
    r = subprocess.run(
        ["node", str(js_root / "generate.mjs"), str(folder), str(MAX_NEW), PROMPT, *EXAMPLES],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=js_root,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    return {row["image"]: row for row in rows}


def agreement(got: list[int], want: list[int]) -> float:
    """Position-wise greedy agreement over the PyTorch sequence (free-running)."""
    same = sum(a == b for a, b in zip(got, want, strict=False))
    return same / max(len(want), len(got))


@pytest.mark.parametrize("preset, external", [("quality", False), ("balanced", False),
                                              ("small", False), ("quality", True)])  # fmt: skip
def test_transformers_js_loads_export_and_matches_pytorch(
    js_root, demo, torch_ref, tmp_path, preset, external
):
    folder = export(demo, tmp_path / f"fastvlm-{preset}", preset, external)
    cfg = json.loads((folder / "config.json").read_text())
    js_cfg = cfg["transformers.js_config"]
    for base, dtype in js_cfg["dtype"].items():  # every declared file exists under its suffix
        suffix = {"fp32": "", "fp16": "_fp16", "q8": "_quantized", "q4": "_q4"}[dtype]
        assert (folder / "onnx" / f"{base}{suffix}.onnx").exists(), (base, dtype)
    assert bool(js_cfg.get("use_external_data_format")) == external
    rows = run_js(js_root, folder)
    assert set(rows) == set(EXAMPLES)
    total = same = 0.0
    for img, (ids, want) in torch_ref.items():
        assert rows[img]["prompt_ids"] == ids, "chat template / image expansion differ"
        got = rows[img]["tokens"]
        if preset == "quality":
            assert got == want, img
            assert rows[img]["text"] == demo.tokenizer.decode(want, skip_special_tokens=True)
        n = max(len(want), len(got))
        total += n
        same += agreement(got, want) * n
    assert same / total >= FLOORS[preset], (preset, same / total)


def test_contract_files(demo, tmp_path):
    """The side files transformers.js reads, with the values it keys on."""
    import onnx

    folder = export(demo, tmp_path / "c", "small")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llava_qwen2" and cfg["architectures"] == ["LlavaQwen2ForCausalLM"]
    for key in ("num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size"):
        assert key in cfg  # flat Qwen2 keys: the normalized config reads these
    assert cfg["transformers.js_config"]["dtype"] == {
        "vision_encoder": "fp16", "embed_tokens": "fp16", "decoder_model_merged": "q4"}  # fmt: skip
    proc = json.loads((folder / "processor_config.json").read_text())
    assert proc["image_token"] == "<image>"
    assert (demo.image_size // proc["patch_size"]) ** 2 == demo.num_image_tokens
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] and "chat_template" in tok
    gen = json.loads((folder / "generation_config.json").read_text())
    assert set(demo.eos_ids) <= set(gen["eos_token_id"])
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": demo.image_size, "width": demo.image_size}
    vis = onnx.load(str(folder / "onnx/vision_encoder_fp16.onnx"), load_external_data=False)
    assert [o.name for o in vis.graph.output][0] == "image_features"
    dec = onnx.load(str(folder / "onnx/decoder_model_merged_q4.onnx"), load_external_data=False)
    past = next(i for i in dec.graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.shape.dim[0].dim_param == "batch_size"
    # our own loader reads the same folder
    vlm = fastvlm.load(folder)
    assert vlm.describe(EXAMPLES[0], max_tokens=4)


@pytest.mark.parametrize("size", [(256, 256), (384, 256), (200, 300), (100, 60), (512, 512)])
def test_transformers_js_pixels_follow_fastvlm_framing(js_root, demo, tmp_path, size):
    """The Node / browser examples pad to a square before the processor's resize (Apple's
    framing), so pixel_values match fastvlm's own up to the resampler (PIL vs sharp); square
    images at the native size are identical."""
    import os

    import numpy as np
    from PIL import Image

    folder = export(demo, tmp_path / "px", "quality")
    img = tmp_path / f"img-{size[0]}x{size[1]}.png"
    Image.open(EXAMPLES[1]).convert("RGB").resize(size, Image.BICUBIC).save(img)
    r = subprocess.run(
        ["node", str(js_root / "generate.mjs"), str(folder), "1", PROMPT, str(img)],
        capture_output=True, text=True, timeout=600, cwd=js_root,
        env={**os.environ, "FASTVLM_DUMP_PIXELS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.splitlines()[-1])
    s = demo.image_size
    got = np.asarray(row["pixels"], np.float32).reshape(3, s, s)
    want = demo.preprocess(str(img))[0].numpy()
    diff = np.abs(got - want)
    if size == (s, s):
        assert diff.max() == 0
    assert diff.mean() < 0.02, diff.mean()


@pytest.mark.parametrize("spec", [
    "vision=fp16,projector=fp32,embed=fp32,llm=fp32",  # crashed onnxruntime-node 1.30 before
    "vision=fp16,projector=fp32,embed=fp16,llm=fp16",
    "vision=fp32,projector=fp16,embed=fp16,llm=int8",
    "vision=fp16,projector=fp32,embed=fp32,llm=int4",
])  # fmt: skip
def test_transformers_js_runs_precision_mixes(js_root, demo, torch_ref, tmp_path, spec):
    """Mixed vision / projector / embed / decoder precisions load and generate in Node (the
    node runtime's optimizer used to segfault on the mixed vision graph's casts)."""
    folder = export(demo, tmp_path / "mix", spec)
    rows = run_js(js_root, folder)
    assert set(rows) == set(EXAMPLES)
    total = same = 0.0
    for img, (ids, want) in torch_ref.items():
        assert rows[img]["prompt_ids"] == ids
        got = rows[img]["tokens"]
        n = max(len(want), len(got))
        total += n
        same += agreement(got, want) * n
    llm = spec.rsplit("llm=", 1)[1]
    print(f"{spec}: greedy agreement {same / total:.3f} over {total:.0f} tokens")
    assert same / total >= MIX_FLOORS[llm], (spec, same / total)
