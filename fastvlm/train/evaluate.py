"""`fastvlm eval`: run a model over (image, question, answer) rows and score it.

Inputs: any file `fastvlm train` reads, through the same reader (`data.load_records`): LLaVA
`.json` / `.jsonl` rows (`conversations`) or `{"image", "question", "answer", "type"?}` rows,
`.csv` / `.tsv` with an `image,question,answer[,type]` header; bad rows are reported with their
line and skipped. Each assistant turn that answers a user turn is one example (see
`examples_from_records` for multi-turn rows). Or `--shapes N --data-seed S` generates held-out
shapes scenes on the fly. Scores: exact match,
VQA-style normalised accuracy (lower-case, punctuation and articles stripped, number words →
digits) per question type, and for caption rows a token-F1 caption metric next to exact match.
Each image is encoded once and its embedding reused for all of its questions. Per-example
results go to `--output` (JSONL); the summary is printed and its JSON is the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

from ..api import load
from ..cli.args import add_max_tokens_arg, add_model_args, add_tokens_per_image_arg, load_kwargs
from ..errors import FastVLMError
from ..processing import IMAGE_MARKER
from .args import Parser
from .data import LoadReport, Record, load_records

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


def examples_from_records(records: list[Record], report: LoadReport) -> list[dict]:
    """Training-format rows → scored examples, one per assistant turn that answers a user turn.

    A multi-turn row gives one example per answer: the prompt is the conversation up to that
    user turn with the *reference* answers as history (teacher forcing), so turn 3 is scored on
    its own and an early mistake does not spoil later turns. A row with more than one image is
    reported and skipped (eval encodes one image per row)."""
    out = []
    for rec in records:
        if len(rec.images) > 1:
            report.bad.append((rec.line, f"{len(rec.images)} images; eval scores one per row"))
            continue
        img = rec.images[0] if rec.images else None
        msgs, n = rec.messages, 0
        for i in range(1, len(msgs)):
            prev, cur = msgs[i - 1], msgs[i]
            if prev["role"] == "user" and cur["role"] == "assistant" and cur["content"].strip():
                n += 1
                question = prev["content"].replace(IMAGE_MARKER, "").strip()
                out.append({
                    **rec.meta, "line": rec.line, "turn": n, "question": question,
                    "answer": cur["content"].strip(), "image": img, "image_key": img,
                    "messages": msgs[:i],
                })  # fmt: skip
    return out


def load_rows(a: argparse.Namespace) -> tuple[list[dict], int]:
    """(examples to score, data-file rows skipped as unusable)."""
    if a.shapes:
        from .shapes import make_example

        rows = []
        for i in range(a.shapes):
            img, _, evs = make_example(a.data_seed, i, a.shapes_size)
            for ev in evs:
                rows.append({**ev, "image": img, "image_key": f"shapes:{a.data_seed}:{i}"})
        return rows, 0
    records, report = load_records(a.data, a.image_dir)
    rows = examples_from_records(records, report)
    print(f"data: {report.summary()}", file=sys.stderr)
    if not rows:
        raise FastVLMError(f"{a.data}: no rows to score (see the data report above)")
    return rows, len(report.bad)


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

    from ..engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens)
    by_image: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_image[r["image_key"]].append(r)
    results = []
    out = open(out_path, "w", encoding="utf-8") if out_path else None
    bar = tqdm(total=len(rows), desc="eval", disable=not progress, dynamic_ncols=True)
    for key, group in by_image.items():
        pixels, err = None, None
        try:
            if key is not None:  # None: text-only rows
                pixels = vlm.preprocess(group[0]["image"])  # once per image, for every question
        except FastVLMError as e:
            err = str(e)
        for r in group:
            rec = {k: v for k, v in r.items() if k not in ("image", "image_key", "messages")}
            rec["image"] = r["image"] if isinstance(r["image"], str) else r["image_key"]
            if err is not None:
                rec.update(prediction=None, error=err, exact=False, correct=False)
            else:
                try:  # one example that cannot run (too long, ...) is an error row, not a crash
                    pred = _predict(vlm, r, pixels, params, tokens_per_image)
                except (FastVLMError, ValueError) as e:
                    rec.update(prediction=None, error=str(e), exact=False, correct=False)
                else:
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


def _predict(vlm, r: dict, pixels, params, tokens_per_image: int | None) -> str:
    from ..processing import render_chat

    cfg = vlm.config
    if "messages" in r:  # a data-file row: the conversation up to this question
        msgs = r["messages"]
    else:
        content = [{"type": "image", "image": None}, {"type": "text", "text": r["question"]}]
        msgs = [{"role": "user", "content": content}]
    prompt, _ = render_chat(msgs, cfg.chat_template, cfg.system_prompt)
    n_images = prompt.count(IMAGE_MARKER)  # 0 when the image comes after this question
    ids = vlm.processor.tokenize(prompt, n_images, tokens_per_image)
    # through the loaded backend; the torch engine's vision cache encodes each image once
    gen = vlm.backend.submit(
        ids, pixels if n_images else None, params, tokens_per_image=tokens_per_image
    )
    return "".join(c.text for c in vlm.text_chunks(gen, params)).strip()


def summarize(results: list[dict]) -> dict:
    types: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        types[str(r.get("type") or "qa")].append(r)
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
    qa = [r for r in results if str(r.get("type") or "qa") != "caption"]
    summary = {
        "examples": len(results),
        "errors": sum(1 for r in results if r.get("error")),
        "qa_exact": round(sum(r["exact"] for r in qa) / len(qa), 4) if qa else None,
        "qa_accuracy": round(sum(r["correct"] for r in qa) / len(qa), 4) if qa else None,
        "caption_exact": per_type.get("caption", {}).get("exact"),
        "per_type": per_type,
    }
    return summary


def check_eval_args(a: argparse.Namespace) -> None:
    if not (a.data or a.shapes):
        raise FastVLMError("give --data FILE or --shapes N")
    if a.data and a.shapes:
        raise FastVLMError("give --data FILE or --shapes N, not both")
    if a.data and not Path(a.data).is_file():
        what = "is a folder, not a file" if Path(a.data).is_dir() else "not found"
        raise FastVLMError(f"--data {a.data}: {what}")
    if a.output and not Path(a.output).resolve().parent.is_dir():
        raise FastVLMError(f"--output {a.output}: its folder does not exist")
    if a.image_dir and not Path(a.image_dir).is_dir():
        raise FastVLMError(f"--image-dir {a.image_dir} is not a folder")
    for flag, v, lo in (("--shapes", a.shapes, 0), ("--shapes-size", a.shapes_size, 16),
                        ("--max-tokens", a.max_tokens, 1)):  # fmt: skip
        if v < lo:
            raise FastVLMError(f"{flag} must be >= {lo}, got {v}")


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="fastvlm eval", description="Score a model on image QA / captions."
    )
    add_model_args(p, model_help="model id or folder (default: embedded)")
    p.add_argument(
        "--data", default=None, help="the files train reads: LLaVA .json/.jsonl, .csv/.tsv"
    )
    p.add_argument("--image-dir", default=None)
    p.add_argument(
        "--shapes", type=int, default=0, help="generate N held-out shapes images instead"
    )
    p.add_argument("--data-seed", type=int, default=1000)
    p.add_argument("--shapes-size", type=int, default=256)
    add_max_tokens_arg(p, 64)
    p.add_argument("--output", "-o", default=None, help="per-example results (JSONL)")
    add_tokens_per_image_arg(p, help="pool image features to K tokens")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    check_eval_args(a)
    rows, skipped = load_rows(a)  # before loading the model: a bad file fails fast
    vlm = load(a.model, **load_kwargs(a))
    s = evaluate(vlm, rows, a.max_tokens, a.output, not a.quiet, a.tokens_per_image)
    s["skipped_rows"] = skipped
    for t, v in s["per_type"].items():
        extra = f"  token-F1 {v['token_f1']:.3f}" if "token_f1" in v else ""
        print(
            f"{t:<10} n={v['n']:<6} exact {v['exact']:.3f}  normalised {v['accuracy']:.3f}{extra}"
        )
    print(
        f"QA exact {s['qa_exact']}, caption exact {s['caption_exact']}, errors {s['errors']}, "
        f"skipped rows {skipped}"
    )
    print(json.dumps(s))
    return 0
