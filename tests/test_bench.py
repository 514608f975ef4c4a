"""`fastvlm bench` end to end on the tiny shape: table + one JSON object as the last line, with
the fields and ratios the README and benchmarks/ quote. (Speed itself is never asserted in unit
tests: the numbers come from real `fastvlm bench` runs, see benchmarks/.)"""

from __future__ import annotations

import json

import pytest
import torch

from fastvlm import bench
from fastvlm.bench.measure import decode_bytes_per_token
from fastvlm.bench.workload import at_resolution, build_shape
from fastvlm.engine.allocator import tune_malloc


def test_bench_tiny_shape_reports_everything(capsys):
    rc = bench.main(
        [
            "--shape", "tiny", "--image-size", "128,64", "--quant", "fp32;int8;llm=int4-g32",
            "--max-tokens", "6", "--vision-batch", "1,2", "--concurrency", "1,3",
        ]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert "measured read bandwidth" in "\n".join(out[:-1])
    names = [r["name"] for r in result["runs"]]
    assert names == ["fastvlm fp32", "fastvlm int8", "fastvlm llm=int4-g32", "fastvlm fp32 @64"]
    fp32, int8, int4, small = result["runs"]
    for r in result["runs"]:
        assert r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and 0 < r["mbu"]
        runs = r["decode_tok_s_runs"]  # --repeats 3 (default): the median run is reported
        assert len(runs) == 3 and sorted(runs)[1] == r["decode_tok_s"]
        median = runs.index(sorted(runs)[1])
        assert r["mbu"] == pytest.approx(r["mbu_runs"][median], rel=1e-3)
        assert r["roofline_tok_s"] == pytest.approx(
            r["bandwidth_gb_s"] * 1e9 / r["bytes_per_token"]
        )
        assert r["mbu_at_start_bandwidth"] == pytest.approx(
            r["decode_tok_s"] * r["bytes_per_token"] / (result["info"]["bandwidth_gb_s"] * 1e9)
        )
    assert fp32["image_tokens"] == 4 and small["image_tokens"] == 1  # 128 px → 2x2, 64 px → 1
    assert int4["bytes_per_token"] < int8["bytes_per_token"] < fp32["bytes_per_token"]
    assert fp32["vision_images_s@2"] > 0 and fp32["aggregate_tok_s@3"] > 0
    assert "fastvlm int8 decode / fp32 decode" in result["ratios"]
    assert result["transformers"] == []


def test_decode_bytes_counts_quantized_weights():
    from fastvlm.quant import quantize_model

    m = build_shape("tiny", 64)
    fp = decode_bytes_per_token(m, context=0)
    lm = m.language_model
    weights = sum(p.numel() for p in lm.layers.parameters()) + m.lm_head.weight.numel()
    assert fp >= 4 * weights  # every decoder weight and the lm_head, fp32
    quantize_model(m, "int8")
    q = decode_bytes_per_token(m, context=0)
    assert q < fp / 2.5  # int8 weights (+ scales, norms, biases, the fp32 embedding row)
    assert decode_bytes_per_token(m, context=100) > q  # the KV cache is read too


def test_at_resolution_shares_weights():
    m = build_shape("tiny", 128)
    m2 = at_resolution(m, 64)
    assert m2.config.num_image_tokens == 1 and m.config.num_image_tokens == 4
    assert m2.lm_head.weight is m.lm_head.weight
    with torch.inference_mode():
        assert m2.embed_images(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64)


def test_tune_malloc_is_idempotent():
    assert tune_malloc() == tune_malloc()


def test_bench_onnxruntime_backend(capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rc = bench.main(
        ["--shape", "tiny", "--image-size", "64", "--quant", "fp32", "--max-tokens", "4",
         "--backend", "torch,onnxruntime", "--vision-batch", "1", "--concurrency", "1"]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ort = next(r for r in result["runs"] if r["name"] == "onnxruntime fp32")
    assert ort["decode_tok_s"] > 0 and ort["decoder_mb"] > 0 and ort["ttft_s"] > 0
    assert "fastvlm fp32 decode / onnxruntime fp32 decode" in result["ratios"]
