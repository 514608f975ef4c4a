"""Streamed quantized loading (`load_model(folder, quant=...)`, quant/stream.py) and the
row-range safetensors reader: equal to load-then-quantize bit for bit, reads planned weights
only in bounded row chunks, never holds the float decoder (peak RSS of a child process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastvlm
from fastvlm import quant
from fastvlm.cli import main as cli_main
from fastvlm.config import shape
from fastvlm.errors import CheckpointError, ConfigError
from fastvlm.model.fastvlm import FastVLMModel
from fastvlm.quant import Int4Linear, Int8Linear, stream
from fastvlm.safetensors_rows import SafetensorsRows
from fastvlm.weights import load_model, save_checkpoint

from conftest import make_tiny_model

SPECS = ["int8", "int4-g32", "llm=int4-g64-sym,projector=int8,vision=int8", "llm=int8"]


def _save(tmp_path: Path, fmt: str = "fastvlm", dtype=None, **kw) -> Path:
    model = make_tiny_model(**kw)
    folder = tmp_path / f"ckpt-{fmt}-{dtype}-{len(kw)}"
    save_checkpoint(model.state_dict(), model.config, folder, fmt, dtype=dtype)
    return folder


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "fmt,dtype,kw",
    [("fastvlm", None, {}), ("fastvlm", torch.bfloat16, {}), ("hf", None, {"tie": False}),
     ("apple", torch.float16, {"vocab_size": 320})],
)  # fmt: skip
def test_streamed_equals_load_then_quantize(tmp_path, spec, fmt, dtype, kw):
    folder = _save(tmp_path, fmt, dtype, **kw)
    ref = load_model(folder)
    summary = quant.quantize_model(ref, spec)
    got = load_model(folder, quant=spec)
    _equal_state(ref, got)
    assert got.config.quantization == ref.config.quantization
    assert got.config.text.tie_word_embeddings == ref.config.text.tie_word_embeddings
    kinds = {type(m) for m in got.modules()}
    assert (Int4Linear in kinds) == ("int4" in spec) and Int8Linear in kinds
    x = torch.randint(4, 200, (1, 7))
    with torch.inference_mode():
        torch.testing.assert_close(got(x), ref(x))
    assert str(got.quant_summary) == str(summary)  # the same per-component size report


def test_tied_lm_head_is_quantized_from_the_embedding_rows(tmp_path):
    folder = _save(tmp_path, vocab_size=320)  # 320 % 16 == 0: int4 takes lm_head
    got = load_model(folder, quant="int4-g32")
    assert isinstance(got.lm_head, Int4Linear) and not got.config.text.tie_word_embeddings
    emb = got.language_model.embed_tokens.weight  # the embedding stays float
    err = (got.lm_head.dequantized_weight() - emb).abs().max()
    assert emb.dtype == torch.float32 and 0 < err < emb.abs().max() / 7


def test_planned_weights_are_only_read_in_row_chunks(tmp_path, monkeypatch):
    folder = _save(tmp_path, vocab_size=320)
    ref = load_model(folder)
    quant.quantize_model(ref, "int4-g32")
    monkeypatch.setattr(stream, "CHUNK_BYTES", 4 * 64 * 24)  # 24 rows of K = 64
    reads: list[tuple[str, int | None, int | None]] = []
    real = SafetensorsRows.read

    def spy(self, key, r0=None, r1=None):
        reads.append((key, r0, r1))
        return real(self, key, r0, r1)

    monkeypatch.setattr(SafetensorsRows, "read", spy)
    got = load_model(folder, quant="int4-g32")
    _equal_state(ref, got)  # chunking changes nothing
    planned = set(_plan(folder, "int4-g32").targets)
    assert "language_model.layers.0.mlp.up_proj.weight" in planned
    for key, r0, r1 in reads:
        if key in planned:
            assert r0 is not None and r1 - r0 <= 24, (key, r0, r1)
    assert any(k in planned and r0 > 0 for k, r0, _ in reads)  # several chunks per weight


def _plan(folder: Path, spec: str) -> stream.StreamPlan:
    cfg = fastvlm.weights.load_config(folder)
    with torch.device("meta"):
        model = FastVLMModel(cfg)
    return stream.plan_streamed(model, spec)


def test_quant_option_errors(tmp_path):
    folder = _save(tmp_path)
    with pytest.raises(ConfigError, match="quantizes nothing"):
        load_model(folder, quant="llm=none")
    with pytest.raises(ConfigError, match="int2"):
        load_model(folder, quant="llm=int2")
    q = load_model(folder, quant="int8")
    save_checkpoint(q.state_dict(), q.config, tmp_path / "q")
    with pytest.raises(ConfigError, match="already quantized"):
        load_model(tmp_path / "q", quant="int4")
    for name in (None, "fp32", "none", ""):  # "no quantization" spellings load float
        assert not load_model(folder, quant=name).config.quantization


def test_fastvlm_load_quant(tiny_dir, tmp_path):
    vlm = fastvlm.load(tiny_dir, device="cpu", dtype="float32", quant="int8")
    assert isinstance(vlm.model.language_model.layers[0].mlp.up_proj, Int8Linear)
    image = torch.rand(3, 64, 80).mul(255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert isinstance(vlm.describe(image, max_tokens=3), str)
    onnx = tmp_path / "export"
    onnx.mkdir()
    (onnx / "fastvlm_export.json").write_text("{}")
    with pytest.raises(ConfigError, match="ONNX export"):
        fastvlm.load(onnx, quant="int4")


def test_cli_quantize_streams_and_matches_the_in_memory_path(tiny_dir, tmp_path):
    dst = tmp_path / "q"
    assert cli_main(["quantize", str(tiny_dir), str(dst), "--quant", "int4-g32"]) == 0
    ref = load_model(tiny_dir)
    quant.quantize_model(ref, "int4-g32", finalize_now=False)
    with safe_open(str(dst / "model.safetensors"), "pt") as h:
        for k, v in ref.state_dict().items():
            if k.endswith("num_batches_tracked") or k == "lm_head.weight":
                continue  # not saved (the head is tied: 300 rows are no int4 shape)
            t = h.get_tensor(k)
            assert torch.equal(t, v.to(t.dtype)), k


# ---------------------------------------------------------------------- the row reader
def test_row_reader_matches_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(37, 5, generator=g).bfloat16(),
        "b": torch.randn(3, 4, 2, generator=g),
        "c": torch.randint(-128, 127, (9, 8), dtype=torch.int8, generator=g),
        "d": torch.tensor([True, False, True]),
        "e": torch.tensor(3.5, dtype=torch.float16),
        "f": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with SafetensorsRows(tmp_path / "x.safetensors") as h:
        assert sorted(h.keys()) == sorted(tensors)
        for k, t in tensors.items():
            got = h.read(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
            assert h.shape(k) == tuple(t.shape) and h.dtype(k) == t.dtype
        for r0, r1 in ((0, 1), (5, 17), (36, 37), (0, 37)):
            assert torch.equal(h.read("a", r0, r1), tensors["a"][r0:r1])
        assert torch.equal(h.read("b", 1, 3), tensors["b"][1:3])


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[:6], lambda b: b[:-7], lambda b: (10**9).to_bytes(8, "little") + b[8:],
     lambda b: b[:8] + b"{not json" + b[17:]],
)  # fmt: skip
def test_row_reader_rejects_damaged_files(tmp_path, damage):
    p = tmp_path / "x.safetensors"
    save_file({"w": torch.randn(16, 16)}, str(p))
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        with SafetensorsRows(p) as h:
            h.read("w")


# ---------------------------------------------------------------------- memory, for real
CHILD = textwrap.dedent(
    """
    import json, sys
    from fastvlm.bench.rss import current_mb, peak_mb
    from fastvlm.quant import quantize_int4, stream
    from fastvlm.weights import load_model
    import torch
    stream.CHUNK_BYTES = int(sys.argv[3])
    from fastvlm.config import shape
    from fastvlm.model.fastvlm import FastVLMModel
    quantize_int4(torch.randn(64, 128), 64)  # first-use runtime setup is not the model's memory
    with torch.device("meta"):
        FastVLMModel(shape("tiny", 64))
    before = current_mb()
    m = load_model(sys.argv[1], quant=sys.argv[2] if sys.argv[2] != "fp32" else None)
    seen, n = set(), 0
    for t in [*m.parameters(), *m.buffers()]:
        s = t.untyped_storage()
        if s.data_ptr() not in seen and t.numel():
            seen.add(s.data_ptr()); n += s.nbytes()
    print(json.dumps({"before": before, "peak": peak_mb(), "weights_mb": n / 2**20}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_streamed_load_never_holds_the_float_decoder(tmp_path):
    """Peak RSS of a child loading int4 stays within 1.3x its loaded weights (+ one chunk and
    slack), while the float load of the same folder exceeds that bound (the test can fail)."""
    cfg = shape("tiny", 64, vocab_size=8192, hidden_size=512, intermediate_size=2048,
                num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = FastVLMModel(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    save_checkpoint(state, cfg, tmp_path / "m")
    float_mb = sum(v.numel() * 4 for v in state.values()) / 2**20
    del state

    def child(q: str) -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "m"), q, str(chunk)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    chunk = 2**22
    slack = 3 * chunk / 2**20 + 16  # a chunk read, its fp32 temporaries, allocator rounding
    q = child("int4-g64")
    assert q["weights_mb"] < float_mb / 3
    bound = 1.3 * q["weights_mb"] + slack
    assert q["peak"] - q["before"] <= bound, (q, bound, float_mb)
    f = child("fp32")
    assert f["peak"] - f["before"] > bound  # what a float load costs: over the bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_tensors_converted_in_row_chunks_equal_a_whole_read(tmp_path, monkeypatch, dtype):
    folder = _save(tmp_path, dtype=dtype)
    ref = load_model(folder)
    monkeypatch.setattr(fastvlm.weights, "CHUNK_BYTES", 4 * 64 * 5)  # 5 rows of 64 at a time
    got = load_model(folder)
    _equal_state(ref, got)
    assert got.source_dtype == ref.source_dtype == dtype


@pytest.mark.parametrize("spec", [None, "int8", "int4-g32"])
def test_loaded_model_holds_no_weight_twice(tiny_dir, spec):
    """After fastvlm.load (device preparation, kernel swaps) and a generation, no two distinct
    storages hold the same weight: tied heads stay shared, nothing kept a float copy."""
    vlm = fastvlm.load(tiny_dir, device="cpu", dtype="float32", quant=spec)
    image = torch.rand(3, 64, 80).mul(255).to(torch.uint8).permute(1, 2, 0).numpy()
    vlm.describe(image, max_tokens=3)
    m = vlm.model
    by_ptr: dict[int, torch.Tensor] = {}
    for t in [*m.parameters(), *m.buffers()]:
        if t.numel() >= 256:
            by_ptr.setdefault(t.untyped_storage().data_ptr(), t)
    seen: dict[tuple, list[torch.Tensor]] = {}
    for t in by_ptr.values():
        for other in seen.get((t.shape, t.dtype), []):
            assert not torch.equal(t, other), f"two copies of a {tuple(t.shape)} tensor"
        seen.setdefault((t.shape, t.dtype), []).append(t)
    emb = m.language_model.embed_tokens.weight
    if m.config.text.tie_word_embeddings:
        assert m.lm_head.weight.data_ptr() == emb.data_ptr()
