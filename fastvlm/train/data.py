"""Training data: LLaVA-style JSON / JSONL and `image,question,answer` CSV → token ids, labels and
pixels.

Design decisions:
* Rows are validated up front (`load_records`): a missing image, a file that is not an image
  (header check only, so startup stays cheap), an `<image>` count that does not match the row's
  images, `<image>` outside a user turn or a row with no assistant reply is *counted and reported
  with its line number* (the line where the row starts, for .json lists too), never a crash
  mid-run. Decoding errors found later (a truncated file) skip the row the same way.
* Loss masking comes from the chat template itself (`processing.render_segments` flags assistant
  replies + their `<|im_end|>`), so training and inference can never disagree on the prompt.
* Batches are right-padded; the causal mask keeps real tokens blind to the padding after them,
  and padded labels are -100.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import FastVLMError
from ..processing import IMAGE_MARKER, Processor, render_segments
from .rows import iter_rows

IGNORE = -100
ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "system": "system",
}  # fmt: skip
REMOTE = ("http://", "https://", "data:")


@dataclass(slots=True)
class Record:
    images: list[Any]  # paths (str) or PIL images
    messages: list[dict]
    line: int = 0
    meta: dict = field(default_factory=dict)  # e.g. the row's "type" (eval groups scores by it)


@dataclass(slots=True)
class LoadReport:
    total: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)

    def summary(self) -> str:
        s = f"{self.total - len(self.bad)}/{self.total} rows usable"
        if self.bad:
            shown = "; ".join(f"line {n}: {why}" for n, why in self.bad[:5])
            s += f", {len(self.bad)} skipped ({shown}{' ...' if len(self.bad) > 5 else ''})"
        return s


def _check_image(p: Path, seen: dict[str, str | None]) -> None:
    """Raise ValueError if `p` is missing or not an image (header only; cached per path)."""
    key = str(p)
    if key not in seen:
        if not p.exists():
            seen[key] = f"image not found: {p}"
        else:
            try:
                with Image.open(p) as im:
                    im.size  # noqa: B018 - parses the header
                seen[key] = None
            except (UnidentifiedImageError, OSError) as e:
                seen[key] = f"unreadable image {p}: {e}"
    if seen[key]:
        raise ValueError(seen[key])


def _row_to_record(
    row: dict, line: int, image_dir: Path | None, seen: dict[str, str | None] | None = None
) -> Record:
    seen = {} if seen is None else seen
    imgs = row.get("image", row.get("images"))
    imgs = [] if imgs in (None, "") else imgs if isinstance(imgs, list) else [imgs]
    paths = []
    for im in imgs:
        if not isinstance(im, str):
            raise ValueError(f"image entries must be paths, got {type(im).__name__}")
        if im.startswith(REMOTE):
            paths.append(im)
            continue
        p = Path(im)
        if not p.is_absolute() and image_dir is not None:
            p = image_dir / p
        _check_image(p, seen)
        paths.append(str(p))
    turns = row.get("conversations", row.get("messages"))
    if turns is not None:
        if not isinstance(turns, list):
            raise ValueError("'conversations' must be a list of turns")
        msgs = []
        for turn in turns:
            if not isinstance(turn, dict):
                raise ValueError(f"a turn must be an object, got {turn!r:.40}")
            speaker = turn.get("from", turn.get("role"))
            role = ROLES.get(speaker.strip().lower()) if isinstance(speaker, str) else None
            if role is None:
                raise ValueError(f"unknown speaker {speaker!r}")
            text = turn.get("value", turn.get("content", ""))
            if isinstance(text, (dict, list)) or text is None:
                raise ValueError(f"a turn's value must be text, got {type(text).__name__}")
            msgs.append({"role": role, "content": str(text)})
    elif "question" in row or "answer" in row:
        q, ans = row.get("question"), row.get("answer")
        if q is None or ans is None or not str(ans).strip():
            raise ValueError("empty answer" if q is not None else "no question")
        q = str(q)
        if paths and IMAGE_MARKER not in q:
            q = f"{IMAGE_MARKER}\n" + q
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": str(ans)}]
    else:
        raise ValueError("row has neither 'conversations' nor 'question'/'answer'")
    n_markers = sum(m["content"].count(IMAGE_MARKER) for m in msgs)
    if n_markers != len(paths):
        raise ValueError(f"{n_markers} <image> markers but {len(paths)} images")
    if any(IMAGE_MARKER in m["content"] for m in msgs if m["role"] != "user"):
        raise ValueError("<image> markers are only allowed in user turns")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise ValueError("no assistant turn to learn from")
    meta = {k: row[k] for k in ("type", "id") if row.get(k) not in (None, "")}
    return Record(paths, msgs, line, meta)


def load_records(
    path: str | Path, image_dir: str | Path | None = None
) -> tuple[list[Record], LoadReport]:
    path = Path(path)
    if not path.exists():
        raise FastVLMError(f"dataset not found: {path}")
    image_dir = Path(image_dir) if image_dir else path.parent
    records, report = [], LoadReport()
    seen: dict[str, str | None] = {}
    for n, row in iter_rows(path):
        report.total += 1
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise ValueError("row is not an object")
            records.append(_row_to_record(row, n, image_dir, seen))
        except (ValueError, KeyError, TypeError) as e:
            report.bad.append((n, str(e)))
    return records, report


def encode_record(
    rec: Record, processor: Processor, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """→ input_ids (T,), labels (T,) (-100 outside assistant replies), pixel_values (N,3,S,S)."""
    segs, _ = render_segments(
        rec.messages, processor.config.chat_template, processor.config.system_prompt, False
    )
    ids: list[int] = []
    labels: list[int] = []
    for text, train in segs:
        piece = processor.tokenize(text)
        ids += piece
        labels += piece if train else [IGNORE] * len(piece)
    if max_length and len(ids) > max_length:
        if any(i == processor.config.image_token_id for i in ids[max_length:]):
            raise ValueError(f"row is longer than max_length={max_length} inside an image")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE for t in labels):
            raise ValueError(f"max_length={max_length} cuts off every assistant reply")
    pixels = processor.pixels(rec.images)
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if pixels is not None:
        out["pixel_values"] = pixels
    return out


class VLMDataset(torch.utils.data.Dataset):
    """Records → encoded examples; a row whose image fails to decode yields None (skipped)."""

    def __init__(self, records: list[Record], processor: Processor, max_length: int | None = None):
        self.records, self.processor, self.max_length = records, processor, max_length
        self.skipped: dict[int, str] = {}  # line → reason (a row is reported once, not per epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        rec = self.records[i]
        try:
            return encode_record(rec, self.processor, self.max_length)
        except (FastVLMError, ValueError) as e:
            self.skipped[rec.line] = str(e)
            return None


def collate(batch: list[dict | None], pad_id: int = 0) -> dict[str, torch.Tensor] | None:
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    t = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), t), IGNORE, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n] = b["input_ids"], b["labels"]
    out = {"input_ids": ids, "labels": labels}
    pix = [b["pixel_values"] for b in batch if "pixel_values" in b]
    if pix:
        out["pixel_values"] = torch.cat(pix)
    return out


def shuffled(n: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation per epoch (identical on every rank and after a resume)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
