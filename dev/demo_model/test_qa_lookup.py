"""The look-up guide of qa_lookup_experiments.py (next to this file), which trained the shipped
model's question answering: which question words and which image tokens it tells the decoder to
attend to, checked against scene geometry computed here; and a tiny end-to-end run of its `cache`
and `decoder --guide` steps (CPU, seconds).

Not in the default suite (pyproject `testpaths = ["tests"]`); run it with
`python -m pytest dev/demo_model`. pytest puts this folder (no `__init__.py`) on `sys.path`,
which is how `qa_lookup_experiments` imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import qa_lookup_experiments as Q

import fastvlm
from fastvlm.train import shapes as S
from fastvlm.train.data import Record, encode_record

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.parametrize(
    "q, words",
    [
        ("What color is the small triangle?", ["small", "triangle"]),
        ("What color is the large shape?", ["large"]),
        ("What shape is the small blue one?", ["small", "blue"]),
        ("Is the red shape large or small?", ["red"]),
        ("How many crosses are there?", ["cross"]),
        ("How many green shapes are there?", ["green"]),
        ("How many shapes are there?", None),
        ("Which shape is furthest left?", None),
        ("Is the star left or right of the circle?", None),
    ],
)
def test_referent_words(q, words):
    assert Q.referent(q) == words


@pytest.fixture(scope="module")
def proc():
    return fastvlm.load(device="cpu").processor


def _ids(proc, q, a):
    msgs = [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
    return encode_record(Record([], msgs), proc)["input_ids"].tolist()


def test_guide_targets_match_the_scene_geometry(proc):
    image_token = proc.config.image_token_id
    checked = 0
    for i in range(40):
        rng = S.image_rng(7, i)
        scene = S.sample_scene(rng, 256)
        for qa in S.typed_questions(scene, rng):
            ids = _ids(proc, qa.question, qa.answer)
            tg = Q.guide_targets(scene, qa.question, ids, proc.tokenizer, 4, 256, image_token)
            words = Q.referent(qa.question)
            attrs = [(s, (s.kind, s.color, s.size)) for s in scene.shapes]
            named = [s for s, a in attrs if words and all(w in a for w in words)]
            if not named:  # totals, positions, relations, counts of an absent kind / colour
                assert tg is None
                continue
            hop1, hop2 = tg
            first = ids.index(image_token)
            # hop 1: exactly the question's attribute words, after the image
            got = [proc.tokenizer.decode([ids[p]]).strip() for p in hop1]
            assert [Q._SINGULAR.get(w, w) for w in got] == words and min(hop1) > first + 15
            # hop 2: the 64-px cells (row-major 4x4 image tokens) any named shape's box touches
            cells = {
                r * 4 + c
                for s in named
                for r in range(4)
                for c in range(4)
                if s.bbox[0] < (c + 1) * 64
                and s.bbox[2] >= c * 64
                and s.bbox[1] < (r + 1) * 64
                and s.bbox[3] >= r * 64
            }
            assert {p - first for p in hop2} == cells, (qa.question, [s.bbox for s in named])
            checked += 1
    assert checked > 100


def test_cache_and_guided_decoder_run(tmp_path):
    script = [sys.executable, str(HERE / "qa_lookup_experiments.py")]
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=300)
    for seed, out in ((3, "train.pt"), (1000, "eval.pt")):
        r = subprocess.run(
            [*script, "cache", "--seed", str(seed), "--end", "6", "--out", str(tmp_path / out)],
            **run,
        )
        assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*script, "decoder", "--train", str(tmp_path / "train.pt"), "--eval",
         str(tmp_path / "eval.pt"), "--steps", "50", "--bs", "4", "--guide", "1",
         "--guide-frac", "1", "--pcap", "0", "--neval", "2", "--eval-every", "50",
         "--threads", "1", "--out", str(tmp_path / "model")],
        **run,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    guide = [float(line.split("guide ")[1].split()[0]) for line in r.stdout.splitlines()
             if " guide " in line]  # fmt: skip
    assert guide and all(g == g and g < 50 for g in guide), r.stdout
    assert "eval 50 {" in r.stdout
    assert fastvlm.load(str(tmp_path / "model"), device="cpu").describe(
        S.draw_scene(S.image_rng(1000, 0), 256)[0], max_tokens=4
    )
