"""Training pipeline: data parsing + bad-row reports, loss masking, full fine-tuning and LoRA
through the real `fastvlm train` entry point, merge parity, save/load, exact resume, and a
2-process torchrun smoke test. Tiny random models on CPU; a few seconds each."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import has_module, make_tiny_model, tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file

import fastvlm
from fastvlm.errors import FastVLMError
from fastvlm.processing import Processor, render_chat
from fastvlm.train import checkpoint, loop, lora, schedule, setup
from fastvlm.train.args import build_parser, config_from_args
from fastvlm.train.data import (
    IGNORE,
    Record,
    VLMDataset,
    collate,
    encode_record,
    load_records,
)
from fastvlm.weights import load_model

COLORS = {"red": "red", "blue": "it is blue", "green": "a green one", "white": "white, clearly"}


# ---------------------------------------------------------------------- helpers
def png(path: Path, color: str = "red", size: tuple[int, int] = (40, 30)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def color_data(folder: Path) -> Path:
    """Four one-image rows whose answers (of different lengths) name the image's colour."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, answer in COLORS.items():
        png(folder / f"{c}.png", c)
        rows.append({"image": f"{c}.png", "conversations": conv("<image>\nWhat color?", answer)})
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def train(tmp_path: Path, out: str, *args: str, data: Path | None = None, **kw) -> Path:
    """Run `fastvlm train` in-process; returns the output folder."""
    data = data or color_data(tmp_path / "data")
    flags = {"max-steps": 6, "batch-size": 2, "lr": 1e-3, "warmup": 0, "seed": 0, **kw}
    argv = ["--data", str(data), "--output", str(tmp_path / out), "--device", "cpu", "--quiet"]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    assert loop.main([*argv, *args]) == 0
    return tmp_path / out


def logged_losses(stderr: str) -> list[float]:
    return [json.loads(ln)["loss"] for ln in stderr.splitlines() if ln.startswith('{"step"')]


def init_config(tmp_path: Path, tokenizer, train_form: bool = True) -> list[str]:
    """--init-config/--tokenizer flags for a tiny model (vision tower in its unfused train form)."""
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size())
    cfg.vision.inference_mode = not train_form
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    tokenizer.save(str(tmp_path / "tok.json"))
    return ["--init-config", str(tmp_path / "cfg.json"), "--tokenizer", str(tmp_path / "tok.json")]


def sample_inputs(processor: Processor, image: Path) -> tuple[torch.Tensor, torch.Tensor]:
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(image)}, "What color?"]}]
    ids, pixels, _ = processor(msgs)
    return torch.tensor([ids]), pixels


def relative_gap(out_a: Path, out_b: Path, base: Path) -> float:
    """|a - b| / |a - base| over all weights: 0 when two runs took the same steps.

    (Adam turns float-rounding-sized gradient differences into visible ones where a gradient is
    ~0, so elementwise closeness is too strict a test of "the same step".)"""
    a, b, c = (load_file(str(p / "model.safetensors")) for p in (out_a, out_b, base))
    gap = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    return (gap / torch.cat([(a[k] - c[k]).flatten() for k in a]).norm()).item()


def capture_output_model(monkeypatch) -> dict:
    """Spy on `write_output`: keeps a deep copy of the trained model (before any merge)."""
    seen: dict = {}
    real = loop.write_output

    def spy(out, model, *args, **kw):
        seen["model"] = copy.deepcopy(model).eval()
        return real(out, model, *args, **kw)

    monkeypatch.setattr(loop, "write_output", spy)
    return seen


