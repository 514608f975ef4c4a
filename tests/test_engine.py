"""The continuous-batching engine against the reference decoder (`generate_step`): greedy parity
token for token under batching/joining/queueing, seeded sampling, cancel, threads, the vision
cache, prefix reuse and stop strings. Tiny random models on CPU."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model
from conftest import random_pixels as pixels
from conftest import random_prompt as prompt

from fastvlm.engine.engine import Engine, EngineConfig
from fastvlm.engine.generate import generate_step, stream_generate
from fastvlm.engine.request import stream_text
from fastvlm.engine.runner import content_hash
from fastvlm.engine.sampling import SamplingParams

MAX_LEN = 160


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3, tie=False)  # untied: greedy sequences wander, not repeat


def ref(model, ids, px=None, eos_ids=(), **kw) -> list[int]:
    kw.setdefault("ignore_eos", True)
    return list(generate_step(model, ids, px, SamplingParams(**kw), eos_ids=eos_ids))


def params(**kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(**kw)


def engine(model, **kw) -> Engine:
    kw.setdefault("max_len", MAX_LEN)
    kw.setdefault("eos_ids", [])
    return Engine(model, **kw)


# ---------------------------------------------------------------- greedy parity
@pytest.mark.parametrize("image", [False, True])
def test_batch1_greedy_matches_reference(model, image):
    ids, px = prompt(model.config, 9, seed=1, image=image), pixels(0) if image else None
    eng = engine(model)
    h = eng.submit(ids, px, params(max_tokens=24))
    got = list(h)  # iterating drives the engine (no background thread)
    want = ref(model, ids, px, max_tokens=24)
    assert got == want and len(set(want)) > 3
    assert h.finish_reason == "length" and h.stats.generation_tokens == 24
    assert h.prefill_tokens == len(ids) and not eng.has_work()


def test_staggered_concurrent_requests_match_reference(model):
    cfg = model.config
    reqs = [  # (ids, pixels, max_tokens): different lengths, one with an image
        (prompt(cfg, 5, seed=2, image=True), pixels(1), 20),
        (prompt(cfg, 17, seed=3), None, 9),
        (prompt(cfg, 3, seed=4), None, 30),
        (prompt(cfg, 40, seed=5), None, 15),
    ]
    eng = engine(model, slots=4)
    hs = [eng.submit(ids, px, params(max_tokens=n)) for ids, px, n in reqs[:2]]
    for _ in range(3):
        eng.step()
    hs.append(eng.submit(reqs[2][0], None, params(max_tokens=reqs[2][2])))  # joins mid-decode
    for _ in range(4):
        eng.step()
    hs.append(eng.submit(reqs[3][0], None, params(max_tokens=reqs[3][2])))
    eng.step()
    assert sum(r is not None for r in eng.scheduler.running) == 4  # all four decode together now
    eng.run_until_done()
    for (ids, px, n), h in zip(reqs, hs, strict=True):
        assert h.output_ids == ref(model, ids, px, max_tokens=n)
        assert h.finish_reason == "length"
    assert eng.counters["steps"] < sum(n for *_, n in reqs)  # batched, not one by one
    assert eng.counters["holes"] > 0  # a finished slot inside the decode window was skipped


def test_more_requests_than_slots_queue_and_complete(model):
    cfg = model.config
    reqs = [(prompt(cfg, 3 + 5 * i, seed=10 + i), 4 + 3 * i) for i in range(7)]
    eng = engine(model, slots=2)
    hs = [eng.submit(ids, None, params(max_tokens=n)) for ids, n in reqs]
    eng.step()
    assert sum(not h.done for h in hs) == 7 and len(eng.scheduler.waiting) == 5
    eng.run_until_done()
    for (ids, n), h in zip(reqs, hs, strict=True):
        assert h.output_ids == ref(model, ids, max_tokens=n)


def test_eos_stops_like_reference(model):
    ids = prompt(model.config, 8, seed=20)
    full = ref(model, ids, max_tokens=24)
    i = next(i for i in range(2, 24) if full[i] not in full[:i])
    eos = [full[i]]
    eng = engine(model, eos_ids=eos)
    h = eng.submit(ids, None, SamplingParams(max_tokens=24))
    assert (
        h.result() == full[: i + 1] == ref(model, ids, eos_ids=eos, max_tokens=24, ignore_eos=False)
    )
    assert h.finish_reason == "stop"


def test_image_embeds_input_matches_pixels(model):
    ids, px = prompt(model.config, 6, seed=21, image=True), pixels(2)
    with torch.no_grad():
        emb = model.embed_images(px)
    eng = engine(model)
    h = eng.submit(ids, params=params(max_tokens=12), image_embeds=emb)
    assert h.result() == ref(model, ids, px, max_tokens=12)


# ---------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_matches_reference(model):
    cfg = model.config
    ids = prompt(cfg, 7, seed=30)
    sp = dict(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=1234)
    alone = engine(model).submit(ids, None, params(**sp)).result()
    eng = engine(model, slots=4)  # same request alongside greedy and other seeded requests
    others = [
        eng.submit(prompt(cfg, 11, seed=31), None, params(max_tokens=20)),
        eng.submit(prompt(cfg, 4, seed=32), None, params(max_tokens=9, temperature=1.2, seed=5)),
    ]
    eng.step()
    h = eng.submit(ids, None, params(**sp))
    pen = eng.submit(ids, None, params(max_tokens=12, repetition_penalty=1.3))
    eng.run_until_done()
    assert h.output_ids == alone == ref(model, ids, **sp)
    assert others[0].output_ids == ref(model, prompt(cfg, 11, seed=31), max_tokens=20)
    assert pen.output_ids == ref(model, ids, max_tokens=12, repetition_penalty=1.3)
    other_seed = engine(model).submit(ids, None, params(**{**sp, "seed": 99})).result()
    assert other_seed != alone


# ---------------------------------------------------------------- cancel / threads
def test_cancel_frees_the_slot(model):
    cfg = model.config
    eng = engine(model, slots=1)
    a = eng.submit(prompt(cfg, 5, seed=40), None, params(max_tokens=100))
    queued = eng.submit(prompt(cfg, 5, seed=41), None, params(max_tokens=5))
    for _ in range(3):
        eng.step()
    a.cancel()
    queued.cancel()
    ids = prompt(cfg, 9, seed=42)
    b = eng.submit(ids, None, params(max_tokens=10))
    assert b.result() == ref(model, ids, max_tokens=10)
    assert a.finish_reason == "cancelled" and 0 < len(a.output_ids) < 100
    assert list(a) == a.output_ids  # the tokens made before the cancel, then the end
    assert queued.finish_reason == "cancelled" and queued.output_ids == []
    assert not eng.has_work()


@pytest.mark.parametrize("background", [True, False])
def test_threads_submitting_at_once(model, background):
    cfg = model.config
    jobs = [(prompt(cfg, 4 + 3 * i, seed=50 + i), 6 + 2 * i) for i in range(6)]
    eng = engine(model, slots=3)
    if background:
        eng.start()
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def worker(i: int) -> None:
        try:
            ids, n = jobs[i]
            barrier.wait()
            results[i] = list(eng.submit(ids, None, params(max_tokens=n)))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    eng.stop()
    assert not errors and not eng.running
    for i, (ids, n) in enumerate(jobs):
        assert results[i] == ref(model, ids, max_tokens=n)


def test_prefill_error_fails_only_that_request(model):
    cfg = model.config
    eng = engine(model, slots=2)
    ok_ids = prompt(cfg, 6, seed=60)
    ok = eng.submit(ok_ids, None, params(max_tokens=8))
    bad_emb = torch.zeros(1, cfg.num_image_tokens, cfg.text.hidden_size // 2)  # wrong width
    bad = eng.submit(
        prompt(cfg, 4, seed=61, image=True), None, params(max_tokens=4), image_embeds=bad_emb
    )
    eng.run_until_done()
    with pytest.raises(RuntimeError):
        list(bad)
    assert bad.finish_reason == "error"
    assert ok.output_ids == ref(model, ok_ids, max_tokens=8)


def test_user_errors(model):
    cfg = model.config
    eng = engine(model)
    with pytest.raises(ValueError, match="max_len"):
        eng.submit(prompt(cfg, 150, seed=0), None, params(max_tokens=20))
    with pytest.raises(ValueError, match="placeholder"):
        eng.submit(prompt(cfg, 5, seed=0, image=True), None, params(max_tokens=4))
    with pytest.raises(ValueError, match="placeholder"):
        eng.submit(prompt(cfg, 5, seed=0), pixels(0), params(max_tokens=4))
    with pytest.raises(ValueError, match="max_len"):
        Engine(model, max_len=10_000)


# ---------------------------------------------------------------- caches
def count_calls(monkeypatch, model) -> list[int]:
    calls: list[int] = []
    original = model.embed_images

    def counting(px):
        calls.append(px.shape[0])
        return original(px)

    monkeypatch.setattr(model, "embed_images", counting)
    return calls


def test_vision_cache_skips_the_encoder(model, monkeypatch):
    cfg = model.config
    px, other = pixels(3), pixels(4)
    ids1, ids2 = prompt(cfg, 6, seed=70, image=True), prompt(cfg, 9, seed=71, image=True)
    want1, want2 = ref(model, ids1, px, max_tokens=10), ref(model, ids2, px, max_tokens=10)
    assert content_hash(px) == content_hash(px.clone()) != content_hash(other)
    eng = engine(model)
    calls = count_calls(monkeypatch, model)
    assert eng.submit(ids1, px, params(max_tokens=10)).result() == want1
    assert calls == [1]
    assert eng.submit(ids2, px.clone(), params(max_tokens=10)).result() == want2
    assert calls == [1]  # same pixels, new tensor: the encoder did not run again
    eng.submit(ids2, other, params(max_tokens=2)).result()
    assert calls == [1, 1] and eng.vision_cache.hits == 1


def test_reset_caches_recomputes_everything(model, monkeypatch):
    """`reset_caches`: the same request again encodes the image and prefills in full."""
    ids, px = prompt(model.config, 6, seed=72, image=True), pixels(5)
    eng = engine(model)
    calls = count_calls(monkeypatch, model)
    first = eng.submit(ids, px, params(max_tokens=6)).result()
    again = eng.submit(ids, px, params(max_tokens=6))
    assert again.result() == first and calls == [1] and again.prefill_tokens == 1
    eng.reset_caches()
    h = eng.submit(ids, px, params(max_tokens=6))
    assert h.result() == first and calls == [1, 1] and h.prefill_tokens == len(ids)


def test_prefix_reuse_second_turn_prefills_only_new_tokens(model, monkeypatch):
    cfg = model.config
    px = pixels(5)
    ids1 = prompt(cfg, 10, seed=80, image=True)
    eng = engine(model, slots=2)
    out1 = eng.submit(ids1, px, params(max_tokens=12)).result()
    new = prompt(cfg, 7, seed=81)
    ids2 = ids1 + out1 + new
    want = ref(model, ids2, px, max_tokens=12)
    calls = count_calls(monkeypatch, model)
    h2 = eng.submit(ids2, px, params(max_tokens=12))
    assert h2.result() == want
    # the history's KV was reused; the last turn-1 token never ran through the model, so it is
    # prefilled together with the new tokens
    assert h2.cached_tokens == len(ids1) + len(out1) - 1
    assert h2.prefill_tokens == len(new) + 1 == len(ids2) - h2.cached_tokens
    assert calls == []  # the image sits inside the reused prefix: no vision work at all


def test_shared_prefix_is_copied_and_other_history_survives(model):
    cfg = model.config
    system = prompt(cfg, 20, seed=90)
    a_ids, b_ids = system + prompt(cfg, 5, seed=91), system + prompt(cfg, 6, seed=92)
    eng = engine(model, slots=3)
    out_a = eng.submit(a_ids, None, params(max_tokens=8)).result()
    b = eng.submit(b_ids, None, params(max_tokens=8))
    assert b.result() == ref(model, b_ids, max_tokens=8)
    assert b.cached_tokens == len(system)  # copied from a's slot into a free one
    a2_ids = a_ids + out_a + prompt(cfg, 4, seed=93)
    a2 = eng.submit(a2_ids, None, params(max_tokens=8))
    assert a2.result() == ref(model, a2_ids, max_tokens=8)
    assert a2.cached_tokens == len(a_ids) + len(out_a) - 1  # a's history was not overwritten


def test_different_image_same_ids_is_not_reused(model):
    cfg = model.config
    ids = prompt(cfg, 8, seed=95, image=True)
    eng = engine(model, slots=1)
    eng.submit(ids, pixels(6), params(max_tokens=4)).result()
    h = eng.submit(ids, pixels(7), params(max_tokens=10))
    assert h.result() == ref(model, ids, pixels(7), max_tokens=10)
    assert h.cached_tokens == 2  # the two text tokens before the image only


# ---------------------------------------------------------------- text level
@pytest.mark.parametrize("use_stop", [False, True])
def test_stream_text_matches_stream_generate(tokenizer, use_stop):
    model = make_tiny_model(seed=3, tie=False, vocab_size=tokenizer.get_vocab_size())
    ids = prompt(model.config, 8, seed=100)
    base = SamplingParams(max_tokens=30)
    full = "".join(c.text for c in stream_generate(model, tokenizer, ids, None, base))
    stop = [full[12:15]] if use_stop else []
    sp = SamplingParams(max_tokens=30, stop=stop)
    want = list(stream_generate(model, tokenizer, ids, None, sp, eos_ids=[2]))
    eng = engine(model, eos_ids=[2])
    h = eng.submit(ids, None, sp)
    got = list(stream_text(h, tokenizer))
    assert "".join(c.text for c in got) == "".join(c.text for c in want)
    assert got[-1].finish_reason == want[-1].finish_reason
    assert got[-1].finish_reason == ("stop" if use_stop else "length")
    eng.run_until_done()
    assert not eng.has_work()  # a stop string cancels the request and frees its slot


@pytest.mark.skipif(
    not os.environ.get("FASTVLM_TEST_COMPILE"),
    reason="torch.compile is slow; FASTVLM_TEST_COMPILE=1",
)
def test_compiled_decode_matches_reference(model):
    ids = prompt(model.config, 9, seed=110)
    eng = engine(model, compile=True, slots=2)
    hs = [eng.submit(ids, None, params(max_tokens=n)) for n in (12, 6)]
    eng.run_until_done()
    assert hs[0].output_ids == ref(model, ids, max_tokens=12)
    assert hs[1].output_ids == hs[0].output_ids[:6]


def test_from_vlm_matches_the_python_api(tiny_dir):
    from PIL import Image

    import fastvlm

    vlm = fastvlm.load(tiny_dir, device="cpu")
    image = Image.new("RGB", (40, 30), "red")
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}],
        }
    ]
    ids, px = vlm.encode(msgs)
    eng = Engine.from_vlm(vlm, slots=2, max_len=512)
    assert eng.eos_ids == set(vlm.eos_ids) and eng.vocab_limit == vlm.vocab_limit
    h = eng.submit(ids, px, SamplingParams(max_tokens=12))
    text = "".join(c.text for c in stream_text(h, vlm.tokenizer))
    assert text == vlm.chat(msgs, max_tokens=12)
    assert h.output_ids == vlm.generate_ids(ids, px, max_tokens=12)
    assert len(set(h.output_ids)) > 2


# ---------------------------------------------------------------- the Python API uses the engine
def _msgs(image, text: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
        }
    ]


def test_api_default_engine_matches_reference_and_batches_threads(tiny_dir):
    from PIL import Image

    import fastvlm

    fast = fastvlm.load(tiny_dir, device="cpu")
    slow = fastvlm.load(tiny_dir, device="cpu", engine="reference")
    assert fast.engine_kind == "fast" and slow.engine_kind == "reference"
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green", "white")]
    prompts = ["Hi", "What is this?", "Describe it in detail please.", "Colour?"]
    want = [
        slow.chat(_msgs(im, p), max_tokens=10 + 3 * i)
        for i, (im, p) in enumerate(zip(images, prompts, strict=True))
    ]
    assert slow.backend._engine is None  # the reference path never builds an engine
    assert fast.chat(_msgs(images[0], prompts[0]), max_tokens=10) == want[0]
    got: dict[int, str] = {}
    steps0 = fast.engine.counters["steps"]
    rows0 = fast.engine.counters["decode_rows"]

    def run(i: int) -> None:
        got[i] = fast.chat(_msgs(images[i], prompts[i]), max_tokens=10 + 3 * i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(4)] == want
    c = fast.engine.counters
    # four streams share decode steps: more rows decoded than steps taken
    assert c["decode_rows"] - rows0 > c["steps"] - steps0
    assert fast.last_stats is not None and fast.last_stats.image_tokens == fast.num_image_tokens


def test_api_falls_back_to_reference_beyond_engine_max_len(tiny_dir):
    import fastvlm

    vlm = fastvlm.load(tiny_dir, device="cpu", engine_options={"max_len": 120, "slots": 1})
    msgs = [{"role": "user", "content": "Hello there"}]
    ref_vlm = fastvlm.load(tiny_dir, device="cpu", engine="reference")
    n = len(vlm.encode(msgs)[0])
    assert n + 5 <= 120 < n + 130
    assert vlm.chat(msgs, max_tokens=130) == ref_vlm.chat(msgs, max_tokens=130)  # > max_len
    assert vlm.engine.counters["steps"] == 0  # served by the reference decoder
    assert vlm.chat(msgs, max_tokens=5) == ref_vlm.chat(msgs, max_tokens=5)
    assert vlm.engine.counters["steps"] > 0


def test_api_rejects_unknown_engine(tiny_dir):
    import fastvlm

    with pytest.raises(ValueError, match="engine must be one of"):
        fastvlm.load(tiny_dir, device="cpu", engine="turbo")


@pytest.mark.parametrize("kw", [{"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}])
def test_extreme_sampling_params_do_not_crash(kw):
    from fastvlm.engine.sampling import sample

    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    out = sample(logits, SamplingParams(**kw), g)
    assert out.tolist() == [1]  # both settings collapse to the argmax


# ---------------------------------------------------------------- config / handle boundary
@pytest.mark.parametrize("slots,reuse", [(1, True), (2, False), (3, True)])
def test_engine_config_equals_keyword_options(model, slots, reuse):
    cfg = model.config
    ids = [prompt(cfg, 4 + 3 * i, seed=90 + i) for i in range(3)]
    opts = dict(slots=slots, max_len=MAX_LEN, eos_ids=[], prefix_reuse=reuse)
    by_kw = Engine(model, **opts)
    by_cfg = Engine(model, EngineConfig(**opts))
    assert by_cfg.config == by_kw.config and by_cfg.slots == slots
    a = [by_kw.submit(i, None, params(max_tokens=6)) for i in ids]
    b = [by_cfg.submit(i, None, params(max_tokens=6)) for i in ids]
    by_kw.run_until_done()
    by_cfg.run_until_done()
    assert [h.output_ids for h in a] == [h.output_ids for h in b]
    assert b[0].output_ids == ref(model, ids[0], max_tokens=6)


@pytest.mark.parametrize("bad", [{"slot": 2}, {"config": None, "nope": 1}])
def test_engine_rejects_unknown_options(model, bad):
    with pytest.raises(TypeError):
        Engine(model, **bad)


def test_engine_rejects_config_and_options_together(model):
    with pytest.raises(TypeError, match="not both"):
        Engine(model, EngineConfig(max_len=MAX_LEN), slots=2)


@pytest.mark.parametrize("cancel_at", [None, 0, 2])
def test_finished_requests_leave_no_engine_state(model, cancel_at):
    """Finished, cancelled or not, a request is dropped by the engine; cancelling it afterwards
    is a no-op and the handle keeps its result."""
    eng = engine(model, slots=2)
    h = eng.submit(prompt(model.config, 6, seed=95), None, params(max_tokens=5))
    for _ in range(cancel_at or 0):
        eng.step()
    if cancel_at is not None:
        h.cancel()
    eng.run_until_done()
    out, reason = list(h.output_ids), h.finish_reason
    assert reason == ("length" if cancel_at is None else "cancelled")
    assert not eng._live and not eng.has_work()
    h.cancel()
    eng.step()
    assert h.output_ids == out and h.finish_reason == reason


@pytest.mark.parametrize("use_config", [False, True])
def test_from_vlm_takes_eos_and_vocab_from_the_vlm_unless_given(model, use_config):
    vlm = SimpleNamespace(model=model, eos_ids=[5, 6], vocab_limit=100)
    mk = (lambda **o: Engine.from_vlm(vlm, EngineConfig(**o))) if use_config else (
        lambda **o: Engine.from_vlm(vlm, **o)
    )  # fmt: skip
    e = mk(max_len=MAX_LEN)
    assert e.eos_ids == {5, 6} and e.vocab_limit == 100
    e = mk(max_len=MAX_LEN, eos_ids=[9], vocab_limit=50)
    assert e.eos_ids == {9} and e.vocab_limit == 50
