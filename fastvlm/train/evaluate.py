"""`fastvlm eval`: run a model over (image, question, answer) rows and score it.

Inputs: a JSONL (`{"image", "question", "answer", "type"?}`) or CSV (`image,question,answer`), or
`--shapes N --data-seed S` to generate held-out shapes scenes on the fly. Scores: exact match,
VQA-style normalised accuracy (lower-case, punctuation and articles stripped, number words →
digits) per question type, and for caption rows a token-F1 caption metric next to exact match.
Each image is encoded once and its embedding reused for all of its questions. Per-example
results go to `--output` (JSONL); the summary is printed and its JSON is the last stdout line.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

from ..errors import FastVLMError

ARTICLES = {"a", "an", "the"}
NUMBERS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}


def normalize(s: str) -> str:
    s = s.lower().strip()
    s = re.sub(r"[^\w\s]", " ", s)
    words = [NUMBERS.get(w, w) for w in s.split() if w not in ARTICLES]
    return " ".join(words)


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def load_rows(a: argparse.Namespace) -> list[dict]:
    if a.shapes:
        from .shapes import make_example

        rows = []
        for i in range(a.shapes):
            img, _, evs = make_example(a.data_seed, i, a.shapes_size)
            for ev in evs:
                rows.append({**ev, "image": img, "image_key": f"shapes:{a.data_seed}:{i}"})
        return rows
    path = Path(a.data)
    if not path.exists():
        raise FastVLMError(f"eval data not found: {path}")
    base = Path(a.image_dir) if a.image_dir else path.parent
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
    else:
        raw = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    rows = []
    for r in raw:
        img = Path(r["image"])
        img = img if img.is_absolute() else base / img
        rows.append({**r, "image": str(img), "image_key": str(img)})
    return rows


@torch.inference_mode()
def evaluate(
    vlm,
    rows: list[dict],
    max_tokens: int,
    out_path: str | None,
    progress: bool = True,
    tokens_per_image: int | None = None,
) -> dict:
    from tqdm import tqdm

    from ..engine.generate import generate
    from ..engine.sampling import SamplingParams
    from ..processing import render_chat

    params = SamplingParams(max_tokens=max_tokens)
    cfg = vlm.config
    by_image: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_image[r["image_key"]].append(r)
    results = []
    out = open(out_path, "w", encoding="utf-8") if out_path else None
    bar = tqdm(total=len(rows), desc="eval", disable=not progress, dynamic_ncols=True)
    for _key, group in by_image.items():
        try:
            pixels = vlm.preprocess(group[0]["image"]).to(vlm.device)
            # once per image, reused for every question; pooled with --tokens-per-image
            embeds = vlm.model.embed_images(pixels, tokens_per_image)
        except FastVLMError as e:
            embeds, err = None, str(e)
        for r in group:
            rec = {k: v for k, v in r.items() if k not in ("image", "image_key")}
            rec["image"] = r["image"] if isinstance(r["image"], str) else r["image_key"]
            if embeds is None:
                rec.update(prediction=None, error=err, exact=False, correct=False)
            else:
                content = [
                    {"type": "image", "image": None},
                    {"type": "text", "text": r["question"]},
                ]
                prompt, _ = render_chat(
                    [{"role": "user", "content": content}], cfg.chat_template, cfg.system_prompt
                )
                ids = vlm.processor.tokenize(prompt, 1, tokens_per_image)
                pred, _ = generate(
                    vlm.model,
                    vlm.tokenizer,
                    ids,
                    None,
                    params,
                    image_embeds=embeds,
                    eos_ids=vlm.eos_ids,
                    vocab_limit=vlm.vocab_limit,
                    step_fn=vlm.step_fn,  # torch or ONNX Runtime, as loaded
                )
                pred = pred.strip()
                rec.update(
                    prediction=pred,
                    exact=pred == str(r["answer"]).strip(),
                    correct=normalize(pred) == normalize(str(r["answer"])),
                    f1=round(token_f1(pred, str(r["answer"])), 4),
                )
            results.append(rec)
            if out:
                out.write(json.dumps(rec) + "\n")
            bar.update(1)
    bar.close()
    if out:
        out.close()
    return summarize(results)


def summarize(results: list[dict]) -> dict:
    types: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        types[r.get("type") or "qa"].append(r)
    per_type = {
        t: {
            "n": len(rs),
            "exact": round(sum(r["exact"] for r in rs) / len(rs), 4),
            "accuracy": round(sum(r["correct"] for r in rs) / len(rs), 4),
        }
        for t, rs in sorted(types.items())
    }
    for t, rs in types.items():
        if t == "caption":
            per_type[t]["token_f1"] = round(sum(r.get("f1", 0.0) for r in rs) / len(rs), 4)
    qa = [r for r in results if (r.get("type") or "qa") != "caption"]
    summary = {
        "examples": len(results),
        "errors": sum(1 for r in results if r.get("error")),
        "qa_exact": round(sum(r["exact"] for r in qa) / len(qa), 4) if qa else None,
        "qa_accuracy": round(sum(r["correct"] for r in qa) / len(qa), 4) if qa else None,
        "caption_exact": per_type.get("caption", {}).get("exact"),
        "per_type": per_type,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fastvlm eval", description="Score a model on image QA / captions."
    )
    p.add_argument("--model", "-m", default=None, help="model id or folder (default: embedded)")
    p.add_argument("--data", default=None, help="JSONL {image, question, answer, type} or CSV")
    p.add_argument("--image-dir", default=None)
    p.add_argument(
        "--shapes", type=int, default=0, help="generate N held-out shapes images instead"
    )
    p.add_argument("--data-seed", type=int, default=1000)
    p.add_argument("--shapes-size", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--output", "-o", default=None, help="per-example results (JSONL)")
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument(
        "--tokens-per-image", type=int, default=None, help="pool image features to K tokens"
    )
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if not (a.data or a.shapes):
        print("error: give --data FILE or --shapes N", file=sys.stderr)
        return 2
    from ..api import load

    vlm = load(a.model, device=a.device, image_size=a.image_size)
    rows = load_rows(a)
    s = evaluate(vlm, rows, a.max_tokens, a.output, not a.quiet, a.tokens_per_image)
    for t, v in s["per_type"].items():
        extra = f"  token-F1 {v['token_f1']:.3f}" if "token_f1" in v else ""
        print(
            f"{t:<10} n={v['n']:<6} exact {v['exact']:.3f}  normalised {v['accuracy']:.3f}{extra}"
        )
    print(f"QA exact {s['qa_exact']}, caption exact {s['caption_exact']}, errors {s['errors']}")
    print(json.dumps(s))
    return 0
