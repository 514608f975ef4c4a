"""Dataset files → raw rows, one reader for `fastvlm train` and `fastvlm eval`.

Formats: LLaVA `.json` (a list of rows), `.jsonl` (one row per line), `.csv` / `.tsv` with an
`image,question,answer` header (extra columns kept, e.g. `type`). Every row comes with the line
it starts on, so problems are reported as "line N: why".

Design decisions:
* Text is decoded here, once, with the quirks of files people make: a UTF-8 byte-order mark
  (Excel's "CSV UTF-8"), UTF-16 with a BOM (Excel's "Unicode text"), CRLF line ends. Bytes
  that are not UTF-8 are a clear error naming the line (a .jsonl skips just that line).
* A row that cannot be parsed is yielded as a `ValueError` for the caller to count and report;
  only problems of the whole file (empty, not a list, no header, undecodable) raise.
* CSV header names are matched case- and space-insensitively, with a few common aliases
  (`ALIASES`); a row with more non-empty cells than the header has columns (an unquoted comma)
  is reported, not silently shifted.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import FastVLMError

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")
ALIASES = {
    "image_path": "image", "image_file": "image", "file_name": "image", "filename": "image",
    "prompt": "question", "response": "answer",
}  # fmt: skip
_WS = re.compile(r"[ \t\n\r]*")
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def decode(data: bytes, path: Path, line_offset: int = 0) -> str:
    """Bytes → text: UTF-8 (BOM dropped) or BOM-marked UTF-16; else FastVLMError with the line."""
    try:
        if data.startswith(_UTF16_BOMS):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = line_offset + data.count(b"\n", 0, e.start) + 1
        raise FastVLMError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); re-save the file "
            "as UTF-8 (in Excel: 'CSV UTF-8')"
        ) from None


def _read_text(path: Path) -> str:
    try:
        text = decode(path.read_bytes(), path)
    except OSError as e:
        raise FastVLMError(f"cannot read {path}: {e}") from e
    if not text.strip():
        raise FastVLMError(f"{path} is empty: no rows to read")
    return text


def _json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON list with the line each starts on (one pass, raw_decode per row)."""
    text = _read_text(path)
    dec = json.JSONDecoder()
    i = _WS.match(text).end()
    if text[i : i + 1] != "[":
        what = "a JSON object" if text[i : i + 1] == "{" else "no JSON list"
        raise FastVLMError(
            f"{path} holds {what}; a .json dataset must be a list of rows ([{{...}}, ...]); "
            "for one row per line name the file .jsonl"
        )
    i = _WS.match(text, i + 1).end()
    line, pos = 1, 0
    if text[i : i + 1] == "]":
        return
    while True:
        line += text.count("\n", pos, i)
        pos = i
        try:
            row, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise FastVLMError(
                f"{path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg}) in the row "
                f"that starts on line {line}; one broken row spoils a .json list: fix it, or use "
                ".jsonl where bad lines are skipped"
            ) from None
        yield line, row
        i = _WS.match(text, i).end()
        ch = text[i : i + 1]
        if ch == ",":
            i = _WS.match(text, i + 1).end()
        elif ch == "]":
            break
        else:
            n = line + text.count("\n", pos, i)
            raise FastVLMError(f"{path} line {n}: expected ',' or ']' after a row (invalid JSON)")


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    data = path.read_bytes()
    if data.startswith(_UTF16_BOMS):  # decode whole, then the same per-line parse
        lines = [ln.encode() for ln in _read_text(path).split("\n")]
    elif not data.removeprefix(b"\xef\xbb\xbf").strip():
        raise FastVLMError(f"{path} is empty: no rows to read")
    else:
        lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        if n == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield n, ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x})")
        except ValueError as e:
            yield n, ValueError(f"bad JSON: {e}")


def _table(path: Path, tsv: bool) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    first = text.split("\n", 1)[0]
    delim = "\t" if tsv else max(",;\t", key=first.count)  # Excel in some locales writes ';'
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        yield from _table_rows(path, reader, delim, tsv)
    except csv.Error as e:  # e.g. a field over csv's size limit: the reader cannot go on
        raise FastVLMError(f"{path} line {reader.line_num}: unreadable table ({e})") from None


def _table_rows(path: Path, reader, delim: str, tsv: bool) -> Iterator[tuple[int, Any]]:
    header = next(reader, None)
    cols = [ALIASES.get(h.strip().lower(), h.strip().lower()) for h in header or []]
    missing = {"question", "answer"} - set(cols)
    if missing:
        raise FastVLMError(
            f"{path}: a .{'tsv' if tsv else 'csv'} dataset needs the header image,question,answer "
            f"(image may be empty for text-only rows); missing {sorted(missing)}, found "
            f"{[h.strip() for h in header or []]}"
        )
    end = reader.line_num
    for cells in reader:  # a quoted field may span lines: report where the row starts
        start, end = end + 1, reader.line_num
        if not any(c.strip() for c in cells):
            continue
        extra = [c for c in cells[len(cols) :] if c.strip()]
        if extra:
            yield start, ValueError(
                f"{len(cells)} cells but the header has {len(cols)} columns (an unquoted "
                f"'{delim}' inside a field? quote it)"
            )
            continue
        cells += [""] * (len(cols) - len(cells))  # short row: the missing cells are empty
        yield start, {c: v for c, v in zip(cols, cells, strict=False) if c}


def iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row dict or ValueError) for .json / .jsonl / .csv / .tsv files."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path)
    elif suffix == ".json":
        yield from _json_list(path)
    elif suffix in (".csv", ".tsv"):
        yield from _table(path, suffix == ".tsv")
    else:
        raise FastVLMError(
            f"{path}: unsupported dataset type {suffix!r} (use {', '.join(SUFFIXES)})"
        )
