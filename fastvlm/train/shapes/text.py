"""A scene's text: the canonical caption and the questions whose answer is unique."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .scene import (
    COLORS,
    KINDS,
    MAX_SHAPES,
    PLURALS,
    QA,
    _RELATION_GAP,
    Scene,
    Shape,
    _as_rng,
)

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
