"""The shapes scene model: vocabulary, layout constants, the `Shape` / `Background` / `Scene`
records, shape outlines, and sampling a scene from a seeded `random.Random` (see the package
docstring)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

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
        clamped = (min(255.0, max(0.0, level + t)) for t in tint)
        return tuple(int(round(v)) for v in clamped)  # type: ignore[return-value]

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
