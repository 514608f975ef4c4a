"""The shipped tiny model: loads offline with no arguments, runs the README's main command, and
really reads the image: on the shipped examples its captions have the right grammar, the right
shape count and every shape's colour in the right left-to-right order.

It does not meet the project's target (see fastvlm/assets/fastvlm-tiny/README.md): shape kinds
and sizes are at chance, so whole captions are not asserted; these tests check what it does get
right (grammar, counts, colours).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastvlm
from fastvlm.hub import DEFAULT_MODEL

ROOT = Path(__file__).parent.parent
EXPECTED = json.loads((ROOT / "examples" / "expected.json").read_text())
NP = (
    r"an? (small|large) (red|orange|yellow|green|blue|purple) "
    r"(circle|square|triangle|star|diamond|cross)"
)
GRAMMAR = {
    "one": rf"one shape: {NP}\.",
    "two": rf"two shapes: {NP} on the left and {NP} on the right\.",
    "three": rf"three shapes: {NP} on the left, {NP} in the middle and {NP} on the right\.",
    "four": rf"four shapes, from left to right: {NP}, {NP}, {NP} and {NP}\.",
}


@pytest.fixture(scope="module")
def vlm():
    return fastvlm.load()


def test_default_model_is_small_and_offline(vlm):
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    assert vlm.path == DEFAULT_MODEL and vlm.tokenizer is not None
    assert vlm.dtype == fastvlm.api.torch.float32  # stored fp16, computed fp32 on CPU


def colors(caption: str) -> list[str]:
    return re.findall(r"\b(red|orange|yellow|green|blue|purple)\b", caption)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_captions_have_the_right_count_and_colours(vlm, name):
    out = vlm.describe(str(ROOT / "examples" / name))
    truth = EXPECTED[name]["caption"]
    count = truth.split()[0]
    assert out.split()[0] == count, out
    assert re.fullmatch(GRAMMAR[count], out), out
    assert colors(out) == colors(truth), out  # every shape's colour, left to right


def test_counts_and_colours_on_held_out_scenes(vlm):
    """Captions of 20 held-out scenes (data seed 1000): the count and every colour in order."""
    from fastvlm.train.shapes import make_example

    counts = cols = 0
    for i in range(20):
        img, _, rows = make_example(1000, i, 256)
        truth = next(r for r in rows if r["type"] == "caption")["answer"]
        pred = vlm.describe(img, max_tokens=64)
        counts += pred.split()[:1] == truth.split()[:1]
        cols += colors(pred) == colors(truth)
    # measured on 500 held-out images: counts 0.992, colours 0.966 (20/20 and 20/20 here);
    # a blind model gets ~0.3 and ~0.03
    assert counts >= 18 and cols >= 17, (counts, cols)


def test_readme_main_command_offline(vlm):
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
    assert r.stdout.strip() == vlm.describe(str(ROOT / "examples" / "shapes3.png"))
