"""README.md of a derived model folder (fine-tuned, merged, quantized).

A derived folder must not carry its source's README: that card states the source's scores and
training, which the new weights do not have. The new card states only facts of the run that
made it (base model, data, settings, final loss, date) and points at the base for the rest.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from pathlib import Path

# Files copied from the source folder into a derived one (tokenizer, chat template, licence).
CARRIED = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "generation_config.json", "chat_template.json",
    "chat_template.jinja", "LICENSE",
)  # fmt: skip


def copy_source_files(src: Path | None, dst: Path) -> None:
    """Tokenizer / template / licence files of SRC that DST lacks (never README.md)."""
    if src is None:
        return
    for name in CARRIED:
        if (Path(src) / name).exists() and not (dst / name).exists():
            shutil.copy2(Path(src) / name, dst / name)


def write_card(folder: Path, title: str, facts: dict[str, object], note: str = "") -> Path:
    """A short README.md: a title, a facts table, and a note that no scores are claimed."""
    rows = [f"| {k} | {str(v).replace('|', '/')} |" for k, v in facts.items() if v is not None]
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        f"# {title}", "",
        note or "Made by fastvlm. No evaluation scores are claimed for these weights: measure "
        "them with `fastvlm eval`. Scores in the base model's card do not carry over.",
        "", "| | |", "|---|---|", *rows, f"| written | {date} |", "",
    ])  # fmt: skip
    path = Path(folder) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
