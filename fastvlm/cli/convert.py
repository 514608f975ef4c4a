"""`fastvlm download` and `fastvlm convert`: get a checkpoint, or rewrite it in another format."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .. import hub
from ..weights import convert_checkpoint


def add_parsers(sub) -> None:
    p = sub.add_parser("download", help="download a model from the Hugging Face Hub")
    p.add_argument("model", help="repo id, e.g. apple/FastVLM-0.5B")
    p.add_argument("--dir", default=None, help="download into this folder instead of the HF cache")
    p.set_defaults(func=download)

    p = sub.add_parser("convert", help="convert a checkpoint between formats (lossless)")
    p.add_argument("src", help="source folder or repo id")
    p.add_argument("dst", help="new output folder")
    p.add_argument("--to", required=True, choices=["hf", "apple", "fastvlm"])
    p.add_argument("--trust-pickle", action="store_true")
    p.set_defaults(func=convert)


def download(a: argparse.Namespace) -> int:
    ref = hub.ALIASES.get(a.model.lower(), a.model)
    if Path(ref).expanduser().is_dir():  # an embedded alias (tiny) or a local folder: no download
        path = hub.resolve(ref)
        if a.dir:
            path = Path(shutil.copytree(path, a.dir, dirs_exist_ok=True))
        print(path)
        return 0
    print(hub.snapshot(ref, local_dir=a.dir))
    return 0


def convert(a: argparse.Namespace) -> int:
    try:
        dst = convert_checkpoint(hub.resolve(a.src), a.dst, a.to, trust_pickle=a.trust_pickle)
    except FileExistsError as e:  # its own message, not the OSError "name: strerror" form
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.to} checkpoint to {dst}")
    return 0
