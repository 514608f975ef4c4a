"""The fused CPU decode (fastvlm/kernels/fused.py: every decoder layer in one C call) against the
torch decode path it replaces: the same hidden states and cache writes for one step (fp32, int8,
int4 projections, batched rows with different positions and a hole), the same greedy tokens
through the Engine, a rebuilt plan when weights change, and the torch path where the plan
cannot run."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model, randomize
from conftest import random_pixels as pixels
from conftest import random_prompt as prompt

from fastvlm import kernels
from fastvlm.config import TextConfig
from fastvlm.engine.engine import Engine
from fastvlm.engine.kv_cache import SlotKVCache
from fastvlm.engine.sampling import SamplingParams
from fastvlm.model.qwen2 import Qwen2Model, rope_cos_sin
from fastvlm.quant import quantize_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="fastvlm.kernels unavailable")

from fastvlm.kernels.fused import DecodePlan  # noqa: E402

QUANTS = [None, "int8", "int4-g32"]


def tiny(quant: str | None, seed: int = 3):
    m = make_tiny_model(seed=seed, tie=False)
    if quant:
        quantize_model(m, quant)
    kernels.use_fast_linears(m)
    return m


def noisy_caches(cache, g: torch.Generator):
    """`cache` filled with seeded noise, and a deep copy of it for the reference path."""
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    return cache, copy.deepcopy(cache)


def one_step(lm, cache, x, lo, positions, limits, fused: bool, threads: int | None = None):
    """Hidden states (after the final norm) of one decode step over slots lo.. of `cache`."""
    cfg = lm.config
    pos = torch.tensor(positions)
    lim = torch.tensor(limits)
    with torch.inference_mode():
        if fused:
            plan = DecodePlan.build(lm, cache)
            assert plan is not None
            cos, sin = rope_cos_sin(pos[:, None], cfg.head_dim, cfg.rope_theta, torch.float32)
            hd = cfg.head_dim
            before = torch.get_num_threads()
            if threads:  # e.g. 3: static row ranges whose boundaries fall inside the matrices
                torch.set_num_threads(threads)
            try:
                out = plan(x.clone(), lo, pos, lim, cos.reshape(-1, hd), sin.reshape(-1, hd))
            finally:
                torch.set_num_threads(before)
            return lm.norm(out)
        span = int(lim.max()) + 1
        mask = (torch.arange(span)[None] <= lim[:, None])[:, None, None]
        view = cache.window(lo, lo + len(positions), span)
        return lm(x[:, None].clone(), pos[:, None], mask, view)[:, 0]


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("quant", QUANTS)
def test_one_step_matches_torch_path(quant, act_quant):
    if quant is None and act_quant:
        pytest.skip("fp32 has no activation quantization")
    model = tiny(quant)
    for m in model.modules():
        if hasattr(m, "act_quant"):
            m.act_quant = act_quant  # False: the exact kernels, so the paths agree to rounding
    lm, cfg = model.language_model, model.config.text
    g = torch.Generator().manual_seed(0)
    cache = SlotKVCache.for_model(model, slots=4, max_len=40)
    cache, ref_cache = noisy_caches(cache, g)
    x = torch.randn(3, cfg.hidden_size, generator=g)
    # slots 1..3: rows at positions 7 and 30, and a hole (writes at 39, attends key 0 only)
    positions, limits = [7, 30, 39], [7, 30, 0]
    got = one_step(lm, cache, x, 1, positions, limits, fused=True, threads=3)
    want = one_step(lm, ref_cache, x, 1, positions, limits, fused=False)
    # With act_quant, x is rounded to int8 / int16 per call, so a 1e-7 difference upstream can
    # flip one rounding and move an output by ~d·|w| (~1e-3): a looser bound there.
    tol = 1e-4 if not act_quant else 2e-2 if quant == "int4-g32" else 1e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got.abs().mean() > 0.1  # not a degenerate (all-zero) comparison
    for a, b in zip((*cache.k, *cache.v), (*ref_cache.k, *ref_cache.v), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)  # same K/V written, nowhere else
        assert torch.equal(a[0], b[0])  # slot 0 is outside the window: untouched


@pytest.mark.parametrize("quant", QUANTS)
def test_step_from_token_ids_matches_torch_path(quant):
    """`DecodePlan.step` (what the Engine calls): embedding rows, every layer with RoPE from the
    plan's per-position tables, and the final norm in C, against embedding + the torch layers +
    final norm; a token id outside the vocabulary is refused, not read out of bounds."""
    model = tiny(quant)
    for m in model.modules():
        if hasattr(m, "act_quant"):
            m.act_quant = False
    lm, cfg = model.language_model, model.config.text
    g = torch.Generator().manual_seed(2)
    cache = SlotKVCache.for_model(model, slots=4, max_len=40)
    cache, ref_cache = noisy_caches(cache, g)
    tokens = torch.tensor([5, 17, cfg.vocab_size - 1])
    positions, limits = [7, 30, 39], [7, 30, 0]
    with torch.inference_mode():
        plan = DecodePlan.build(lm, cache)
        got = plan.step(tokens, 1, torch.tensor(positions), torch.tensor(limits))
        x = lm.embed_tokens(tokens)
    want = one_step(lm, ref_cache, x, 1, positions, limits, fused=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.abs().mean() > 0.1
    with torch.inference_mode(), pytest.raises(RuntimeError, match="unsupported shape"):
        plan.step(torch.tensor([cfg.vocab_size]), 0, torch.tensor([3]), torch.tensor([3]))


@pytest.mark.parametrize("head_dim", [16, 12])
@pytest.mark.parametrize("position", [0, 5, 20, 31])
def test_single_row_step_matches_torch_path(head_dim, position):
    """One decode row (M = 1) takes the fused layer's own fp32 paths: q/k/v in one parallel
    region, gate/up + SiLU in one, and (head_dim % 8 == 0) attention 8 keys at a time with the
    vectorised exp; head_dim 12 takes the scalar fallback. Attended lengths 1, 6, 21 and 32 cover
    fewer keys than one 8-key block, a partial last block and whole blocks."""
    heads, kvh = 4, 2
    cfg = TextConfig(
        vocab_size=64, hidden_size=64,
        intermediate_size=136, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kvh, head_dim=head_dim, max_position_embeddings=512,
        rope_theta=1e6,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = randomize(Qwen2Model(cfg), seed=5).eval()
    kernels.use_fast_linears(lm)
    g = torch.Generator().manual_seed(1)
    cache = SlotKVCache(cfg.num_hidden_layers, 2, 40, kvh, head_dim, torch.float32, "cpu")
    cache, ref_cache = noisy_caches(cache, g)
    x = torch.randn(1, cfg.hidden_size, generator=g)
    got = one_step(lm, cache, x, 1, [position], [position], fused=True, threads=3)
    want = one_step(lm, ref_cache, x, 1, [position], [position], fused=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.abs().mean() > 0.1
    for a, b in zip((*cache.k, *cache.v), (*ref_cache.k, *ref_cache.v), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", QUANTS)
def test_engine_greedy_tokens_match_torch_path(quant):
    model = tiny(quant)
    if quant == "int4-g32":
        # int4 act_quant rounds x to int8 per call: on a random tiny model (near-tied logits)
        # rounding flips upstream can flip an argmax, so token identity is asserted on the
        # exact kernels; the act_quant path is bounded in test_one_step_matches_torch_path.
        for m in model.modules():
            if hasattr(m, "act_quant"):
                m.act_quant = False
    cfg = model.config
    outs = []
    for fused in (True, False):
        eng = Engine(model, max_len=160, eos_ids=[], fused_decode=fused)
        hs = [
            eng.submit(
                prompt(cfg, 5 + 4 * i, seed=i, image=i == 1),
                pixels(1) if i == 1 else None,
                SamplingParams(max_tokens=12 + 3 * i, ignore_eos=True),
            )  # fmt: skip
            for i in range(4)
        ]
        eng.run_until_done()
        assert (eng._plan is not None) == fused
        outs.append([h.output_ids for h in hs])
    assert outs[0] == outs[1]
    assert all(len(set(o)) > 3 for o in outs[0])


def test_plan_follows_weight_updates_and_module_swaps():
    model = tiny(None)
    cfg = model.config
    ids = prompt(cfg, 9, seed=5)
    p = SamplingParams(max_tokens=10, ignore_eos=True)
    eng = Engine(model, max_len=96, eos_ids=[], prefix_reuse=False)
    first = eng.submit(ids, None, p).result()
    plan = eng._plan
    with torch.no_grad():  # in place: same storage, new version counter
        model.language_model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    fused = eng.submit(ids, None, p).result()
    assert eng._plan is not plan
    ref = Engine(model, max_len=96, eos_ids=[], fused_decode=False, prefix_reuse=False)
    assert fused == ref.submit(ids, None, p).result() != first
    plan = eng._plan
    quantize_model(model, "int8")  # new modules
    for m in model.modules():
        if hasattr(m, "act_quant"):
            m.act_quant = False  # exact kernels: token identity on a random model
    fused = eng.submit(ids, None, p).result()
    assert eng._plan is not plan and eng._plan.layers[0].q.kind == 1
    assert fused == ref.submit(ids, None, p).result()


def test_torch_path_where_the_plan_cannot_run():
    model = tiny(None)
    ids, p = prompt(model.config, 7, seed=6), SamplingParams(max_tokens=8, ignore_eos=True)
    want = Engine(model, max_len=64, eos_ids=[], fused_decode=False).submit(ids, None, p).result()
    prev = kernels.set_enabled(False)
    try:
        eng = Engine(model, max_len=64, eos_ids=[])
        assert eng.submit(ids, None, p).result() == want
        assert eng._plan is None
    finally:
        kernels.set_enabled(prev)
    half = copy.deepcopy(model).to(torch.float64)  # another dtype: no plan, torch path
    assert DecodePlan.build(half.language_model, SlotKVCache.for_model(half, 1, 16)) is None


def test_plan_refuses_autograd_and_bad_shapes():
    model = tiny(None)
    lm, cfg = model.language_model, model.config.text
    cache = SlotKVCache.for_model(model, slots=1, max_len=16)
    with torch.inference_mode():
        plan = DecodePlan.build(lm, cache)
    hd = cfg.head_dim
    x, cs = torch.zeros(1, cfg.hidden_size), torch.ones(1, hd)
    pos = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="inference-only"):
        plan(x, 0, pos, pos, cs, cs)
    with torch.no_grad():
        with pytest.raises(ValueError):
            plan(torch.zeros(1, 3), 0, pos, pos, cs, cs)
        with pytest.raises(RuntimeError, match="unsupported shape"):
            plan(x, 0, pos + 16, pos, cs, cs)  # position past the cache: refused in C