# ---------------------------------------------------------------------- data parsing
def test_jsonl_rows_and_bad_rows_with_line_numbers(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", "blue")
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    ok = conv("<image>\nWhat?", "A red square.")
    lines = [
        json.dumps({"image": "a.png", "conversations": ok}),  # 1 ok
        "",  # 2 blank: not a row
        json.dumps({"image": "missing.png", "conversations": ok}),  # 3
        json.dumps({"image": "junk.png", "conversations": ok}),  # 4
        json.dumps({"image": "a.png", "conversations": conv("no marker", "x")}),  # 5
        '{"image": "a.png", "conversations": [',  # 6 bad JSON
        json.dumps({"image": "a.png", "conversations": conv("<image>\nonly a question")}),  # 7
        json.dumps({"image": "a.png", "conversations": conv("<image>\nQ1", "A1", "Q2", "A2")}),  # 8
        json.dumps(
            {"images": ["a.png", "b.png"], "conversations": conv("<image>\n<image>\nQ", "A")}
        ),
        json.dumps({"conversations": conv("text only?", "yes")}),  # 10
        json.dumps({"image": "a.png", "conversations": conv("Q", "<image> back")}),  # 11
        json.dumps({"image": "a.png", "conversations": [{"from": "robot", "value": "hi"}]}),  # 12
        json.dumps(["not", "an", "object"]),  # 13
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, report = load_records(path)
    bad = dict(report.bad)
    assert report.total == 12  # the blank line is not a row
    assert [r.line for r in records] == [1, 8, 9, 10]
    assert sorted(bad) == [3, 4, 5, 6, 7, 11, 12, 13]
    assert "not found" in bad[3] and "missing.png" in bad[3]
    assert "unreadable image" in bad[4]
    assert "0 <image> markers but 1 images" in bad[5]
    assert "bad JSON" in bad[6]
    assert "no assistant turn" in bad[7]
    assert "only allowed in user" in bad[11]
    assert "unknown speaker" in bad[12]
    assert "not an object" in bad[13]
    assert "4/12 rows usable, 8 skipped (line 3:" in report.summary()
    multi_turn, multi_image, text_only = records[1], records[2], records[3]
    assert [m["role"] for m in multi_turn.messages] == ["user", "assistant"] * 2
    assert multi_image.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert text_only.images == [] and text_only.messages[1]["content"] == "yes"


def test_json_list_reports_the_line_each_row_starts_on(tmp_path):
    png(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "conversations": conv("<image>\nQ", "A")},
        {"image": "gone.png", "conversations": conv("<image>\nQ", "A")},
        {"conversations": conv("Q", "A")},
        {"image": "a.png", "conversations": conv("Q", "A")},
    ]
    text = json.dumps(rows, indent=2)  # pretty-printed: rows span many lines
    path = tmp_path / "d.json"
    path.write_text(text)
    starts = [n for n, ln in enumerate(text.splitlines(), 1) if ln == "  {"]
    assert len(starts) == 4 and starts[0] == 2
    records, report = load_records(path)
    assert [r.line for r in records] == [starts[0], starts[2]]
    assert [n for n, _ in report.bad] == [starts[1], starts[3]]

    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"image": "a.png"},\n  {"image": }\n]')
    with pytest.raises(FastVLMError, match="line 3 column"):
        load_records(broken)
    (tmp_path / "obj.json").write_text('{"image": "a.png"}')
    with pytest.raises(FastVLMError, match="list of rows"):
        load_records(tmp_path / "obj.json")


def test_csv_rows_line_numbers_and_text_only(tmp_path):
    png(tmp_path / "a.png")
    path = tmp_path / "d.csv"
    path.write_text(
        "image,question,answer\n"  # line 1
        "a.png,What color?,red\n"  # 2
        'a.png,"A question\nover two lines",blue\n'  # 3-4
        "nope.png,What?,x\n"  # 5
        "a.png,What?,\n"  # 6 empty answer
        ",Text only?,yes\n"  # 7
    )
    records, report = load_records(path)
    assert [r.line for r in records] == [2, 3, 7]
    assert [n for n, _ in report.bad] == [5, 6]
    assert records[0].messages[0]["content"] == "<image>\nWhat color?"  # marker added
    assert records[2].images == [] and "<image>" not in records[2].messages[0]["content"]
    (tmp_path / "cols.csv").write_text("img,q,a\nx,y,z\n")
    with pytest.raises(FastVLMError, match="image,question,answer"):
        load_records(tmp_path / "cols.csv")


