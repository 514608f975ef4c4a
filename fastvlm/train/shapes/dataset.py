"""Examples and datasets: image `index` of dataset `seed` as (image, train row, eval rows), the
`python -m fastvlm.train.shapes` writer."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .render import draw_scene
from .scene import DESCRIBE_PROMPT, DESCRIBE_PROMPTS, IMAGE_TOKEN
from .text import caption, typed_questions

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
