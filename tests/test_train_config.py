"""`TrainConfig`: the typed run description behind `fastvlm train`. The CLI and a notebook build
the same object; a config built in Python trains without argparse, is checked like the flags,
and is never changed by the run."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastvlm.errors import FastVLMError
from fastvlm.train import loop
from fastvlm.train.args import build_parser, config_from_args
from fastvlm.train.config import TrainConfig


def color_rows(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in ("red", "blue", "green", "white"):
        Image.new("RGB", (40, 30), c).save(folder / f"{c}.png")
        conv = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": c}]
        rows.append({"image": f"{c}.png", "conversations": conv})
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_every_flag_is_a_field_with_the_same_default():
    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert dests == set(fields)
    cli = config_from_args(parser.parse_args(["-o", "out"]))
    assert cli == TrainConfig(output="out")  # every default, field by field


def test_a_python_config_trains_like_the_cli(tmp_path, tiny_dir, monkeypatch):
    data = color_rows(tmp_path / "data")
    common = dict(model=str(tiny_dir), data=data, max_steps=3, batch_size=2, lr=1e-3,
                  device="cpu", quiet=True, freeze=["vision"])  # fmt: skip
    argv = ["--model", str(tiny_dir), "--data", str(data), "--max-steps", "3", "--batch-size",
            "2", "--lr", "1e-3", "--device", "cpu", "--quiet", "--freeze", "vision"]  # fmt: skip
    assert loop.main([*argv, "-o", str(tmp_path / "cli")]) == 0

    def no_argparse(*a, **k):
        raise AssertionError("train(cfg) must not parse a command line")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", no_argparse)
    cfg = TrainConfig(output=tmp_path / "py", **common)
    out = loop.train(cfg)
    assert out == tmp_path / "py"
    assert cfg.warmup is None and cfg.output == tmp_path / "py"  # the caller's object is untouched
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["run_config"]["data"] == str(data)
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(tmp_path / "cli" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in base if k in a)  # it did train


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("batch_size", "8", "--batch-size must be int"),
        ("batch_size", True, "--batch-size must be int"),
        ("lr", "1e-3", "--lr must be float"),
        ("lr", float("nan"), "--lr must be a finite number"),
        ("warmup", 2.5, "--warmup must be int | None"),
        ("freeze", "vision", "--freeze must be list[str]"),
        ("freeze", ["eyes"], "--freeze takes any of"),
        ("lora_targets", [1, 2], "--lora-targets must be a list of names"),
        ("quiet", "yes", "--quiet must be bool"),
        ("shapes_layout", "diagonal", "--shapes-layout takes"),
        ("save_dtype", "int3", "--save-dtype takes"),
        ("model", 3, "--model must be str | None"),
    ],
)
def test_bad_python_values_are_clear_errors(tmp_path, tiny_dir, field, value, words):
    data = color_rows(tmp_path / "data")
    cfg = TrainConfig(output=tmp_path / "o", model=str(tiny_dir), data=str(data))
    setattr(cfg, field, value)
    with pytest.raises(FastVLMError, match=words.replace("|", r"\|").replace("[", r"\[")):
        loop.train(cfg)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_missing_data_is_refused_as_by_the_cli(tmp_path, tiny_dir):
    with pytest.raises(FastVLMError, match="give --data FILE"):
        loop.train(TrainConfig(output=tmp_path / "o", model=str(tiny_dir)))
