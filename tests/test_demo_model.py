"""The shipped tiny model: loads offline with no arguments and describes the examples correctly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastvlm
from fastvlm.hub import DEFAULT_MODEL

ROOT = Path(__file__).parent.parent
EXPECTED = json.loads((ROOT / "examples" / "expected.json").read_text())


@pytest.fixture(scope="module")
def vlm():
    return fastvlm.load()


def test_default_model_is_small_and_offline(vlm):
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    assert vlm.path == DEFAULT_MODEL and vlm.tokenizer is not None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_describes_examples_correctly(vlm, name):
    assert vlm.describe(str(ROOT / "examples" / name)) == EXPECTED[name]["caption"]


def test_answers_questions(vlm):
    img = str(ROOT / "examples" / "shapes3.png")
    assert vlm.describe(img, prompt="How many shapes are there?") == "3"
    assert vlm.describe(img, prompt="What color is the circle?") == "yellow"


def test_readme_main_command_offline():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "fastvlm", "describe", "examples/shapes3.png"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == EXPECTED["shapes3.png"]["caption"]
