"""Repository hygiene: no developer's machine-specific absolute paths in any tracked text file.

Docs, scripts and assets once told users to run `/work/parity-venv/bin/python` or to write into
`/tmp/qa/...`; commands must use relative paths or variables ($WORK, $TMPDIR) instead. A path
that is legitimately absolute goes on the small ALLOWED list below, with its reason.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent

# An absolute path into a developer's home, scratch or work area. The look-behind skips URLs
# ("github.com/home/..."), relative paths ("a/tmp/b") and variables ("$TMPDIR/...").
DEV_PATH = re.compile(
    r"(?<![\w.\-~$}/])/(?:work|root|home|tmp|Users|mnt|scratch|data|opt/venv)/[\w.\-/]*"
)
# (file, exact match): absolute paths that are right where they are.
ALLOWED: set[tuple[str, str]] = set()
TEXT_SUFFIXES = {
    ".py", ".md", ".txt", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".json", ".jinja",
    ".js", ".mjs", ".html", ".rst", "",
}  # fmt: skip
THIS = Path(__file__).relative_to(ROOT).as_posix()


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): walk it
        files = [
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file() and not {".git", "__pycache__", ".pytest_cache"} & set(p.parts)
        ]
    assert files, "no files found to check"
    return files


def read_text(rel: str) -> str | None:
    p = ROOT / rel
    if p.suffix.lower() not in TEXT_SUFFIXES or not p.is_file() or p.stat().st_size > 4 << 20:
        return None
    data = p.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def find_dev_paths(text: str) -> list[str]:
    return [m.group(0) for m in DEV_PATH.finditer(text)]


def test_the_pattern_catches_developer_paths_and_spares_the_rest():
    bad = [
        "/work/parity-venv/bin/python scripts/make_fixtures.py",
        "--out /tmp/qa/train_a.pt",
        'default="/tmp/demo"',
        "see /root/.cache/fastvlm",
        "cd /home/alice/fastvlm && make",
        "(`/Users/bob/venv/bin/python`)",
        "--model=/mnt/models/fastvlm",
    ]
    for line in bad:
        assert find_dev_paths(line), line
    good = [
        "https://github.com/home/x and http://example.com/tmp/y",
        "python3 -m venv .venv-parity && .venv-parity/bin/python scripts/make_fixtures.py",
        "--out $WORK/qa/train_a.pt",
        "OUT=${OUT:-$SCRATCH/gpu-out}",
        "fastvlm watch /dev/video0 --every 2s",
        "~/.cache/huggingface and out/tmp/x",
    ]
    for line in good:
        assert not find_dev_paths(line), line


def test_no_machine_specific_absolute_paths_in_tracked_files():
    found = []
    checked = 0
    for rel in tracked_files():
        if rel == THIS:
            continue
        text = read_text(rel)
        if text is None:
            continue
        checked += 1
        for n, line in enumerate(text.splitlines(), 1):
            for hit in find_dev_paths(line):
                if (rel, hit) not in ALLOWED:
                    found.append(f"{rel}:{n}: {hit}")
    assert checked > 50, f"only {checked} text files checked"
    assert not found, "machine-specific paths (use relative paths or $VARS):\n" + "\n".join(found)
