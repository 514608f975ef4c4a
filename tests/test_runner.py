"""The engine's model side without the engine: which decode strategy is chosen for a device and
options (once, at construction), and the vision cache's LRU."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from fastvlm.engine.engine import Engine
from fastvlm.engine.kv_cache import SlotKVCache
from fastvlm.engine.runner import (
    CompiledDecode,
    CudaGraphDecode,
    DecodeRunner,
    FusedDecode,
    VisionCache,
    decode_runner,
)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=4)


@pytest.mark.parametrize(
    "device,compile,graphs,fused,want",
    [
        ("cpu", False, None, True, FusedDecode),
        ("cpu", False, None, False, DecodeRunner),
        ("cpu", True, None, True, CompiledDecode),
        ("cuda", False, None, False, CudaGraphDecode),
        ("cuda", False, True, False, CudaGraphDecode),
        ("cuda", False, False, False, DecodeRunner),
        ("cuda", True, None, False, CompiledDecode),
    ],
)
def test_one_decode_strategy_per_device_and_options(model, device, compile, graphs, fused, want):
    cache = SlotKVCache.for_model(model, 1, 8)
    r = decode_runner(
        model, cache, torch.device(device), compile=compile, cuda_graphs=graphs, fused=fused
    )
    assert type(r) is want
    assert (r.graphs is not None) == (want is CudaGraphDecode)


@pytest.mark.parametrize(
    "opts,want",
    [
        ({}, FusedDecode),
        ({"fused_decode": False}, DecodeRunner),
        ({"cpu_kernels": False}, DecodeRunner),  # the fused step needs the CPU kernels on
        ({"compile": True}, CompiledDecode),
    ],
)
def test_engine_picks_its_strategy_at_construction(model, opts, want):
    eng = Engine(model, max_len=32, **opts)
    assert type(eng.runner.decoder) is want and eng.graphs is None
    assert eng.fused_decode == (want is FusedDecode)


@pytest.mark.parametrize("capacity", [0, 2, 3])
def test_vision_cache_is_an_lru_of_its_capacity(capacity):
    vc = VisionCache(capacity)
    for i in range(5):
        vc.put(f"k{i}", torch.full((1,), float(i)))
        if capacity:
            vc.get("k0")  # keep k0 the most recently used
    assert len(vc) == capacity
    if capacity:
        assert vc.get("k0") is not None and vc.get("k4") is not None
        assert vc.get("k1") is None  # evicted first
    else:
        assert vc.get("k0") is None
    assert vc.hits + vc.misses > 0
