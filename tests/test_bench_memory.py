"""The memory side of `fastvlm bench`: random-weight shape folders, weight accounting (each
storage once), peak RSS without the probe buffers, the weights estimate that keeps precisions
that cannot fit from being tried, and `--isolate` (one child process per precision)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastvlm import bench
from fastvlm.bench import isolate, shape_folder
from fastvlm.bench.memory import weight_mb
from fastvlm.weights import load_model


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FASTVLM_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_shape_folder_is_sharded_cached_and_loads(cache, monkeypatch):
    monkeypatch.setattr(shape_folder, "SHARD_BYTES", 2**18)  # several shards for the tiny shape
    folder = shape_folder.shape_folder("tiny", 64)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and folder.parent == cache
    stamp = (folder / "model-00000.safetensors").stat().st_mtime_ns
    assert shape_folder.shape_folder("tiny", 128) == folder  # reused, only the size changes
    assert (folder / "model-00000.safetensors").stat().st_mtime_ns == stamp
    m = load_model(folder)
    assert m.config.vision.image_size == 128
    for name, t in m.state_dict().items():
        assert torch.isfinite(t.float()).all(), name
    bf16 = [t for k, t in m.state_dict().items() if "layers" in k and t.ndim == 2]
    assert 0.01 < float(bf16[0].std()) < 0.03  # N(0, 0.02) as build_shape
    q = load_model(folder, quant="llm=int4-g32,projector=int8")  # the streamed path loads it
    assert q.config.quantization["llm"] == "int4-g32"


def test_interrupted_build_is_rebuilt(cache):
    folder = shape_folder.shape_folder("tiny", 64)
    (folder / ".complete").unlink()
    (folder / "model-00000.safetensors").write_bytes(b"partial")
    again = shape_folder.shape_folder("tiny", 64)
    assert load_model(again).config.text.hidden_size == 64


def test_weight_mb_counts_a_tied_head_once():
    from conftest import make_tiny_model

    tied, untied = make_tiny_model(), make_tiny_model(tie=False)
    a, b = weight_mb(tied), weight_mb(untied)
    emb = tied.language_model.embed_tokens.weight
    assert a["lm_head"] == 0 and b["lm_head"] == pytest.approx(emb.numel() * 4 / 2**20)
    assert b["total"] - a["total"] == pytest.approx(b["lm_head"])
    params = {p.data_ptr(): p.numel() * 4 for p in tied.parameters()}
    bufs = sum(x.numel() * x.element_size() for x in tied.buffers())
    assert a["total"] == pytest.approx((sum(params.values()) + bufs) / 2**20)


@pytest.mark.parametrize("spec", [None, "int8", "int4-g32", "llm=int4-g32,projector=int8"])
def test_estimate_weights_mb_tracks_the_loaded_model(cache, spec):
    folder = shape_folder.shape_folder("tiny", 64)
    est = isolate.estimate_weights_mb(folder, spec)
    real = weight_mb(load_model(folder, quant=spec))["total"]
    assert 0.8 < est / real < 1.25, (est, real)
    if spec:
        assert est < isolate.estimate_weights_mb(folder, None)


CHILD = textwrap.dedent(
    """
    import json, torch
    from fastvlm.bench import rss
    from fastvlm.bench.measure import measure_bandwidth
    torch.ones(1).sum()
    before = rss.peak_mb()
    measure_bandwidth(torch.device("cpu"), mb=300, repeats=1)
    mid = rss.peak_mb()
    x = torch.ones(50 * 2**20 // 4)
    print(json.dumps({"before": before, "mid": mid, "after": rss.peak_mb()}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_probe_buffers_are_left_out_of_the_peak():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True)  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["mid"] - r["before"] < 60  # the 300 MB probe is not in the peak
    assert r["after"] - r["before"] > 40  # a real allocation after it still is


def test_isolated_bench_skips_what_cannot_fit(cache, monkeypatch, capsys):
    monkeypatch.setattr(isolate, "available_mb", lambda: 1.0)
    rc = bench.main(["--shape", "tiny", "--isolate", "--quant", "fp32,int8", "--max-tokens", "2"])
    assert rc == 1
    assert "no precision could run" in capsys.readouterr().err


def test_isolated_bench_runs_each_precision_in_its_own_process(cache, capsys):
    rc = bench.main(
        ["--shape", "tiny", "--isolate", "--image-size", "64", "--quant", "fp32;llm=int4-g32",
         "--max-tokens", "4", "--repeats", "1", "--concurrency", "1", "--vision-batch", "1",
         "--interleave", "2"]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["info"]["isolated"] and result["info"]["skipped"] == {}
    fp32, int4 = result["runs"]
    assert [fp32["name"], int4["name"]] == ["fastvlm fp32", "fastvlm llm=int4-g32"]
    for r in (fp32, int4):
        assert r["peak_rss_mb"] >= r["load_peak_rss_mb"] > 0 and r["mbu_interleaved"] > 0
        assert r["bandwidth_interleaved_range_gb_s"][0] <= r["bandwidth_interleaved_gb_s"]
    assert int4["weights_total_mb"] < fp32["weights_total_mb"]
    # tiny's head is tied: counted once in fp32; int4 makes it its own (quantized) copy
    assert fp32["weights_lm_head_mb"] == 0 < int4["weights_lm_head_mb"]
