"""Tests of the procedural shapes dataset and its tokenizer (CPU, fast).

Answers and captions are recomputed here independently from the scene geometry (boxes and
centres), with the vocabulary spelled out literally, rather than by calling the code under test.
"""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvlm.train import shapes as S
from fastvlm.train import tokenizer_build as TB

KINDS = {"circle", "square", "triangle", "star", "diamond", "cross"}
PLURAL = {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "stars": "star",
    "diamonds": "diamond",
    "crosses": "cross",
}
COLORS = {"red", "orange", "yellow", "green", "blue", "purple"}
SIZE_WORDS = {"small", "large"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
CAPTION_WORDS = (
    KINDS
    | COLORS
    | SIZE_WORDS
    | set(NUMBERS.values())
    | {"a", "shape", "shapes", "on", "the", "left", "right", "in", "middle", "and", "from", "to"}
)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def scenes(n: int, size: int = 256, seed: int = 0) -> list[S.Scene]:
    return [S.sample_scene(random.Random(f"test:{seed}:{i}"), size) for i in range(n)]


def make_shape(kind: str, color: str, size: str, cx: float, cy: float, r: float) -> S.Shape:
    return S.Shape(
        kind, color, size, cx, cy, (cx - r, cy - r, cx + r, cy + r), 0, 0, r, 0.0, S.COLORS[color]
    )


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------


def test_draw_scene_is_deterministic_and_ignores_global_state() -> None:
    random.seed(1)
    np.random.seed(1)
    img_a, scene_a = S.draw_scene(random.Random(123), 128)
    random.seed(2)
    np.random.seed(2)
    img_b, scene_b = S.draw_scene(random.Random(123), 128)
    assert png_bytes(img_a) == png_bytes(img_b)
    assert scene_a == scene_b and S.caption(scene_a) == S.caption(scene_b)
    assert S.questions(scene_a, random.Random(5)) == S.questions(scene_b, random.Random(5))

    img_c, scene_c = S.draw_scene(random.Random(124), 128)
    assert png_bytes(img_c) != png_bytes(img_a)
    assert scene_c != scene_a


def test_make_dataset_is_deterministic(tmp_path: Path) -> None:
    a = S.make_dataset(tmp_path / "a", 3, seed=5, size=64, progress=False)
    b = S.make_dataset(tmp_path / "b", 3, seed=5, size=64, progress=False)
    c = S.make_dataset(tmp_path / "c", 3, seed=6, size=64, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 3 + 2
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    assert (a / "images/000000.png").read_bytes() != (c / "images/000000.png").read_bytes()


# ------------------------------------------------------------------------------------------
# Layout and rendering
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [256, 128])
def test_shapes_inside_image_and_clearly_separated(size: int) -> None:
    counts = set()
    for scene in scenes(400, size):
        counts.add(len(scene.shapes))
        assert 1 <= len(scene.shapes) <= 4
        for s in scene.shapes:
            x0, y0, x1, y1 = s.bbox
            assert 0 <= x0 < s.cx < x1 <= size and 0 <= y0 < s.cy < y1 <= size
            assert s.kind in KINDS and s.color in COLORS and s.size in SIZE_WORDS
        ordered = sorted(scene.shapes, key=lambda s: s.cx)
        for left, right in zip(ordered, ordered[1:], strict=False):
            # every pair of shapes is horizontally disjoint with a clear gap
            assert right.bbox[0] - left.bbox[2] >= 0.03 * size
        for a in scene.shapes:
            for b in scene.shapes:
                # vertically, two shapes are either clearly apart or overlap: never borderline
                gap = b.bbox[1] - a.bbox[3]
                assert not 0 <= gap < 0.03 * size
    assert counts == {1, 2, 3, 4}


def test_sizes_are_clearly_different() -> None:
    widths: dict[tuple[str, str], list[float]] = {}
    for scene in scenes(600):
        for s in scene.shapes:
            widths.setdefault((s.kind, s.size), []).append(s.bbox[2] - s.bbox[0])
    for kind in KINDS:
        # every small shape is well under any large shape of the same kind
        assert max(widths[kind, "small"]) * 1.3 < min(widths[kind, "large"]), kind


def test_rendering_matches_scene() -> None:
    palette = {name: np.asarray(rgb, dtype=np.float32) for name, rgb in S.COLORS.items()}
    for i in range(30):
        img, scene = S.draw_scene(random.Random(f"render:{i}"), 256 if i % 2 else 128)
        assert img.size == (scene.size, scene.size) and img.mode == "RGB"
        arr = np.asarray(img, dtype=np.float32)
        inside = np.zeros(arr.shape[:2], dtype=bool)
        for s in scene.shapes:
            # the colour at the centre is the shape's colour (nearest palette entry)
            cx, cy = int(s.cx), int(s.cy)
            patch = arr[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
            nearest = min(palette, key=lambda n: float(np.abs(palette[n] - patch).sum()))
            assert nearest == s.color, (i, s)
            # the pixels of that colour fill the box tightly (within 3 px on every side)
            x0, y0, x1, y1 = s.bbox
            X0, Y0 = max(0, int(x0) - 5), max(0, int(y0) - 5)
            sub = arr[Y0 : int(y1) + 6, X0 : int(x1) + 6]
            ys, xs = np.nonzero(np.abs(sub - np.asarray(s.rgb, dtype=np.float32)).max(-1) < 45)
            extent = (xs.min() + X0, ys.min() + Y0, xs.max() + X0 + 1, ys.max() + Y0 + 1)
            assert np.abs(np.subtract(extent, s.bbox)).max() <= 3, (i, s, extent)
            inside[max(0, int(y0) - 2) : int(y1) + 3, max(0, int(x0) - 2) : int(x1) + 3] = True
        # no saturated (shape-coloured) pixel outside the shapes' boxes
        saturation = arr.max(-1) - arr.min(-1)
        assert not (saturation[~inside] > 90).any(), i


# ------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------

NP = r"a (small|large) (\w+) (\w+)"
CAPTION_RE = {
    1: re.compile(rf"one shape: {NP}\."),
    2: re.compile(rf"two shapes: {NP} on the left and {NP} on the right\."),
    3: re.compile(rf"three shapes: {NP} on the left, {NP} in the middle and {NP} on the right\."),
    4: re.compile(rf"four shapes, from left to right: {NP}, {NP}, {NP} and {NP}\."),
}


def test_caption_golden() -> None:
    scene = S.Scene(
        256,
        (  # deliberately not in left-to-right order
            make_shape("star", "blue", "small", 200.0, 60.0, 12.0),
            make_shape("circle", "red", "large", 50.0, 200.0, 22.0),
        ),
        S.Background("solid", (128, 128, 128), (128, 128, 128), 3.0),
    )
    assert S.caption(scene) == (
        "two shapes: a large red circle on the left and a small blue star on the right."
    )


def test_caption_mentions_every_shape_once_left_to_right() -> None:
    for scene in scenes(300):
        cap = S.caption(scene)
        n = len(scene.shapes)
        m = CAPTION_RE[n].fullmatch(cap)
        assert m, cap
        got = [tuple(m.groups()[i : i + 3]) for i in range(0, 3 * n, 3)]
        expected = [(s.size, s.color, s.kind) for s in sorted(scene.shapes, key=lambda s: s.cx)]
        assert got == expected, cap
        assert set(re.findall(r"[a-z]+", cap)) <= CAPTION_WORDS
        # each shape's noun phrase appears exactly as often as such shapes exist
        for s in scene.shapes:
            twins = sum(
                (t.size, t.color, t.kind) == (s.size, s.color, s.kind) for t in scene.shapes
            )
            assert cap.count(f"a {s.size} {s.color} {s.kind}") == twins


# ------------------------------------------------------------------------------------------
# Questions: independent geometric answers
# ------------------------------------------------------------------------------------------


def resolve(scene: S.Scene, phrase: str) -> S.Shape:
    """The unique shape described by e.g. "small blue circle", "red shape", "large one"."""
    *adjs, noun = phrase.split()
    cands = list(scene.shapes)
    if noun in KINDS:
        cands = [s for s in cands if s.kind == noun]
    else:
        assert noun in ("shape", "one"), phrase
    for w in adjs:
        if w in SIZE_WORDS:
            cands = [s for s in cands if s.size == w]
        elif w in COLORS:
            cands = [s for s in cands if s.color == w]
        else:
            raise AssertionError(f"unknown word {w!r} in {phrase!r}")
    assert len(cands) == 1, f"{phrase!r} is ambiguous or empty: {cands}"
    return cands[0]


GAP = 0.03  # fraction of the image side: boxes closer than this are not "clearly" apart


def horizontal(scene: S.Scene, a: S.Shape, b: S.Shape) -> str:
    if b.bbox[0] - a.bbox[2] >= GAP * scene.size:
        return "left"
    if a.bbox[0] - b.bbox[2] >= GAP * scene.size:
        return "right"
    raise AssertionError("shapes not clearly apart horizontally: left/right is ambiguous")


def vertical(scene: S.Scene, a: S.Shape, b: S.Shape) -> str:
    if b.bbox[1] - a.bbox[3] >= GAP * scene.size:
        return "above"
    if a.bbox[1] - b.bbox[3] >= GAP * scene.size:
        return "below"
    raise AssertionError("shapes not clearly apart vertically: above/below is ambiguous")


def extreme(scene: S.Scene, direction: str) -> S.Shape:
    """The one shape that is clearly ``direction`` of every other shape."""
    rel = horizontal if direction in ("left", "right") else vertical

    def beats(s: S.Shape, o: S.Shape) -> bool:
        try:
            return rel(scene, s, o) == direction
        except AssertionError:
            return False

    winners = [s for s in scene.shapes if all(beats(s, o) for o in scene.shapes if o is not s)]
    assert len(winners) == 1, direction
    return winners[0]


def expected_answer(scene: S.Scene, q: str) -> tuple[str, str]:
    """``(type, answer)`` of question ``q`` recomputed from the geometry."""
    shapes = scene.shapes
    if re.fullmatch(r"How many shapes (are there|are in the image|can you see)\?", q):
        return "count", str(len(shapes))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        assert m[1] in COLORS
        return "count", str(sum(s.color == m[1] for s in shapes))
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return "count", str(sum(s.kind == PLURAL[m[1]] for s in shapes))
    if m := re.fullmatch(r"What color is the ([\w ]+)\?", q):
        return "color", resolve(scene, m[1]).color
    if m := re.fullmatch(r"What shape is the ([\w ]+)\?", q):
        assert m[1].endswith(" one")
        return "shape", resolve(scene, m[1]).kind
    if m := re.fullmatch(r"Is the ([\w ]+) large or small\?", q):
        return "size", resolve(scene, m[1]).size
    if m := re.fullmatch(r"Is the ([\w ]+) left or right of the ([\w ]+)\?", q):
        a, b = resolve(scene, m[1]), resolve(scene, m[2])
        assert a is not b
        return "position", horizontal(scene, a, b)
    if m := re.fullmatch(r"Is the ([\w ]+) above or below the ([\w ]+)\?", q):
        a, b = resolve(scene, m[1]), resolve(scene, m[2])
        assert a is not b
        return "position", vertical(scene, a, b)
    extremes = {
        "Which shape is furthest left?": "left",
        "Which shape is furthest right?": "right",
        "Which shape is at the top?": "above",
        "Which shape is at the bottom?": "below",
    }
    if q in extremes:
        return "position", extreme(scene, extremes[q]).kind
    raise AssertionError(f"unrecognised question {q!r}")


def test_every_answer_is_consistent_with_the_scene() -> None:
    seen_types: set[str] = set()
    seen_templates: set[str] = set()
    for i, scene in enumerate(scenes(400)):
        qas = S.typed_questions(scene, random.Random(i))
        assert S.questions(scene, random.Random(i)) == [(q.question, q.answer) for q in qas]
        assert len({q.question for q in qas}) == len(qas)
        for qa in qas:
            typ, answer = expected_answer(scene, qa.question)
            assert (qa.type, qa.answer) == (typ, answer), (qa, S.caption(scene))
            seen_types.add(qa.type)
            seen_templates.add(re.sub(r"\b(the|are) [\w ]+", "_", qa.question))
    assert seen_types == {"count", "color", "shape", "position", "size"}
    assert len(seen_templates) >= 10


def test_ambiguous_references_are_never_used() -> None:
    scene = S.Scene(
        256,
        (
            make_shape("circle", "red", "small", 40.0, 40.0, 12.0),
            make_shape("circle", "red", "large", 128.0, 200.0, 22.0),
            make_shape("star", "blue", "large", 215.0, 40.0, 22.0),
        ),
        S.Background("solid", (128, 128, 128), (128, 128, 128), 3.0),
    )
    asked = set()
    for seed in range(60):
        for q, a in S.questions(scene, random.Random(seed)):
            asked.add(q)
            assert "the circle" not in q and "the red shape" not in q, q
            assert "the red one" not in q, q
            assert expected_answer(scene, q)[1] == a
    # the unique references are used
    assert any("the small" in q for q in asked) and any("the star" in q for q in asked)


def test_relations_need_a_clear_gap() -> None:
    """Positions are asked only about boxes clearly apart (>= 3 % of the side)."""

    def box(kind: str, color: str, x0: float, y0: float, w: float) -> S.Shape:
        r = w / 2
        return make_shape(kind, color, "small", x0 + r, y0 + r, r)

    scene = S.Scene(
        256,
        (
            box("circle", "red", 20, 30, 24),  # red/blue: 4 px apart vertically, x-overlapping
            box("square", "blue", 30, 58, 24),
            box("star", "green", 58, 150, 24),  # 4 px right of the blue square's box
            box("cross", "yellow", 200, 100, 24),  # clearly right of everything
        ),
        S.Background("solid", (128, 128, 128), (128, 128, 128), 3.0),
    )
    asked = set()
    for seed in range(80):
        for q, a in S.questions(scene, random.Random(seed)):
            asked.add(q)
            assert expected_answer(scene, q)[1] == a, q
    assert "Which shape is furthest right?" in asked
    assert "Which shape is furthest left?" not in asked  # red and blue overlap horizontally
    assert any(" left or right of " in q for q in asked)
    assert any(" above or below " in q for q in asked)


def test_single_shape_scene_has_no_relations() -> None:
    for i, scene in enumerate(s for s in scenes(200) if len(s.shapes) == 1):
        for qa in S.typed_questions(scene, random.Random(i)):
            assert qa.type != "position"


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def test_dataset_files_are_well_formed(tmp_path: Path) -> None:
    out = S.make_dataset(tmp_path / "ds", 6, seed=1, size=64, progress=False)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 6
    by_image: dict[str, list[dict]] = {}
    for row in evals:
        assert set(row) == {"id", "image", "question", "answer", "type"}
        assert row["type"] in {"count", "color", "shape", "position", "size", "caption"}
        by_image.setdefault(row["image"], []).append(row)

    for i, row in enumerate(train):
        assert set(row) == {"id", "image", "conversations"}
        assert row["image"] == f"images/{i:06d}.png"
        with Image.open(out / row["image"]) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
        conv = row["conversations"]
        assert 4 <= len(conv) <= 8 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1

        rows = by_image[row["image"]]
        captions = [r for r in rows if r["type"] == "caption"]
        assert len(captions) == 1 and captions[0]["question"] == "Describe this image."
        assert any(r.fullmatch(captions[0]["answer"]) for r in CAPTION_RE.values())
        qa_pairs = {(r["question"], r["answer"]) for r in rows}
        turns = [
            (conv[j]["value"].removeprefix("<image>\n"), conv[j + 1]["value"])
            for j in range(0, len(conv), 2)
        ]
        describe = [t for t in turns if t[0] in S.DESCRIBE_PROMPTS]
        assert len(describe) == 1 and describe[0][1] == captions[0]["answer"]
        for turn in turns:
            if turn not in describe:
                assert turn in qa_pairs
    assert set(by_image) == {r["image"] for r in train}


def test_command_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    assert S.main([str(out), "--n", "2", "--seed", "3", "--size", "64", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert TB.main([str(out), "--vocab-size", "300"]) == 0
    tok = TB.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert 260 <= tok.get_vocab_size() <= 300
    assert tok.token_to_id("<image>") == 3


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts = []
    for i, scene in enumerate(scenes(150, seed=7)):
        conv = [
            {"from": "human", "value": "<image>\nDescribe this image."},
            {"from": "gpt", "value": S.caption(scene)},
        ]
        for q, a in S.questions(scene, random.Random(i)):
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        texts.append(TB.chat_text(conv, eos=True))
    return texts


@pytest.fixture(scope="module")
def tokenizer(corpus: list[str]):  # noqa: ANN201
    return TB.build_tokenizer(corpus, vocab_size=512)


def test_tokenizer_special_ids(tokenizer) -> None:  # noqa: ANN001
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    assert [tokenizer.token_to_id(t) for t in specials] == [0, 1, 2, 3]
    for i, t in enumerate(specials):
        assert tokenizer.encode(t).ids == [i]
        ids = tokenizer.encode(f"ab{t}cd\n{t}").ids
        assert ids.count(i) == 2 and all(j not in ids for j in range(4) if j != i)
    text = "<|im_start|>user\n<image>\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text).ids
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1 and ids.count(3) == 1
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.get_vocab_size() <= 512


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        " leading and trailing spaces  ",
        "line one\nline two\r\n\ttabbed\n\n",
        "Ünïcödé — naïve café, 日本語のテキスト, Ελληνικά, עברית",
        "emoji 🦄🔥 family 👩‍👩‍👧 flags 🇫🇷 skin 👍🏽",
        "control \x00\x01\x7f and odd bytes \ufffd \u200b",
        "two shapes: a large red circle on the left and a small blue star on the right.",
    ],
)
def test_tokenizer_round_trip(tokenizer, text: str) -> None:  # noqa: ANN001
    ids = tokenizer.encode(text).ids
    assert all(i > 3 for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_round_trip_chat(tokenizer, corpus: list[str]) -> None:  # noqa: ANN001
    for text in corpus[:20]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    reloaded = TB.Tokenizer.from_str(tokenizer.to_str())
    assert reloaded.encode(corpus[0]).ids == tokenizer.encode(corpus[0]).ids


def test_tokenizer_learns_the_vocabulary(tokenizer) -> None:  # noqa: ANN001
    cap = (
        "four shapes, from left to right: a small red cross, a large green star, "
        "a small yellow diamond and a large purple triangle."
    )
    ids = tokenizer.encode(cap).ids
    # BPE merged the fixed vocabulary: about one token per word, far fewer than bytes
    assert len(ids) <= len(cap.split()) + 8
    for word in ["circle", "square", "triangle", "star", "diamond", "cross", "purple"]:
        assert len(tokenizer.encode(" " + word).ids) == 1, word


def test_tokenizer_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError):
        TB.build_tokenizer(["abc"], vocab_size=100)


def test_conversation_layouts() -> None:
    """mixed: caption + 1-3 questions; qa-first: questions, then the caption last; separate: the
    caption alone or questions without it. Answers are always the scene's own."""
    seen = {"caption only": 0, "questions only": 0}
    for i in range(60):
        img, _, evs = S.make_example(5, i, 64)
        answers = {e["question"]: e["answer"] for e in evs[1:]}
        cap = evs[0]["answer"]
        for layout in S.LAYOUTS:
            _, row, evs2 = S.make_example(5, i, 64, layout)
            assert evs2 == evs  # the eval rows do not depend on the layout
            turns = row["conversations"]
            assert turns[0]["value"].startswith("<image>\n")
            qa = [(q["value"].removeprefix("<image>\n"), a["value"]) for q, a in
                  zip(turns[::2], turns[1::2], strict=True)]  # fmt: skip
            caps = [k for k, (_, a) in enumerate(qa) if a == cap]
            for q, a in qa:
                assert a == cap or answers[q] == a
            if layout == "mixed":
                assert len(caps) == 1 and 2 <= len(qa) <= 4
            elif layout == "qa-first":
                assert caps == [len(qa) - 1] and len(qa) >= 2
            else:
                assert caps in ([0], []) and (len(qa) == 1 if caps else 1 <= len(qa) <= 4)
                seen["caption only" if caps else "questions only"] += 1
    assert seen["caption only"] >= 10 and seen["questions only"] >= 25
    with pytest.raises(ValueError, match="layout"):
        S.make_example(5, 0, 64, "captions-last")


# examples/README.md: each shipped example is image `index` of data seed 7777, with its caption
SHIPPED_EXAMPLES = {
    "shapes1.png": (1, "one shape: a large blue cross."),
    "shapes2.png": (7, "two shapes: a small green diamond on the left and a small orange diamond "
                       "on the right."),
    "shapes3.png": (0, "three shapes: a small red square on the left, a small yellow circle in "
                       "the middle and a small purple square on the right."),
    "shapes4.png": (11, "four shapes, from left to right: a large red cross, a large red diamond, "
                        "a small purple square and a large orange cross."),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHIPPED_EXAMPLES))
def test_generator_reproduces_the_shipped_examples_exactly(name: str) -> None:
    """The generator's output for a seed never drifts (refactors included): the PNGs in
    examples/ were written by it, so today's pixels and caption must match them exactly."""
    index, want_caption = SHIPPED_EXAMPLES[name]
    img, row, rows = S.make_example(7777, index)
    shipped = Image.open(Path(__file__).parent.parent / "examples" / name).convert("RGB")
    assert img.size == shipped.size and img.tobytes() == shipped.tobytes()
    assert rows[0]["type"] == "caption" and rows[0]["answer"] == want_caption
