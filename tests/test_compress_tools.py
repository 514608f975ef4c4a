"""Compression suite, part 2: distillation (KD beats no teacher, sequence-level cache, torchrun)
and the `fastvlm prune | distill | optimize` command lines (refusals before loading, healing)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_model
from fastvlm.compress import importance, prune
from fastvlm.compress.distill import DistillConfig, distill, kd_loss, write_targets
from fastvlm.errors import FastVLMError
from fastvlm.train.data import IGNORE


# ---------------------------------------------------------------------- distillation
def test_kd_loss_counts_answer_tokens_only():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.full((2, 6), IGNORE)
    assert kd_loss(s, t, labels, 2.0) == 0
    labels[0, 3] = 5
    one = kd_loss(s, t, labels, 2.0)
    t2 = t.clone()
    t2[1] += torch.randn(6, 11)  # a row without answer tokens does not matter
    t2[0, 4:] += 1.0  # nor positions after the answer's predictor
    assert one > 0 and torch.allclose(kd_loss(s, t2, labels, 2.0), one)
    assert torch.allclose(kd_loss(t, t, labels, 2.0), torch.zeros(()), atol=1e-6)


@pytest.fixture(scope="module")
def demo():
    import fastvlm

    return fastvlm.load(None, device="cpu", dtype="float32", engine="reference")


def _heldout_ce(model, vlm, n=16):
    from fastvlm.compress.data import batches, pad_id_of
    from fastvlm.train.shapes_data import shapes_records

    rows = shapes_records(n, 1000, vlm.config.vision.image_size)
    stream = batches(rows, vlm.processor, n, seed=0, pad_id=pad_id_of(vlm.tokenizer))
    b = next(stream)
    with torch.no_grad():
        logits = model(b["input_ids"], b["pixel_values"])
    sl, lb = logits[:, :-1], b["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(sl.reshape(-1, sl.shape[-1]), lb.reshape(-1),
                                             ignore_index=IGNORE).item()  # fmt: skip


def test_distillation_beats_no_teacher_on_a_fixed_budget(demo):
    """Student = the demo model with half its MLP channels and KV groups pruned; 12 steps of 4
    shapes rows, same seed and batches: with the teacher (logit KD at T = 2) vs without (plain
    cross entropy). Judged by held-out cross entropy on the true answers."""
    from fastvlm.train.shapes_data import shapes_records

    teacher = demo.model
    keep = prune.plan(teacher, importance.magnitude_scores(teacher),
                      prune.Ratios(mlp=0.5, heads=0.5))  # fmt: skip
    rows = shapes_records(64, 7, demo.config.vision.image_size)
    results = {}
    for alpha in (0.0, 0.9):
        torch.manual_seed(0)
        student = prune.prune_model(teacher, keep)
        history: list[float] = []
        cfg = DistillConfig(steps=12, batch_size=4, lr=2e-3, warmup=2, alpha=alpha,
                            temperature=2.0, quiet=True)  # fmt: skip
        distill(teacher, student, rows, demo.processor, cfg, history=history)
        results[alpha] = (_heldout_ce(student, demo), history)
    kd_hist = results[0.9][1]
    assert sum(kd_hist[-3:]) / 3 < sum(kd_hist[:3]) / 3  # the distillation loss decreases
    assert results[0.9][0] < 0.95 * results[0.0][0]  # and the student learns more from it


def test_sequence_targets_are_cached_and_resumable(demo, tmp_path):
    from PIL import Image

    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{i}.png")
    images = sorted(tmp_path.glob("*.png"))
    cache = tmp_path / "t" / "targets.jsonl"
    assert write_targets(demo, images[:1], ["Describe this image."], cache, max_tokens=8,
                         progress=False) == 1  # fmt: skip
    with open(cache, "a") as f:
        f.write('{"image": "torn')  # a run killed mid-line
    n = write_targets(demo, images, ["Describe this image.", "How many shapes are there?"],
                      cache, max_tokens=8, progress=False)  # fmt: skip
    assert n == 3
    rows = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(rows) == 4 and len({(r["image"], r["prompt"]) for r in rows}) == 4
    from fastvlm.train.data import load_records

    records, report = load_records(str(cache), None)
    assert len(records) == 4 and not report.bad


def test_distill_command_sequence_level_on_unlabelled_images(tmp_path):
    """--images: the teacher answers each (image, prompt) into the cache, the student trains on
    it, a second run reuses the cache (nothing regenerated)."""
    from PIL import Image

    import fastvlm
    from fastvlm.compress.cli import distill_main

    (tmp_path / "imgs").mkdir()
    for i, colour in enumerate(("red", "green")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / f"{i}.png")
    cache = tmp_path / "targets.jsonl"
    common = ["--teacher", "demo", "--student", "demo", "--images", str(tmp_path / "imgs"),
              "--targets", str(cache), "--max-tokens", "4", "--steps", "1", "--batch-size", "2",
              "--quiet"]  # fmt: skip
    assert distill_main([*common, "-o", str(tmp_path / "s1")]) == 0
    before = cache.read_text()
    assert len(before.splitlines()) == 2
    assert distill_main([*common, "-o", str(tmp_path / "s2")]) == 0
    assert cache.read_text() == before
    assert fastvlm.load(tmp_path / "s1", device="cpu").describe(
        str(tmp_path / "imgs" / "0.png"), max_tokens=2) is not None  # fmt: skip


def test_distill_refuses_a_student_with_another_tokenizer(demo):
    student = make_tiny_model(seed=0)
    with pytest.raises(FastVLMError, match="tokenizer"):
        distill(demo.model, student, [], demo.processor, DistillConfig(steps=1, quiet=True))


# ---------------------------------------------------------------------- command line
def test_prune_command_writes_a_loadable_smaller_model_and_heals(tiny_dir, tmp_path):
    import fastvlm
    from fastvlm.compress.cli import prune_main

    out = tmp_path / "pruned"
    argv = [str(tiny_dir), str(out), "--mlp-ratio", "0.5", "--head-ratio", "0.5", "--importance",
            "gradient", "--calib-shapes", "4", "--calib-batches", "1", "--calib-batch-size", "2",
            "--multiple-of", "8", "--quiet"]  # fmt: skip
    assert prune_main(argv) == 0
    vlm = fastvlm.load(out, device="cpu", dtype="float32")
    t = vlm.config.text
    assert (t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (64, 2, 1)
    before = vlm.model.state_dict()["language_model.layers.0.mlp.up_proj.weight"].clone()
    healed = tmp_path / "healed"
    assert prune_main([str(tiny_dir), str(healed), "--ratio", "0.5", "--importance", "magnitude",
                       "--multiple-of", "8", "--heal-steps", "2", "--heal-shapes", "8",
                       "--heal-batch-size", "2", "--quiet"]) == 0  # fmt: skip
    after = fastvlm.load(healed, device="cpu", dtype="float32").model.state_dict()
    assert after["language_model.layers.0.mlp.up_proj.weight"].shape == before.shape
    assert not torch.equal(after["language_model.layers.0.mlp.up_proj.weight"], before)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("heal-")) == []


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--ratio", "1.5"], "ratio"),
        (["--layer-ratio", "-0.2"], "ratio"),
        (["--heal-steps", "-1"], "heal-steps"),
        (["--multiple-of", "0"], "multiple-of"),
    ],
)
def test_prune_command_refuses_bad_settings_before_loading(tmp_path, argv, match):
    from fastvlm.compress.cli import prune_main

    with pytest.raises(FastVLMError, match=match):
        prune_main(["no-such-model-folder", str(tmp_path / "o"), *argv])


def test_commands_refuse_a_non_empty_output(tiny_dir, tmp_path):
    from fastvlm.compress.cli import optimize_main, prune_main

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep me")
    with pytest.raises(FastVLMError, match="not empty"):
        prune_main([str(tiny_dir), str(tmp_path / "o"), "--ratio", "0.5"])
    with pytest.raises(FastVLMError, match="not empty"):
        optimize_main([str(tiny_dir), str(tmp_path / "o"), "--target-size", "1"])
    assert (tmp_path / "o" / "x").read_text() == "keep me"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--teacher", "demo", "-o", "X", "--shapes", "4"], "student"),
        (["--teacher", "demo", "--student", "a", "--init-config", "b", "-o", "X", "--shapes", "4"],
         "student"),
        (["--teacher", "demo", "--student", "demo", "-o", "X"], "one data source"),
        (["--teacher", "demo", "--student", "demo", "--copy-vision", "-o", "X", "--shapes", "4"],
         "copy-vision"),
        (["--teacher", "demo", "--student", "demo", "-o", "X", "--shapes", "4", "--alpha", "2"],
         "alpha"),
        (["--teacher", "demo", "--student", "demo", "-o", "X", "--shapes", "4",
          "--temperature", "0"], "temperature"),
    ],
)  # fmt: skip
def test_distill_command_refuses_bad_settings(tmp_path, argv, match):
    from fastvlm.compress.cli import distill_main

    argv = [str(tmp_path / "out") if x == "X" else x for x in argv]
    with pytest.raises(FastVLMError, match=match):
        distill_main(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, match",
    [(["--llm", "int3"], "scheme"), (["--prune", "1.0"], "ratio"), (["--target-size", "0"], "size"),
     (["--tokens", "15"], "perfect square")],
)  # fmt: skip
def test_optimize_command_refuses_bad_settings(tmp_path, argv, match):
    from fastvlm.compress.cli import optimize_main

    base = ["demo", str(tmp_path / "o"), "--target-size", "10", "--eval-shapes", "1", "--quiet"]
    with pytest.raises(FastVLMError, match=match):
        optimize_main(base + argv)


@pytest.mark.slow
def test_distill_under_torchrun_matches_one_process(tmp_path, tiny_dir):
    """2 ranks × batch 1 on gloo == 1 process × batch 2: same rows, same summed gradients."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["--teacher", str(tiny_dir), "--student", str(tiny_dir), "--shapes", "8",
              "--steps", "3", "--lr", "1e-3", "--warmup", "1", "--alpha", "0.5",
              "--hidden-weight", "0.5", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    cmd = [*run, "-m", "fastvlm.compress.cli", "distill", *common, "--batch-size", "1",
           "-o", str(ddp)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from fastvlm.compress.cli import distill_main

    assert distill_main([*common, "--batch-size", "2", "-o", str(single)]) == 0
    a = load_file(str(ddp / "model.safetensors"))
    b = load_file(str(single / "model.safetensors"))
    base = load_file(str(tiny_dir / "model.safetensors"))
    moved = max((a[k].float() - base[k].float()).abs().max().item() for k in a)
    gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert moved > 1e-4 and gap < 1e-2 * moved  # Adam amplifies float summation order


def test_distill_trains_weights_but_keeps_batchnorm_statistics(tokenizer):
    from fastvlm.processing import Processor
    from fastvlm.train.shapes_data import shapes_records

    teacher = make_tiny_model(seed=1, vocab_size=tokenizer.get_vocab_size())
    student = make_tiny_model(seed=2, vocab_size=tokenizer.get_vocab_size())
    stats = {k: v.clone() for k, v in student.state_dict().items() if "running_" in k}
    w = student.language_model.layers[0].mlp.up_proj.weight.clone()
    assert stats
    rows = shapes_records(4, 0, teacher.config.vision.image_size)
    cfg = DistillConfig(steps=2, batch_size=2, lr=1e-3, warmup=1, quiet=True)
    distill(teacher, student, rows, Processor(student.config, tokenizer), cfg)
    for k, v in student.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
    assert not torch.equal(student.language_model.layers[0].mlp.up_proj.weight, w)


