"""CUDA checks: the engine (eager and CUDA-graph replay) against the reference decoder on the GPU,
the shipped demo model on GPU vs CPU, quantized layers on CUDA and a few training steps with bf16
autocast. Skipped (cleanly) where no CUDA device exists — i.e. on CI and most developer
machines; run them where a GPU is: `python -m pytest -q -m gpu tests/test_gpu.py`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from conftest import random_pixels as pixels
from conftest import random_prompt as prompt

from fastvlm.engine.engine import Engine
from fastvlm.engine.generate import generate_step
from fastvlm.engine.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3, tie=False).to(CUDA)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def reference(model, ids, px, n):
    return list(generate_step(model, ids, None if px is None else px.to(CUDA), greedy(n)))


REQS = [(5, 1, True, 20), (17, 2, False, 9), (3, 3, False, 30), (40, 4, False, 70)]


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_matches_reference_on_cuda(model, graphs):
    """Batch 1 and 4 concurrent requests of different lengths (one with an image, one crossing
    a span bucket), token for token against the reference decoder; with graphs on, every decode
    step after the first of each shape is a replay."""
    cfg = model.config
    reqs = [(prompt(cfg, n, s, img), pixels(s) if img else None, k) for n, s, img, k in REQS]
    want = [reference(model, ids, px, k) for ids, px, k in reqs]
    eng = Engine(model, slots=4, max_len=160, eos_ids=[], cuda_graphs=graphs)
    assert (eng.graphs is not None) == graphs
    one = eng.submit(reqs[0][0], reqs[0][1], greedy(reqs[0][2])).result()
    assert one == want[0]
    hs = [eng.submit(ids, px, greedy(k)) for ids, px, k in reqs]
    eng.run_until_done()
    assert [h.result() for h in hs] == want
    if graphs:
        st = eng.graphs.stats()
        assert st["disabled_reason"] is None, st
        assert st["captures"] >= 2 and st["replays"] > 3 * st["captures"], st


def test_graph_replay_after_slot_reuse(model):
    """A slot freed and reused by a new request replays the same graph with new inputs."""
    cfg = model.config
    eng = Engine(model, slots=2, max_len=160, eos_ids=[], prefix_reuse=False)
    for seed in (7, 8, 9):
        ids = prompt(cfg, 6 + seed, seed)
        assert eng.submit(ids, None, greedy(12)).result() == reference(model, ids, None, 12)
    assert eng.graphs.stats()["replays"] > 0


def test_bf16_engine_runs_and_mostly_agrees_with_fp32(model):
    """bf16 on the GPU: finite logits, same first greedy tokens as fp32 on a tiny model."""
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = prompt(model.config, 12, 5, image=True)
    px = pixels(5)
    a = Engine(model, slots=1, max_len=160, eos_ids=[]).submit(ids, px, greedy(8)).result()
    b = Engine(m16, slots=1, max_len=160, eos_ids=[]).submit(ids, px, greedy(8)).result()
    assert len(b) == 8 and a[:2] == b[:2]


def test_demo_model_same_answer_on_gpu_and_cpu():
    import fastvlm

    img = "examples/shapes3.png"
    cpu = fastvlm.load(device="cpu").describe(img, max_tokens=48)
    gpu = fastvlm.load(device="cuda", dtype="float32").describe(img, max_tokens=48)
    assert gpu == cpu


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_quantized_layers_on_cuda(spec):
    from fastvlm.quant import quantize_model

    m = make_tiny_model(seed=1)
    q = copy.deepcopy(m)
    quantize_model(q, spec)
    ids = torch.tensor([prompt(m.config, 10, 1)])
    with torch.inference_mode():
        want = q(ids)  # CPU result of the same quantized weights
        got = q.to(CUDA)(ids.to(CUDA)).cpu()
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3)


def test_training_steps_on_cuda(tmp_path, tokenizer, capsys):
    """A few full fine-tune steps on the GPU (bf16 autocast): the loss drops, output loads."""
    import json

    from conftest import tiny_config

    import fastvlm
    from fastvlm.train import loop

    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size())
    cfg.vision.inference_mode = False
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    tokenizer.save(str(tmp_path / "tok.json"))
    out = tmp_path / "out"
    argv = ["--init-config", str(tmp_path / "cfg.json"), "--tokenizer", str(tmp_path / "tok.json"),
            "--shapes", "64", "--output", str(out), "--device", "cuda", "--max-steps", "12",
            "--batch-size", "8", "--lr", "2e-3", "--warmup", "0", "--log-every", "1", "--quiet",
            "--workers", "2"]  # fmt: skip
    assert loop.main(argv) == 0
    err = capsys.readouterr().err
    losses = [json.loads(ln)["loss"] for ln in err.splitlines() if ln.startswith('{"step"')]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 1.5, losses  # ≥ 0.5 nats
    vlm = fastvlm.load(str(out), device="cuda")
    assert vlm.device.type == "cuda"