def test_truncated_image_is_skipped_at_run_time(tmp_path, tokenizer):
    png(tmp_path / "ok.png")
    full = png(tmp_path / "big.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])  # valid header, truncated data
    rows = [{"image": n, "conversations": conv("<image>\nQ", "A")} for n in ("ok.png", "cut.png")]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    records, report = load_records(path)
    assert len(records) == 2 and not report.bad  # the header check passes
    proc = Processor(tiny_config(vocab_size=tokenizer.get_vocab_size()), tokenizer)
    ds = VLMDataset(records, proc)
    assert ds[0] is not None and ds[1] is None
    assert list(ds.skipped) == [2]


# ---------------------------------------------------------------------- loss masking
@pytest.mark.parametrize("template", ["apple", "hf"])
def test_labels_cover_only_assistant_replies(tmp_path, tokenizer, template):
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size(), chat_template=template)
    proc = Processor(cfg, tokenizer)
    image = png(tmp_path / "a.png")
    msgs = [
        {"role": "user", "content": "<image>\nDescribe this image."},
        {"role": "assistant", "content": "a small red circle"},
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "one ✓"},
    ]
    ex = encode_record(Record([str(image)], msgs, 1), proc)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    assert len(ids) == len(labels) and ex["pixel_values"].shape == (1, 3, 128, 128)
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE:
            assert lab == i
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    decoded = [tokenizer.decode(r, skip_special_tokens=False) for r in runs]
    lead = "\n" if template == "hf" else ""  # transformers' template puts "\n" before each text
    assert decoded == [f"{lead}a small red circle<|im_end|>", f"{lead}one ✓<|im_end|>"]
    assert ids.count(cfg.image_token_id) == cfg.num_image_tokens
    # Training ids are exactly what inference tokenizes for the same conversation.
    prompt, _ = render_chat(msgs, template, cfg.system_prompt, add_generation_prompt=False)
    assert ids == proc.tokenize(prompt)


def test_collate_pads_and_max_length(tmp_path, tokenizer):
    proc = Processor(tiny_config(vocab_size=tokenizer.get_vocab_size()), tokenizer)
    image = png(tmp_path / "a.png")
    short = Record([], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    long = Record(
        [str(image)],
        [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "x"}],
    )
    a, b = encode_record(short, proc), encode_record(long, proc)
    batch = collate([a, None, b], pad_id=0)
    n = len(a["input_ids"])
    assert batch["input_ids"].shape == (2, len(b["input_ids"]))
    assert (batch["input_ids"][0, n:] == 0).all() and (batch["labels"][0, n:] == IGNORE).all()
    assert batch["pixel_values"].shape[0] == 1
    assert collate([None]) is None
    with pytest.raises(ValueError, match="inside an image"):
        encode_record(long, proc, max_length=20)
    with pytest.raises(ValueError, match="cuts off every assistant reply"):
        encode_record(short, proc, max_length=(a["labels"] != IGNORE).nonzero()[0].item())


# ---------------------------------------------------------------------- training
def test_full_finetune_loss_drops_and_output_loads(tmp_path, tiny_dir, capsys):
    out = train(tmp_path, "out", "--model", str(tiny_dir), "--log-every", "1",
                **{"max-steps": 30, "batch-size": 4})  # fmt: skip
    losses = logged_losses(capsys.readouterr().err)
    assert len(losses) == 30
    assert losses[-1] < 0.3 * losses[0], losses
    vlm = fastvlm.load(str(out), device="cpu")
    base = load_model(tiny_dir)
    changed = [
        k for k, v in vlm.model.state_dict().items() if not torch.equal(v, base.state_dict()[k])
    ]
    assert any(k.startswith("language_model.layers.") for k in changed)
    assert any(k.startswith("vision_tower.") for k in changed)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 30


