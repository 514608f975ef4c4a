"""Resolve a model reference to a local folder: the embedded default, a local path, or a Hugging
Face repo id (downloaded on demand with only the files we need).

Offline-friendly: the local cache is tried first; a failed download becomes a
`ModelNotFoundError` that says whether the id is wrong, the network is down, or the repo is gated.
Apple's FastVLM weights are research-only (Apple ML Research Model Terms of Use); we never bundle
them and say so when downloading.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .errors import ModelNotFoundError

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "fastvlm-tiny"

# Friendly aliases → repo ids.
ALIASES = {
    "fastvlm-0.5b": "apple/FastVLM-0.5B",
    "fastvlm-1.5b": "apple/FastVLM-1.5B",
    "fastvlm-7b": "apple/FastVLM-7B",
    "tiny": str(DEFAULT_MODEL),
    "default": str(DEFAULT_MODEL),
}
# Files a FastVLM folder needs; everything else in a repo (MLX weights, Core ML packages,
# pickles, images) is skipped.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
    "merges.txt",
    "vocab.json",
    "*.txt",
]
LICENSE_NOTE = (
    "note: Apple's FastVLM weights are licensed for research use only; see the LICENSE_MODEL "
    "file of https://github.com/apple/ml-fastvlm before using them."
)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(model: str | os.PathLike | None, *, download: bool = True, quiet: bool = False) -> Path:
    """Return the local folder for `model` (None → the embedded tiny model)."""
    if model is None:
        if not (DEFAULT_MODEL / "config.json").exists():
            raise ModelNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL}; reinstall fastvlm "
                "or pass model='apple/FastVLM-0.5B'"
            )
        return DEFAULT_MODEL
    ref = ALIASES.get(str(model).lower(), str(model))
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; pass the model folder that contains it")
        return path
    if not REPO_ID.match(ref):
        raise ModelNotFoundError(
            f"model {str(model)!r} is neither a local folder nor a Hugging Face repo id "
            "(like 'apple/FastVLM-0.5B')"
        )
    return snapshot(ref, download=download, quiet=quiet)


def snapshot(
    repo_id: str, *, local_dir: str | None = None, download: bool = True, quiet: bool = False
) -> Path:
    """Download (or find in the cache) the files of `repo_id` that fastvlm needs."""
    if not REPO_ID.match(repo_id) or ".." in repo_id or len(repo_id) > 96:
        names = ", ".join(k for k in ALIASES if k != "default")
        raise ModelNotFoundError(
            f"{repo_id!r} is not a Hugging Face repo id (like 'apple/FastVLM-0.5B') nor a "
            f"known name ({names})"
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise ModelNotFoundError("huggingface_hub is needed to download models") from e
    kw = dict(repo_id=repo_id, allow_patterns=ALLOW_PATTERNS, local_dir=local_dir)
    try:
        return Path(snapshot_download(local_files_only=True, **kw))
    except Exception:  # not cached (or partially): fall through to a real download
        pass
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and downloads are off "
            "(HF_HUB_OFFLINE=1); run `fastvlm download` while online, or pass a local folder"
        )
    if not quiet and repo_id.lower().startswith("apple/"):
        print(LICENSE_NOTE, file=sys.stderr)
    try:
        return Path(snapshot_download(**kw))
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its terms on the Hub and log in (`hf auth login`)"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"no such model on the Hugging Face Hub: {repo_id}") from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot download {repo_id}: no network connection and it is not cached"
        ) from e
    except Exception as e:  # network errors come in many types across hub versions
        raise ModelNotFoundError(f"cannot download {repo_id}: {type(e).__name__}: {e}") from e
