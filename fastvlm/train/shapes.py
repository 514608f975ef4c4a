"""Procedurally generated "shapes" scenes: the training data of the tiny FastVLM this package ships.

Job
---
The package ships a small FastVLM that it trains itself, offline, so that
``fastvlm describe examples/<image>.png`` gives a correct answer without downloading anything.
This module produces its data: images of 1-4 coloured shapes, a canonical caption for each, and
short question/answer pairs whose answers are unique, so that accuracy can be measured by exact
string match.

Design
------
* **Deterministic.** Everything is drawn from an explicit ``random.Random`` (numpy noise from a
  ``numpy.random.Generator`` seeded from it); no global random state is touched. Image ``i`` of
  a dataset uses its own generator seeded by ``(seed, i)``, so one image can be regenerated
  without the others and the same ``(seed, n, size)`` always gives identical bytes.
* **Small closed vocabulary.** Six shape kinds (:data:`KINDS`), six saturated colours
  (:data:`COLORS`) and two sizes (:data:`SIZES`), all chosen to stay distinguishable after
  downscaling and noise.
* **Unambiguous layout.** The width is split into ``n`` equal columns for ``n`` shapes, one
  shape per column, and the height into three rows; each shape lies inside its cell with a
  margin, so shapes never overlap, left-to-right order is always strict, and "above/below" is
  asked only about shapes in different rows (whose boxes are then vertically disjoint). The
  jitter inside a cell is bounded so that neighbours stay clearly apart.
* **Sizes.** "small" and "large" differ by a factor of about 1.9 in radius, with only +-6 %
  variation inside a class, so the two never come close.
* **Backgrounds** are desaturated (tinted greys, solid or gentle linear gradients) so they are
  never confused with a palette colour, plus mild Gaussian pixel noise. Shapes are drawn with
  4x supersampling (anti-aliased edges) and may be rotated by at most 10 degrees (never enough
  to turn a square into a diamond or a cross into an x).
* **Caption grammar** (:func:`caption`), shapes left to right, ``NP = "a <size> <color> <kind>"``::

      one shape: NP.
      two shapes: NP on the left and NP on the right.
      three shapes: NP on the left, NP in the middle and NP on the right.
      four shapes, from left to right: NP, NP, NP and NP.

* **Questions** (:func:`typed_questions`) are asked only when their answer is unique: shapes are
  referred to by the smallest set of attributes that picks out exactly one shape ("the star",
  "the red shape", "the small blue one", ...). Answers are a digit, a colour, a kind, a size
  word, or ``left``/``right``/``above``/``below``.

Output of :func:`make_dataset` (``python -m fastvlm.train.shapes OUT --n 1000 --seed 0``)::

    OUT/images/000000.png ...
    OUT/train.jsonl   LLaVA-style rows {"id", "image", "conversations": [{"from", "value"}, ...]}
    OUT/eval.jsonl    rows {"id", "image", "question", "answer", "type"}, one "caption" row per
                      image (prompt DESCRIBE_PROMPT) followed by all its question rows
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 165, 55),
    "blue": (35, 85, 220),
    "purple": (140, 55, 185),
}
SIZES: tuple[str, ...] = ("small", "large")
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
MAX_SHAPES = 4
QUESTION_TYPES: tuple[str, ...] = ("count", "color", "shape", "position", "size")
EVAL_TYPES: tuple[str, ...] = (*QUESTION_TYPES, "caption")

# The canonical describe prompt (used by the eval file) comes first.
DESCRIBE_PROMPTS: tuple[str, ...] = (
    "Describe this image.",
    "What is in this picture?",
    "Describe the image.",
    "What do you see in this image?",
    "Describe the shapes in this picture.",
    "What does this image show?",
)
DESCRIBE_PROMPT = DESCRIBE_PROMPTS[0]
IMAGE_TOKEN = "<image>"

# --------------------------------------------------------------------------------------------
# Geometry constants (fractions of the image side)
# --------------------------------------------------------------------------------------------

_RADIUS = {"small": 0.052, "large": 0.088}  # nominal radius of each size class
_RADIUS_JITTER = 0.06  # relative, uniform +-
_MAX_ROTATION = 10.0  # degrees, uniform +-
_GRID_ROWS = 3
_CELL_MARGIN = 0.016  # minimum gap between a shape's box and its cell's border
# Position questions need this gap between boxes; shapes in different layout columns/rows always
# have it (2 * _CELL_MARGIN); shapes in the same row always overlap vertically.
_RELATION_GAP = 0.03
# Max centre offset from the cell's centre, as a fraction of the cell's width / height. The
# vertical one is small enough that two shapes of one row always overlap vertically, so
# "above/below" is either clear (different rows) or plainly not the case (same row).
_CELL_JITTER_X = 0.2
_CELL_JITTER_Y = 0.12
_SUPERSAMPLE = 4
_COLOR_JITTER = 12  # per-channel uniform +- on the palette colour


@dataclass(frozen=True)
class Shape:
    """One shape of a scene; coordinates are in pixels of the final image (x right, y down)."""

    kind: str
    color: str
    size: str
    cx: float
    cy: float
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 (tight, continuous coordinates)
    col: int  # layout column (0 = leftmost); equals the left-to-right rank
    row: int  # layout row (0 = top)
    radius: float
    rotation: float  # degrees, counter-clockwise
    rgb: tuple[int, int, int]  # the exact fill colour drawn

    @property
    def phrase(self) -> str:
        """``"<size> <color> <kind>"``, e.g. ``"large red circle"``."""
        return f"{self.size} {self.color} {self.kind}"


@dataclass(frozen=True)
class Background:
    """A tinted-grey background: solid (``mode="solid"``) or a linear gradient."""

    mode: str  # "solid" | "horizontal" | "vertical" | "diagonal"
    start: tuple[int, int, int]
    end: tuple[int, int, int]
    noise_sigma: float


@dataclass(frozen=True)
class Scene:
    """Everything drawn in one image; ``shapes`` are sorted left to right."""

    size: int
    shapes: tuple[Shape, ...]
    background: Background

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "background": {
                "mode": self.background.mode,
                "start": list(self.background.start),
                "end": list(self.background.end),
                "noise_sigma": self.background.noise_sigma,
            },
            "shapes": [
                {
                    "kind": s.kind,
                    "color": s.color,
                    "size": s.size,
                    "cx": s.cx,
                    "cy": s.cy,
                    "bbox": list(s.bbox),
                    "col": s.col,
                    "row": s.row,
                    "radius": s.radius,
                    "rotation": s.rotation,
                    "rgb": list(s.rgb),
                }
                for s in self.shapes
            ],
        }


class QA(NamedTuple):
    """A question, its unique answer, and its type (one of :data:`QUESTION_TYPES`)."""

    question: str
    answer: str
    type: str


# --------------------------------------------------------------------------------------------
# Shape outlines
# --------------------------------------------------------------------------------------------


def _outline(kind: str, r: float, rotation: float) -> list[tuple[float, float]]:
    """Polygon vertices around the origin (y down) of a shape of nominal radius ``r``.

    Circles are returned as a 64-gon (only used for the bounding box; they are drawn as ellipses).
    """
    if kind == "circle":
        pts = [
            (r * math.cos(2 * math.pi * i / 64), r * math.sin(2 * math.pi * i / 64))
            for i in range(64)
        ]
    elif kind == "square":
        h = 0.88 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif kind == "triangle":
        R = 1.2 * r  # circumradius; centroid at the origin, apex up
        pts = [
            (R * math.cos(math.radians(a)), R * math.sin(math.radians(a)))
            for a in (-90.0, 30.0, 150.0)
        ]
    elif kind == "star":
        R, inner = 1.2 * r, 0.5 * 1.2 * r
        pts = []
        for i in range(10):
            rad = R if i % 2 == 0 else inner
            a = math.radians(-90.0 + 36.0 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif kind == "diamond":
        h, w = 1.1 * r, 0.75 * r
        pts = [(0.0, -h), (w, 0.0), (0.0, h), (-w, 0.0)]
    elif kind == "cross":
        L, t = 0.95 * r, 0.34 * r
        pts = [
            (-t, -L),
            (t, -L),
            (t, -t),
            (L, -t),
            (L, t),
            (t, t),
            (t, L),
            (-t, L),
            (-t, t),
            (-L, t),
            (-L, -t),
            (-t, -t),
        ]
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    if rotation and kind != "circle":
        c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        # counter-clockwise on screen (y points down)
        pts = [(x * c + y * s, -x * s + y * c) for x, y in pts]
    return pts


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _as_rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _sample_background(rng: random.Random) -> Background:
    def tinted(level: float) -> tuple[int, int, int]:
        tint = [rng.uniform(-14, 14) for _ in range(3)]
        return tuple(int(round(min(255.0, max(0.0, level + t)))) for t in tint)  # type: ignore[return-value]

    level = rng.choice((rng.uniform(25, 85), rng.uniform(100, 160), rng.uniform(175, 235)))
    mode = rng.choice(("solid", "solid", "horizontal", "vertical", "diagonal"))
    start = tinted(level)
    if mode == "solid":
        end = start
    else:
        end = tinted(min(240.0, max(20.0, level + rng.choice((-1, 1)) * rng.uniform(20, 55))))
    return Background(mode, start, end, round(rng.uniform(2.0, 7.0), 2))


def sample_scene(rng: random.Random | int, size: int = 256) -> Scene:
    """Sample the contents and layout of a scene (no rendering)."""
    rng = _as_rng(rng)
    if size < 32:
        raise ValueError(f"image size must be >= 32, got {size}")
    n = rng.randint(1, MAX_SHAPES)
    rows = [rng.randrange(_GRID_ROWS) for _ in range(n)]
    cell_w, cell_h = size / n, size / _GRID_ROWS
    margin = _CELL_MARGIN * size
    shapes: list[Shape] = []
    for col in range(n):
        kind = rng.choice(KINDS)
        color = rng.choice(tuple(COLORS))
        size_word = rng.choice(SIZES)
        radius = _RADIUS[size_word] * size * rng.uniform(1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER)
        rotation = 0.0 if kind == "circle" else rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
        pts = _outline(kind, radius, rotation)
        lx0, lx1 = min(p[0] for p in pts), max(p[0] for p in pts)
        ly0, ly1 = min(p[1] for p in pts), max(p[1] for p in pts)
        row = rows[col]
        cx = _place(
            rng, col * cell_w, (col + 1) * cell_w, lx0, lx1, margin, _CELL_JITTER_X * cell_w
        )
        cy = _place(
            rng, row * cell_h, (row + 1) * cell_h, ly0, ly1, margin, _CELL_JITTER_Y * cell_h
        )
        base = COLORS[color]
        rgb = tuple(min(255, max(0, c + rng.randint(-_COLOR_JITTER, _COLOR_JITTER))) for c in base)
        shapes.append(
            Shape(
                kind=kind,
                color=color,
                size=size_word,
                cx=round(cx, 3),
                cy=round(cy, 3),
                bbox=(
                    round(cx + lx0, 3),
                    round(cy + ly0, 3),
                    round(cx + lx1, 3),
                    round(cy + ly1, 3),
                ),
                col=col,
                row=row,
                radius=round(radius, 3),
                rotation=round(rotation, 3),
                rgb=rgb,  # type: ignore[arg-type]
            )
        )
    return Scene(size=size, shapes=tuple(shapes), background=_sample_background(rng))


def _place(
    rng: random.Random, lo: float, hi: float, e0: float, e1: float, margin: float, jitter: float
) -> float:
    """A centre in ``[lo, hi]`` such that ``[c + e0, c + e1]`` keeps ``margin`` to both ends."""
    cmin, cmax = lo + margin - e0, hi - margin - e1
    if cmin > cmax:  # cannot happen with the constants above; fail loudly if they are changed
        raise ValueError("shape does not fit its layout cell")
    mid = 0.5 * (cmin + cmax)
    half = min(0.5 * (cmax - cmin), jitter)
    return rng.uniform(mid - half, mid + half)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _background_array(bg: Background, size: int) -> np.ndarray:
    start = np.asarray(bg.start, dtype=np.float32)
    end = np.asarray(bg.end, dtype=np.float32)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    if bg.mode == "solid":
        t = np.zeros((size, size), dtype=np.float32)
    elif bg.mode == "horizontal":
        t = np.broadcast_to(coords[None, :], (size, size))
    elif bg.mode == "vertical":
        t = np.broadcast_to(coords[:, None], (size, size))
    elif bg.mode == "diagonal":
        t = 0.5 * (coords[None, :] + coords[:, None])
    else:
        raise ValueError(f"unknown background mode {bg.mode!r}")
    return start + (end - start) * t[..., None]


def render_scene(scene: Scene, rng: random.Random | int) -> Image.Image:
    """Draw ``scene`` as an RGB image; ``rng`` only seeds the pixel noise."""
    rng = _as_rng(rng)
    size, ss = scene.size, _SUPERSAMPLE
    img = _background_array(scene.background, size)
    for s in scene.shapes:
        x0, y0 = max(0, math.floor(s.bbox[0]) - 1), max(0, math.floor(s.bbox[1]) - 1)
        x1, y1 = min(size, math.ceil(s.bbox[2]) + 1), min(size, math.ceil(s.bbox[3]) + 1)
        w, h = x1 - x0, y1 - y0
        mask = Image.new("L", (w * ss, h * ss), 0)
        draw = ImageDraw.Draw(mask)
        ox, oy = (s.cx - x0) * ss, (s.cy - y0) * ss
        if s.kind == "circle":
            r = s.radius * ss
            draw.ellipse((ox - r, oy - r, ox + r, oy + r), fill=255)
        else:
            pts = _outline(s.kind, s.radius, s.rotation)
            draw.polygon([(ox + x * ss, oy + y * ss) for x, y in pts], fill=255)
        alpha = np.asarray(mask.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
        region = img[y0:y1, x0:x1]
        color = np.asarray(s.rgb, dtype=np.float32)
        img[y0:y1, x0:x1] = region + (color - region) * alpha[..., None]
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    img = img + noise_rng.normal(0.0, scene.background.noise_sigma, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def draw_scene(rng: random.Random | int, size: int = 256) -> tuple[Image.Image, Scene]:
    """Sample a scene of 1-4 shapes and render it at ``size`` x ``size`` pixels."""
    rng = _as_rng(rng)
    scene = sample_scene(rng, size)
    return render_scene(scene, rng), scene


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    """The canonical description of ``scene``; see the module docstring for the grammar."""
    shapes = sorted(scene.shapes, key=lambda s: s.cx)
    nps = [f"a {s.phrase}" for s in shapes]
    n = len(nps)
    if n == 1:
        return f"one shape: {nps[0]}."
    if n == 2:
        return f"two shapes: {nps[0]} on the left and {nps[1]} on the right."
    if n == 3:
        return (
            f"three shapes: {nps[0]} on the left, {nps[1]} in the middle and {nps[2]} on the right."
        )
    if n == 4:
        return f"four shapes, from left to right: {nps[0]}, {nps[1]}, {nps[2]} and {nps[3]}."
    raise ValueError(f"a scene has 1-{MAX_SHAPES} shapes, got {n}")


# Attribute subsets used to refer to a shape, smallest first.
_REF_ATTRS: tuple[tuple[str, ...], ...] = (
    ("kind",),
    ("color",),
    ("size",),
    ("size", "kind"),
    ("color", "kind"),
    ("size", "color"),
    ("size", "color", "kind"),
)


def _matches(s: Shape, attrs: Sequence[str], target: Shape) -> bool:
    return all(getattr(s, a) == getattr(target, a) for a in attrs)


def _ref_options(scene: Scene, target: Shape, exclude: str = "") -> list[tuple[str, ...]]:
    """Minimal attribute sets (not using ``exclude``) that pick out ``target`` uniquely."""
    found: list[tuple[str, ...]] = []
    for attrs in _REF_ATTRS:
        if exclude in attrs or (found and len(attrs) > len(found[0])):
            continue
        if sum(_matches(s, attrs, target) for s in scene.shapes) == 1:
            found.append(attrs)
    return found


def _adjectives(target: Shape, attrs: Sequence[str]) -> list[str]:
    return [getattr(target, a) for a in ("size", "color") if a in attrs]


def _noun_phrase(target: Shape, attrs: Sequence[str]) -> str:
    """``"the red shape"``, ``"the star"``, ``"the small blue circle"``..."""
    noun = target.kind if "kind" in attrs else "shape"
    return " ".join(["the", *_adjectives(target, attrs), noun])


def typed_questions(scene: Scene, rng: random.Random | int) -> list[QA]:
    """Questions about ``scene`` whose answers are unique, at most one per family.

    Families: total count, count of one kind or colour (answer may be ``0``), colour of a
    shape, kind of a shape, size of a shape, the leftmost/rightmost/highest/lowest shape
    (answer: its kind), left/right of a pair, above/below of a pair. Positions come from the
    boxes: a relation is asked only when the boxes are apart by ``_RELATION_GAP * size``.
    """
    rng = _as_rng(rng)
    shapes = sorted(scene.shapes, key=lambda s: s.cx)
    n = len(shapes)
    out: list[QA] = []

    # count
    q = rng.choice(
        (
            "How many shapes are there?",
            "How many shapes are in the image?",
            "How many shapes can you see?",
        )
    )
    out.append(QA(q, str(n), "count"))
    if rng.random() < 0.5:
        kind = rng.choice([s.kind for s in shapes] if rng.random() < 0.75 else list(KINDS))
        out.append(
            QA(
                f"How many {PLURALS[kind]} are there?",
                str(sum(s.kind == kind for s in shapes)),
                "count",
            )
        )
    else:
        color = rng.choice([s.color for s in shapes] if rng.random() < 0.75 else list(COLORS))
        out.append(
            QA(
                f"How many {color} shapes are there?",
                str(sum(s.color == color for s in shapes)),
                "count",
            )
        )

    # colour / shape / size of a uniquely identifiable shape
    for attr in ("color", "kind", "size"):
        cands = [(s, opts) for s in shapes if (opts := _ref_options(scene, s, exclude=attr))]
        if not cands:
            continue
        target, opts = rng.choice(cands)
        attrs = rng.choice(opts)
        if attr == "color":
            out.append(QA(f"What color is {_noun_phrase(target, attrs)}?", target.color, "color"))
        elif attr == "kind":
            desc = " ".join(["the", *_adjectives(target, attrs), "one"])
            out.append(QA(f"What shape is {desc}?", target.kind, "shape"))
        else:
            out.append(QA(f"Is {_noun_phrase(target, attrs)} large or small?", target.size, "size"))

    # positions, from the geometry: only relations with a clear gap between the boxes
    gap = _RELATION_GAP * scene.size
    relations = {
        "left": lambda a, b: b.bbox[0] - a.bbox[2] >= gap,
        "right": lambda a, b: a.bbox[0] - b.bbox[2] >= gap,
        "above": lambda a, b: b.bbox[1] - a.bbox[3] >= gap,
        "below": lambda a, b: a.bbox[1] - b.bbox[3] >= gap,
    }
    if n >= 2:
        extremes = []
        for rel, q in (
            ("left", "Which shape is furthest left?"),
            ("right", "Which shape is furthest right?"),
            ("above", "Which shape is at the top?"),
            ("below", "Which shape is at the bottom?"),
        ):
            for s in shapes:
                if all(relations[rel](s, o) for o in shapes if o is not s):
                    extremes.append(QA(q, s.kind, "position"))
        if extremes:
            out.append(rng.choice(extremes))

        # relations between two uniquely identifiable shapes
        refs = {id(s): opts for s in shapes if (opts := _ref_options(scene, s))}
        named = [s for s in shapes if id(s) in refs]
        pairs = [(a, b) for a in named for b in named if a is not b]
        for rels in (("left", "right"), ("above", "below")):
            clear = [(a, b, r) for a, b in pairs for r in rels if relations[r](a, b)]
            if clear:
                a, b, r = rng.choice(clear)
                ra, rb = (_noun_phrase(s, rng.choice(refs[id(s)])) for s in (a, b))
                verb = "left or right of" if r in ("left", "right") else "above or below"
                out.append(QA(f"Is {ra} {verb} {rb}?", r, "position"))
    return out


def questions(scene: Scene, rng: random.Random | int) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs with unique answers; see :func:`typed_questions`."""
    return [(qa.question, qa.answer) for qa in typed_questions(scene, rng)]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def image_rng(seed: int, index: int) -> random.Random:
    """The generator of image ``index`` of the dataset with ``seed``."""
    return random.Random(f"fastvlm-shapes:{seed}:{index}")


