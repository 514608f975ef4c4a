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

Layout: ``scene.py`` (vocabulary, records, outlines, sampling), ``render.py`` (drawing),
``text.py`` (caption, questions), ``dataset.py`` (examples, dataset writer, CLI).

Output of :func:`make_dataset` (``python -m fastvlm.train.shapes OUT --n 1000 --seed 0``)::

    OUT/images/000000.png ...
    OUT/train.jsonl   LLaVA-style rows {"id", "image", "conversations": [{"from", "value"}, ...]}
    OUT/eval.jsonl    rows {"id", "image", "question", "answer", "type"}, one "caption" row per
                      image (prompt DESCRIBE_PROMPT) followed by all its question rows
"""

from .dataset import LAYOUTS, image_rng, main, make_dataset, make_example
from .render import draw_scene, render_scene
from .scene import (
    COLORS,
    DESCRIBE_PROMPT,
    DESCRIBE_PROMPTS,
    EVAL_TYPES,
    IMAGE_TOKEN,
    KINDS,
    MAX_SHAPES,
    NUMBER_WORDS,
    PLURALS,
    QA,
    QUESTION_TYPES,
    SIZES,
    Background,
    Scene,
    Shape,
    sample_scene,
)
from .text import caption, questions, typed_questions

__all__ = [
    "COLORS", "DESCRIBE_PROMPT", "DESCRIBE_PROMPTS", "EVAL_TYPES", "IMAGE_TOKEN", "KINDS",
    "LAYOUTS", "MAX_SHAPES", "NUMBER_WORDS", "PLURALS", "QA", "QUESTION_TYPES", "SIZES",
    "Background", "Scene", "Shape", "caption", "draw_scene", "image_rng", "main", "make_dataset",
    "make_example", "questions", "render_scene", "sample_scene", "typed_questions",
]  # fmt: skip
