"""The `fastvlm` command line: output shape, flag aliases, and one-line errors (no tracebacks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fastvlm
from fastvlm.cli import main


def run_cli(*args: str, stdin: str | None = None, env_extra: dict | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "fastvlm", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(
        path
    )
    return path


def assert_one_line_error(r, pattern: str):
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines and pattern in lines[0], r.stderr


def test_describe_json_matches_python_api(tiny_dir, image):
    r = run_cli("describe", str(image), "--model", str(tiny_dir), "--max-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["image"] == str(image) and row["generation_tokens"] >= 1
    vlm = fastvlm.load(str(tiny_dir))
    assert row["text"] == vlm.describe(str(image), max_tokens=8)
    assert row["image_tokens"] == vlm.num_image_tokens


def test_apple_flag_aliases(tiny_dir, image):
    assert (
        main(
            [
                "describe",
                "--model-path",
                str(tiny_dir),
                "--image-file",
                str(image),
                "--temp",
                "0.7",
                "--top_p",
                "0.9",
                "--seed",
                "3",
                "--max_tokens",
                "4",
            ]
        )
        == 0
    )


def test_missing_image_one_line_error(tiny_dir, tmp_path):
    r = run_cli("describe", str(tmp_path / "missing.png"), "--model", str(tiny_dir))
    assert_one_line_error(r, "image not found")


def test_corrupt_image_does_not_stop_the_others(tiny_dir, image, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    r = run_cli(
        "describe", str(bad), str(image), "--model", str(tiny_dir), "--json", "--max-tokens", "3"
    )
    assert r.returncode == 1
    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert "error" in rows[0] and "text" in rows[1]  # the good image still got its answer


def test_unknown_model_offline(image):
    r = run_cli("describe", str(image), "--model", "nobody/no-such-model-xyz")
    assert_one_line_error(r, "no-such-model-xyz")
    r = run_cli("describe", str(image), "--model", "not a model id!")
    assert_one_line_error(r, "neither a local folder nor a Hugging Face repo id")


def test_broken_checkpoint_and_config(tiny_dir, image):
    (tiny_dir / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(run_cli("describe", str(image), "--model", str(tiny_dir)), "cannot read")
    (tiny_dir / "config.json").write_text('{"model_type": "gpt2"}')
    assert_one_line_error(
        run_cli("describe", str(image), "--model", str(tiny_dir)), "not a FastVLM"
    )


def test_bad_sampling_value(tiny_dir, image):
    assert_one_line_error(
        run_cli("describe", str(image), "--model", str(tiny_dir), "--top-p", "0"), "top_p"
    )


def test_convert_cli(tiny_dir, tmp_path):
    r = run_cli("convert", str(tiny_dir), str(tmp_path / "hf"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "fast_vlm"
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    r = run_cli("convert", str(tiny_dir), str(tmp_path / "hf"), "--to", "hf")
    assert_one_line_error(r, "not empty")


def test_chat_reads_stdin(tiny_dir, image):
    r = run_cli(
        "chat",
        "--model",
        str(tiny_dir),
        "--max-tokens",
        "3",
        stdin=f"/image {image}\nhello\n/image /no/such.png\nagain\n/exit\n",
    )
    assert r.returncode == 0, r.stderr
    assert "attached" in r.stderr and "image not found" in r.stderr
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) <= 2


def test_help_lists_commands():
    r = run_cli("--help")
    for cmd in ("describe", "chat", "download", "convert", "train", "eval"):
        assert cmd in r.stdout