LAYOUTS = ("mixed", "qa-first", "separate")


def make_example(
    seed: int, index: int, size: int = 256, layout: str = "mixed"
) -> tuple[Image.Image, dict, list[dict]]:
    """Image ``index`` of dataset ``seed``: ``(image, train row, eval rows)``.

    ``layout`` arranges the training conversation:

    * ``"mixed"``: the caption and 1-3 questions, the caption first in 60 % of rows (phases 1-2
      of the shipped model);
    * ``"qa-first"``: up to 5 questions *before* the caption;
    * ``"separate"``: a third of the rows are the caption alone, the others 1-4 questions and no
      caption, so every answer must come from the image (as in ``fastvlm eval``, which asks each
      question on its own), never copied from a caption earlier in the context.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rng = image_rng(seed, index)
    img, scene = draw_scene(rng, size)
    qas = typed_questions(scene, rng)
    cap = caption(scene)
    rel = f"images/{index:06d}.png"
    ident = f"shapes-{seed}-{index:06d}"

    if layout == "qa-first":
        turns = [(qa.question, qa.answer) for qa in rng.sample(qas, min(5, len(qas)))]
        turns.append((rng.choice(DESCRIBE_PROMPTS), cap))
    elif layout == "separate":
        if rng.random() < 1 / 3:
            turns = [(rng.choice(DESCRIBE_PROMPTS), cap)]
        else:
            chosen = rng.sample(qas, rng.randint(1, min(4, len(qas))))
            turns = [(qa.question, qa.answer) for qa in chosen]
    else:
        chosen = rng.sample(qas, rng.randint(1, min(3, len(qas))))
        turns = [(qa.question, qa.answer) for qa in chosen]
        pos = 0 if rng.random() < 0.6 else rng.randint(0, len(turns))
        turns.insert(pos, (rng.choice(DESCRIBE_PROMPTS), cap))
    conversations: list[dict[str, str]] = []
    for i, (q, a) in enumerate(turns):
        conversations.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q})
        conversations.append({"from": "gpt", "value": a})
    train_row = {"id": ident, "image": rel, "conversations": conversations}

    eval_rows = [
        {"id": ident, "image": rel, "question": DESCRIBE_PROMPT, "answer": cap, "type": "caption"}
    ]
    eval_rows += [
        {"id": ident, "image": rel, "question": qa.question, "answer": qa.answer, "type": qa.type}
        for qa in qas
    ]
    return img, train_row, eval_rows


def _progress(it: Iterable[int], total: int, enabled: bool) -> Iterable[int]:
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but stay usable without it
        return it
    return tqdm(it, total=total, desc="shapes", unit="img")


def make_dataset(
    out_dir: str | Path, n: int, seed: int = 0, size: int = 256, progress: bool = True
) -> Path:
    """Write ``n`` images plus ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (
        open(out / "train.jsonl", "w", encoding="utf-8") as ftrain,
        open(out / "eval.jsonl", "w", encoding="utf-8") as feval,
    ):
        for i in _progress(range(n), n, progress):
            img, train_row, eval_rows = make_example(seed, i, size)
            img.save(out / train_row["image"], format="PNG")
            ftrain.write(json.dumps(train_row, ensure_ascii=False) + "\n")
            for row in eval_rows:
                feval.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastvlm.train.shapes",
        description="Generate the procedural shapes dataset (images, train.jsonl, eval.jsonl).",
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    out = make_dataset(args.out, args.n, args.seed, args.size, progress=not args.no_progress)
    print(f"wrote {args.n} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
