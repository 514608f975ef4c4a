"""Batch inputs: a folder of images, a JSONL / CSV manifest or a Parquet file → work items.

Items are `{"id", "image" (path str or None), "image_bytes" (bytes or None), "prompt"}`.
A bad row (not JSON, not an object, no image, a duplicated id, a path with a NUL byte) becomes an
item with an `"error"` instead of stopping the job: the driver writes it as an error row, so one
broken line costs one row, and the summary counts it as failed. Only an unreadable INPUT as a
whole (missing, wrong kind, undecodable file) is a job error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .errors import FastVLMError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BadRow(Exception):
    """One manifest row that cannot become an item; its message goes into an error row."""

    def __init__(self, msg: str, row: Any = None) -> None:
        super().__init__(msg)
        self.row = row  # the parsed row, when there is one: its 'id' names the error row


def load_items(src: str | Path, prompt: str) -> list[dict]:
    """INPUT → items in input order; bad rows are items with an "error" key (see module doc)."""
    p = Path(src)
    if not p.exists():
        raise FastVLMError(f"batch input not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        rows: list[Any] = [{"id": f.relative_to(p).as_posix(), "image": str(f)} for f in files]
    elif p.suffix.lower() == ".parquet":
        rows = _parquet_rows(p)
    elif p.suffix.lower() == ".csv":
        rows = _csv_rows(p)
    elif p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl_rows(p)
    else:
        raise FastVLMError(
            f"{p}: batch input must be a folder of images, a .jsonl/.csv manifest or .parquet"
        )
    items: list[dict] = []
    seen: dict[str, int] = {}
    for n, r in enumerate(rows, 1):
        try:
            if isinstance(r, BadRow):
                raise r
            it = _item(r, n, p, prompt)
            if it["id"] in seen:
                raise BadRow(
                    f"id {it['id']!r} is already used by row {seen[it['id']]}; "
                    "give every row a unique 'id'"
                )
            seen[it["id"]] = n
        except BadRow as e:
            rid, row = f"row {n}", r.row if isinstance(r, BadRow) else r
            if isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and row["id"] != "":
                rid = f"{row['id']} (row {n})"
            it = {"id": rid, "image": None, "image_bytes": None, "error": f"BadRow: {e}"}
        items.append(it)
    return items


def _item(r: Any, n: int, src: Path, prompt: str) -> dict:
    if not isinstance(r, dict):
        raise BadRow(f"expected an object with an 'image' field, got {type(r).__name__}")
    img, data = r.get("image"), None
    if isinstance(img, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        img, data = img.get("path"), img.get("bytes")
    elif isinstance(img, (bytes, bytearray)):
        img, data = None, img
    if data is not None:
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise BadRow("'image' bytes are empty or not bytes")
        data = bytes(data)
    elif img is None or img == "":
        raise BadRow("no 'image' (a path, or image bytes in Parquet)")
    elif not isinstance(img, str):
        raise BadRow(f"'image' must be a path string, got {type(img).__name__}")
    elif "\x00" in img:
        raise BadRow("'image' path contains a NUL byte")
    else:  # relative paths are relative to the manifest
        q = Path(img).expanduser()
        img = str(q if q.is_absolute() or src.is_dir() else src.parent / q)
    rid = r.get("id")
    if rid is None or rid == "":
        rid = r.get("image") if isinstance(r.get("image"), str) else f"{n - 1}"
    elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise BadRow(f"'id' must be a string or an integer, got {type(rid).__name__}")
    text = r.get("prompt")
    if text is not None and not isinstance(text, str):
        raise BadRow(f"'prompt' must be a string, got {type(text).__name__}")
    return {"id": str(rid), "image": img, "image_bytes": data, "prompt": text or prompt}


def _jsonl_rows(p: Path) -> list[Any]:
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise FastVLMError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    rows: list[Any] = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(BadRow(f"line {n} is not valid JSON ({e.msg})"))
    return rows


def _csv_rows(p: Path) -> list[Any]:
    # utf-8-sig: spreadsheet apps write a BOM that would otherwise rename the first column
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [(c or "").strip() for c in reader.fieldnames or []]
            if "image" not in fields:
                raise FastVLMError(f"{p}: the CSV header needs an 'image' column, got {fields}")
            reader.fieldnames = fields
            return [_csv_row(r) for r in reader]
    except UnicodeDecodeError as e:
        raise FastVLMError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except csv.Error as e:
        raise FastVLMError(f"{p}: not a readable CSV file ({e})") from e


def _csv_row(r: dict) -> dict | BadRow:
    if r.get(None):  # more cells than header columns
        return BadRow(f"{len(r[None])} more cells than the header has columns", r)
    return {k: (v or None) for k, v in r.items() if k is not None}


def _parquet_rows(p: Path) -> list[dict]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise FastVLMError("Parquet input needs pyarrow: pip install 'fastvlm[batch]'") from e
    try:
        return pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise FastVLMError(f"{p}: not a readable Parquet file ({e})") from e