def test_lora_trains_only_adapters_and_merge_matches_tool(tmp_path, tiny_dir, capsys, monkeypatch):
    seen = capture_output_model(monkeypatch)
    out = train(tmp_path, "out", "--model", str(tiny_dir), "--lora", "--lora-projector", "--merge",
                "--log-every", "1", **{"max-steps": 30, "batch-size": 4, "lr": 1e-2})  # fmt: skip
    losses = logged_losses(capsys.readouterr().err)
    assert losses[-1] < 0.5 * losses[0], losses

    # Only adapters changed: every base tensor (BatchNorm statistics included) is bit-identical.
    trained, base = seen["model"], load_model(tiny_dir)
    state = trained.state_dict()
    base_state = {k.replace(".base.", "."): v for k, v in state.items() if "lora_" not in k}
    ref = base.state_dict()
    assert base_state.keys() == ref.keys()
    assert all(torch.equal(base_state[k], ref[k]) for k in ref), "a base weight changed"
    adapters = lora.lora_layers(trained)
    assert "mm_projector.0" in adapters and "language_model.layers.1.mlp.down_proj" in adapters
    assert all(m.lora_B.abs().sum() > 0 for m in adapters.values())

    # The adapter folder records its settings; `fastvlm lora merge` gives the --merge output.
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["alpha"] == 16 and cfg["include_projector"] is True
    assert cfg["base_model"] == str(tiny_dir.resolve())
    assert not (out / "adapter" / "model.safetensors").exists()
    from fastvlm.cli import main as cli

    assert cli(["lora", "merge", str(tiny_dir), str(out / "adapter"), str(tmp_path / "m2")]) == 0
    a, b = (
        load_file(str(out / "model.safetensors")),
        load_file(str(tmp_path / "m2" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cli(["lora", "merge", str(tiny_dir), str(out / "adapter"), str(tmp_path / "m2")]) == 1

    vlm = fastvlm.load(str(out), device="cpu")
    ids, px = sample_inputs(vlm.processor, tmp_path / "data" / "red.png")
    with torch.no_grad():
        assert torch.allclose(vlm.model(ids, px), trained(ids, px), atol=1e-5)
    assert vlm.describe(str(tmp_path / "data" / "red.png"), "What color?", max_tokens=4)


def test_lora_merge_gives_the_adapter_logits(tmp_path, tokenizer):
    image = png(tmp_path / "a.png", "green")
    model = make_tiny_model(vocab_size=tokenizer.get_vocab_size())
    names = lora.apply_lora(model, r=4, alpha=8, include_projector=True, include_vision=True)
    assert any(n.startswith("vision_tower.") and n.endswith(".qkv") for n in names)
    assert not any(isinstance(model.get_submodule(n), torch.nn.Conv2d) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    proc = Processor(model.config, tokenizer)
    ids, px = sample_inputs(proc, image)
    base = make_tiny_model(vocab_size=tokenizer.get_vocab_size()).eval()
    with torch.no_grad():
        adapted = model.eval()(ids, px)
        assert (adapted - base(ids, px)).abs().max() > 1e-3  # the adapter does something

        # adapter files → a fresh base gives the same model
        lora.save_adapter(tmp_path / "ad", model, lora.LoRAConfig(r=4, alpha=8,
                          include_projector=True, include_vision=True))  # fmt: skip
        fresh = make_tiny_model(vocab_size=tokenizer.get_vocab_size())
        lora.load_adapter(fresh, tmp_path / "ad")
        assert torch.equal(fresh.eval()(ids, px), adapted)

        merged = lora.merge_lora(copy.deepcopy(model))
        assert not lora.lora_layers(merged)
        assert type(merged.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert (merged(ids, px) - adapted).abs().max() <= 1e-5
        checkpoint.save_model(tmp_path / "merged", merged, tokenizer, None)
        vlm = fastvlm.load(str(tmp_path / "merged"), device="cpu")
        assert (vlm.model(ids, px) - adapted).abs().max() <= 1e-5

    other = make_tiny_model(vocab_size=tokenizer.get_vocab_size())
    lora.apply_lora(other, r=2)
    with pytest.raises(FastVLMError, match="another base"):
        lora.load_adapter(other, tmp_path / "ad")  # r=2 layers, r=4 adapter


def test_trained_output_round_trips_through_load(tmp_path, tokenizer, monkeypatch):
    """Train-form vision tower → the output is saved fused and loads with the same logits."""
    seen = capture_output_model(monkeypatch)
    out = train(tmp_path, "out", *init_config(tmp_path, tokenizer), **{"max-steps": 3})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "fastvlm" and cfg["vision"]["inference_mode"] is True
    vlm = fastvlm.load(str(out), device="cpu")
    trained = seen["model"]
    assert not trained.config.vision.inference_mode  # trained unfused, saved fused
    ids, px = sample_inputs(vlm.processor, tmp_path / "data" / "blue.png")
    with torch.no_grad():
        ref, got = trained(ids, px), vlm.model(ids, px)
    assert (got - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    init = setup.build_model(
        config_from_args(build_parser().parse_args([*init_config(tmp_path, tokenizer), "-o", "x"])),
        torch.device("cpu"),
    )[0].eval()
    with torch.no_grad():
        assert (init(ids, px) - ref).abs().max() > 1e-3  # training changed the model


class Crash(Exception):
    pass


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_matches_an_uninterrupted_run(tmp_path, tokenizer, monkeypatch, capsys, mode):
    if mode == "full":  # train-form vision tower: checkpoints must keep it unfused
        args = init_config(tmp_path, tokenizer)
    else:  # LoRA with dropout: the random stream must resume too
        args = [*init_config(tmp_path, tokenizer), "--lora", "--lora-dropout", "0.2",
                "--lora-projector"]  # fmt: skip
    kw = {"max-steps": 6, "save-every": 2, "keep": 5}
    whole = train(tmp_path, "whole", *args, **kw)

    real = loop.save_checkpoint

    def crash_after_first(folder, *a, **k):
        real(folder, *a, **k)
        raise Crash(folder.name)

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_first)
    with pytest.raises(Crash, match="checkpoint-2"):
        train(tmp_path, "crashed", *args, **kw)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert sorted(p.name for p in (tmp_path / "crashed").iterdir()) == ["checkpoint-2"]
    capsys.readouterr()
    resumed = train(tmp_path, "crashed", *args, "--resume", **kw)
    assert "at step 2" in capsys.readouterr().err

    weights = "model.safetensors" if mode == "full" else "adapter/adapter_model.safetensors"
    a, b = load_file(str(whole / weights)), load_file(str(resumed / weights))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    # The optimizer state was restored: the checkpoint written after the resume matches.
    oa = load_file(str(whole / "checkpoint-4" / checkpoint.OPTIMIZER_FILE))
    ob = load_file(str(resumed / "checkpoint-4" / checkpoint.OPTIMIZER_FILE))
    assert oa.keys() == ob.keys() and oa["0.step"].item() == ob["0.step"].item() == 4
    for k in oa:
        assert torch.allclose(oa[k], ob[k], atol=1e-6, rtol=0), k
    if mode == "full":
        ck = json.loads((resumed / "checkpoint-4" / "config.json").read_text())
        assert ck["vision"]["inference_mode"] is False  # exact training state, not fused
        assert fastvlm.load(str(resumed / "checkpoint-4"), device="cpu")  # and still loadable
    else:
        assert (resumed / "checkpoint-4" / "adapter_config.json").exists()
        assert not (resumed / "checkpoint-4" / "model.safetensors").exists()


def test_grad_accum_gives_the_same_step_as_a_bigger_batch(tmp_path, tiny_dir):
    """The loss is normalised over the whole step's tokens (answers differ in length).

    The vision tower is frozen: a training BatchNorm sees per-micro-batch statistics."""
    args = ["--model", str(tiny_dir), "--freeze", "vision"]
    one = train(tmp_path, "one", *args, **{"batch-size": 2, "max-steps": 3})
    two = train(tmp_path, "two", *args, "--grad-accum", "2", **{"batch-size": 1, "max-steps": 3})
    assert relative_gap(one, two, tiny_dir) < 1e-3  # per-micro-batch means: ~0.6


def test_flag_mistakes_are_clear_errors(tmp_path, tiny_dir):
    data = color_data(tmp_path / "data")
    base = ["--model", str(tiny_dir), "--data", str(data), "-o", str(tmp_path / "o")]
    if not (has_module("bitsandbytes") and torch.cuda.is_available()):
        with pytest.raises(FastVLMError, match="QLoRA needs bitsandbytes and a CUDA GPU"):
            loop.main([*base, "--qlora"])
    with pytest.raises(FastVLMError, match="use it with --lora"):
        loop.main([*base, "--merge"])
    with pytest.raises(FastVLMError, match="drop --freeze"):
        loop.main([*base, "--lora", "--freeze", "vision"])
    with pytest.raises(FastVLMError, match="no Linear layer matches"):
        loop.main([*base, "--lora", "--lora-targets", "qkv_proj", "--quiet"])
    full = train(tmp_path, "full", "--model", str(tiny_dir), **{"max-steps": 2, "stop-after": 1})
    assert (full / "checkpoint-1" / checkpoint.OPTIMIZER_FILE).exists()
    with pytest.raises(FastVLMError, match=r"different settings: --lora False → True"):
        train(tmp_path, "full", "--model", str(tiny_dir), "--lora", "--resume",
              **{"max-steps": 2})  # fmt: skip
    with pytest.raises(FastVLMError, match="holds a full model"):  # --force: still not loadable
        train(tmp_path, "full", "--model", str(tiny_dir), "--lora", "--resume", "--force",
              **{"max-steps": 2})  # fmt: skip


# ---------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, tiny_dir):
    """2 ranks × batch 1 on gloo == 1 process × batch 2 (vision frozen, see above); loads."""
    data = color_data(tmp_path / "data")
    common = ["--model", str(tiny_dir), "--data", str(data), "--max-steps", "3", "--lr", "1e-3",
              "--freeze", "vision",
              "--warmup", "0", "--device", "cpu", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ddp = tmp_path / "ddp"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*run, "-m", "fastvlm.train.loop", *common, "--batch-size", "1", "-o", str(ddp)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"trained 3 steps", r.stderr)
    single = train(tmp_path, "single", "--model", str(tiny_dir), "--freeze", "vision", data=data,
                   **{"max-steps": 3})  # fmt: skip
    assert relative_gap(ddp, single, tiny_dir) < 1e-3
    vlm = fastvlm.load(str(ddp), device="cpu")
    assert vlm.describe(str(data.parent / "red.png"), "What color?", max_tokens=3) is not None


def test_stop_after_then_resume_matches_an_uninterrupted_run(tmp_path, tokenizer):
    """`--stop-after` leaves a checkpoint and no output; a resume finishes the same run."""
    args = init_config(tmp_path, tokenizer)
    whole = train(tmp_path, "whole", *args, **{"max-steps": 5})
    staged = train(tmp_path, "staged", *args, **{"max-steps": 5, "stop-after": 3})
    assert sorted(p.name for p in staged.iterdir()) == ["checkpoint-3"]
    staged = train(tmp_path, "staged", *args, "--resume", **{"max-steps": 5})
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(staged / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_loader_workers_give_the_same_run_and_report_bad_rows(tmp_path, tokenizer, capsys):
    """--workers N draws / decodes in N processes: same batches, same order, same weights; a
    row that fails in a worker is still reported (with its line) by the main process."""
    data = color_data(tmp_path / "data")
    good = data.read_text()
    png(tmp_path / "data" / "ok.png")
    full = png(tmp_path / "data" / "big.png", size=(64, 64)).read_bytes()
    (tmp_path / "data" / "cut.png").write_bytes(full[: len(full) // 2])
    bad = json.dumps({"image": "cut.png", "conversations": conv("<image>\nQ", "A")})
    data.write_text(good.rstrip("\n") + "\n" + bad + "\n")
    n_lines = len(data.read_text().splitlines())
    args = init_config(tmp_path, tokenizer)
    kw = {"max-steps": 4, "batch-size": 3}
    inline = train(tmp_path, "inline", *args, data=data, **kw)
    err_inline = capsys.readouterr().err
    pooled = train(tmp_path, "pooled", *args, "--workers", "2", data=data, **kw)
    err_pooled = capsys.readouterr().err
    a = load_file(str(inline / "model.safetensors"))
    b = load_file(str(pooled / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for err in (err_inline, err_pooled):
        assert f"line {n_lines}" in err, err[-500:]


def test_vision_pretrain_learns_and_init_vision_starts_from_it(tmp_path, tokenizer, capsys):
    """Phase 0 of the demo model: the tower alone learns scene attributes (its loss drops), and
    `fastvlm train --init-vision` starts from exactly those weights (train form, BatchNorm)."""
    from fastvlm.train import vision_pretrain

    args = init_config(tmp_path, tokenizer)
    out = tmp_path / "vision.safetensors"
    vision_pretrain.main(["--init-config", str(tmp_path / "cfg.json"), "--out", str(out),
                          "--steps", "16", "--batch-size", "8", "--lr", "3e-3", "--warmup", "2",
                          "--device", "cpu", "--log-every", "1", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    losses = logged_losses(err)
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4]), losses
    assert "held-out exact-set accuracy" in err
    tower = load_file(str(out))
    assert any("rbr_conv" in k for k in tower)  # the multi-branch train form
    run = train(tmp_path, "run", *args, "--init-vision", str(out),
                **{"max-steps": 3, "stop-after": 1, "lr": 0.0})  # fmt: skip
    ck = load_file(str(run / "checkpoint-1" / "model.safetensors"))
    for k, v in tower.items():
        if "running_" not in k and "num_batches" not in k:  # BN statistics move in train mode
            assert torch.equal(ck[f"vision_tower.{k}"], v), k
    with pytest.raises(FastVLMError, match="does not fit"):
        bad = tmp_path / "bad.safetensors"
        save_file({"nope": torch.zeros(1)}, str(bad))
        train(tmp_path, "bad", *args, "--init-vision", str(bad), **{"max-steps": 1})


# ---------------------------------------------------------------------- demo-model options
def test_vision_lr_mult_param_groups():
    """--vision-lr-mult: vision tower + projector get lr × mult, every trainable weight is in
    exactly one group, and the default keeps the two plain decay / no-decay groups."""
    model = make_tiny_model()
    model.language_model.norm.weight.requires_grad_(False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    vision = {id(p) for m in (model.vision_tower, model.mm_projector) for p in m.parameters()}
    plain = schedule.param_groups(model, 0.1)
    assert [(g["weight_decay"], g["lr_mult"]) for g in plain] == [(0.1, 1.0), (0.0, 1.0)]
    groups = schedule.param_groups(model, 0.1, 3.0)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(trainable)  # each once, frozen ones left out
    for g in groups:
        assert all((id(p) in vision) == (g["lr_mult"] == 3.0) for p in g["params"])
        assert all((p.ndim >= 2) == (g["weight_decay"] == 0.1) for p in g["params"])


def test_vision_lr_mult_scales_the_vision_step(tmp_path, tiny_dir, monkeypatch):
    """One SGD-like first Adam step moves each weight by ~lr: the vision side moves mult × more."""
    seen = capture_output_model(monkeypatch)
    base = load_model(tiny_dir)
    moved = {}
    for mult in (1.0, 4.0):
        train(tmp_path, f"m{mult}", "--model", str(tiny_dir), "--freeze", "vision",
              "--vision-lr-mult", str(mult), **{"max-steps": 1, "clip": 0})  # fmt: skip
        model = seen["model"]
        moved[mult] = [
            (a - b).abs().max().item()
            for a, b in (
                (model.mm_projector[0].weight, base.mm_projector[0].weight),
                (model.language_model.layers[0].mlp.up_proj.weight,
                 base.language_model.layers[0].mlp.up_proj.weight),
            )
        ]  # fmt: skip
    (proj1, llm1), (proj4, llm4) = moved[1.0], moved[4.0]
    assert proj4 == pytest.approx(4 * proj1, rel=0.05)
    assert llm4 == pytest.approx(llm1, rel=1e-4)


def test_shapes_max_count_keeps_only_small_scenes():
    """--shapes-max-count: a deterministic selection of the seed's scenes with ≤ k shapes."""
    from fastvlm.train.shapes import image_rng, sample_scene
    from fastvlm.train.shapes_data import shapes_records

    full = shapes_records(30, 5, 64)
    one = shapes_records(6, 5, 64, max_shapes=1)
    assert one.index == shapes_records(6, 5, 64, max_shapes=1).index
    assert one.index == [j for j in range(one.index[-1] + 1)
                         if len(sample_scene(image_rng(5, j), 64).shapes) == 1]  # fmt: skip
    for i, j in enumerate(one.index):
        rec = one[i]
        assert rec.line == j + 1
        if j < len(full):  # the same scene and conversation as in the unfiltered sequence
            assert rec.messages == full[j].messages
        assert any(m["content"].startswith("one shape: ") for m in rec.messages)
    with pytest.raises(ValueError, match="max_shapes"):
        shapes_records(3, 0, 64, max_shapes=0)
