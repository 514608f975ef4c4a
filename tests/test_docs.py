"""The repository's Markdown points only at things the repository has: relative links resolve,
repository paths exist (a module may be named without `.py`, a glob must match), and nothing
points outside the checkout (`../shared/DESIGN.md` was such a reference)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_DIRS = ("fastvlm", "docs", "tests", "scripts", "benchmarks", "dev", "examples")
# Paths the docs name on purpose although they are not files in the checkout, with the reason.
NOT_FILES: dict[str, str] = {
    "examples/shapes1-4.png": "a range: examples/shapes1.png … shapes4.png",
    "fastvlm/export/js/node_modules": "created by `npm ci` at install time",
}

LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:\.\./)*(?:" + "|".join(TOP_DIRS) + r"|shared)/[\w./*-]*[\w/*])"
)


def doc_files(root: Path = ROOT) -> list[Path]:
    skip = ("node_modules", ".git", ".venv", "fastvlm.egg-info")
    return sorted(
        p for p in root.rglob("*.md")
        if not any(s in p.relative_to(root).parts for s in skip)
        and not p.relative_to(root).parts[0].startswith(".")
    )


def bad_references(doc: Path, root: Path, allowed: dict[str, str] = NOT_FILES) -> list[str]:
    """Relative links that do not resolve inside `root`, and repository paths that do not exist."""
    text = doc.read_text()
    out = []
    links = [m.span(1) for m in LINK.finditer(text)]  # checked as links, not again as paths
    for m in LINK.finditer(text):
        target = m.group(1).split("#")[0]
        if not target or re.match(r"[a-zA-Z][\w+.-]*:", target):  # anchors, http:, mailto:
            continue
        p = (doc.parent / target).resolve()
        if not p.is_relative_to(root.resolve()) or not p.exists():
            out.append(f"link {target}")
    for m in REPO_PATH.finditer(text):
        path = m.group(1).rstrip("/.")
        if path in allowed or any(a <= m.start(1) < b for a, b in links):
            continue
        if path.startswith("../"):
            p = (doc.parent / path).resolve()
            if not p.is_relative_to(root.resolve()):
                out.append(f"outside the repository: {path}")
            elif not p.exists():
                out.append(f"missing: {path}")
        elif path.startswith("shared/"):
            out.append(f"outside the repository: {path}")
        elif "*" in path:
            if not any(root.glob(path)):
                out.append(f"glob matches nothing: {path}")
        elif not (root / path).exists() and not (root / f"{path}.py").exists():
            out.append(f"missing: {path}")
    return out


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_reference_only_what_the_repository_has(doc):
    assert not bad_references(doc, ROOT), bad_references(doc, ROOT)


def test_docs_exist():
    names = {str(p.relative_to(ROOT)) for p in doc_files()}
    for d in ("README.md", "docs/architecture.md", "docs/kernels.md", "docs/quantization.md",
              "docs/benchmarks.md"):
        assert d in names


def test_reference_checker_variants(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "fastvlm" / "quant").mkdir(parents=True)
    (tmp_path / "fastvlm" / "quant" / "int4.py").write_text("")
    (tmp_path / "docs" / "kernels.md").write_text("")
    doc = tmp_path / "README.md"
    good = (
        "[k](docs/kernels.md) [k2](./docs/kernels.md#top) [web](https://example.com) [a](#x)\n"
        "`fastvlm/quant/int4.py`, fastvlm/quant/int4 (module), fastvlm/quant/, "
        "`fastvlm/quant/*.py`, `fastvlm/<name>.py`\n"
    )
    doc.write_text(good)
    assert bad_references(doc, tmp_path, {}) == []
    bad = {
        "See `../shared/DESIGN.md`.": "outside the repository: ../shared/DESIGN.md",
        "[design](../../shared/DESIGN.md)": "link ../../shared/DESIGN.md",
        "[design](../shared/DESIGN.md)": "link ../shared/DESIGN.md",
        "[gone](docs/quantization.md)": "link docs/quantization.md",
        "code in fastvlm/quant.py": "missing: fastvlm/quant.py",
        "`fastvlm/engine/graphs.py`": "missing: fastvlm/engine/graphs.py",
        "`tests/test_gone_*.py`": "glob matches nothing: tests/test_gone_*.py",
        "shared/DESIGN.md": "outside the repository: shared/DESIGN.md",
    }
    for text, why in bad.items():
        doc.write_text(good + text)
        assert bad_references(doc, tmp_path, {}) == [why], text
    # a doc one level down may climb back into the repository, not out of it
    sub = tmp_path / "docs" / "y.md"
    sub.write_text("[k](../docs/kernels.md) `../fastvlm/quant/int4.py`")
    assert bad_references(sub, tmp_path, {}) == []
    sub.write_text("`../docs/gone.md` [out](../../elsewhere.md)")
    assert bad_references(sub, tmp_path, {}) == ["link ../../elsewhere.md", "missing: ../docs/gone.md"]
