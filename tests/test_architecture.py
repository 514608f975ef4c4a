"""The package's shape, checked from the source: no import cycles (module-level and
function-local imports both count), files within the size rule, no lab notes in code comments,
and docs/architecture.md naming every module that exists."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fastvlm"
MAX_LINES = 500
# Files allowed past MAX_LINES, each with the reason (keep this empty unless a split would hurt).
LONG_FILES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        if "node_modules" in p.parts:
            continue
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its body (TYPE_CHECKING blocks excluded:
    they never run)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip |= {id(n) for b in node.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dst = sub if sub in mods else target
                    if dst in mods and dst != name:
                        edges[name].add(dst)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods and alias.name != name:
                        edges[name].add(alias.name)
    return edges


def cycles(edges: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods = _modules()
    found = cycles(import_graph(mods), list(mods))
    assert not found, f"import cycles: {found}"


def test_cycle_detector_sees_function_local_imports(tmp_path):
    # The checker itself must catch a cycle hidden in a function body.
    (tmp_path / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "b.py").write_text("from . import a\n")
    mods = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    assert cycles(import_graph(mods), list(mods)) == [["p.a", "p.b"]]


# The layers of docs/architecture.md, lowest first: a module may import its own layer and the
# ones below, never one above. Keyed by the first name under fastvlm/ ("__init__": the package).
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations", {"errors", "options", "hub", "images", "video", "tokenization", "config",
                     "config_format", "dtypes", "model_card", "manifest", "reaper"}),
    ("model", {"model"}),
    ("model side", {"weights", "mlx_format", "safetensors_rows", "quant", "kernels",
                    "processing", "fast_cpu"}),
    ("engine", {"engine", "device"}),
    ("runtimes", {"backends"}),
    ("API", {"api", "__init__"}),
    ("edges", {"cli", "server", "batch", "batch_ray", "batch_worker", "bench", "train", "export",
               "compress", "__main__"}),
]
# Upward imports allowed, each with its reason.
UPWARD_OK: dict[tuple[str, str], str] = {
    ("fastvlm.backends.ort", "fastvlm.export.onnx_community"):
        "the exported folder's file and input names are defined once, by the exporter",
    ("fastvlm.backends.ort", "fastvlm.export.wrappers"): "the KV input names (kv_names), same",
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, tops) in enumerate(LAYERS):
        if top in tops:
            return i
    raise KeyError(f"{module}: not in any layer of LAYERS (add it, and to docs/architecture.md)")


def upward_imports(edges: dict[str, set[str]], allowed=UPWARD_OK) -> list[str]:
    return sorted(
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, bs in edges.items() for b in bs
        if layer_of(b) > layer_of(a) and (a, b) not in allowed
    )


def test_every_module_has_a_layer():
    for name in _modules():
        layer_of(name)


def test_no_import_goes_up_a_layer():
    found = upward_imports(import_graph(_modules()))
    assert not found, "imports against the layering of docs/architecture.md:\n" + "\n".join(found)


def test_layer_check_sees_upward_imports(tmp_path):
    (tmp_path / "engine.py").write_text("def f():\n    from .api import load\n")
    (tmp_path / "api.py").write_text("from .engine import f\n")
    (tmp_path / "errors.py").write_text("from . import config\n")
    (tmp_path / "config.py").write_text("")
    mods = {f"fastvlm.{n}": tmp_path / f"{n}.py" for n in ("engine", "api", "errors", "config")}
    assert upward_imports(import_graph(mods)) == [
        "fastvlm.engine (engine) imports fastvlm.api (API)"]
    with pytest.raises(KeyError):
        layer_of("fastvlm.newthing")


def test_files_within_size_rule():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    unexplained = {k: v for k, v in long.items() if k not in LONG_FILES}
    assert not unexplained, f"files over {MAX_LINES} lines: {unexplained}"


# A comment quoting a measurement: a number with a unit of time, speed or bandwidth, a speed-up
# factor, or a result "measured on/at/with ..." (saying *what* a tool measures is fine: "the speed
# being measured", "TTFT is measured at the first token"). A number written as a literal ('500ms',
# `2s`) is an input format, not a result. Such facts go to benchmarks/ and docs/, where they can age.
_NUM = r"(?<![\w.'\"`/-])~?\d+([.,]\d+)?"
MEASUREMENT = re.compile(
    r"(?<!\bis )(?<!\bbe )(?<!\bbeing )(?<!\bbeen )(?<!\bare )"
    r"\bmeasured(\s+(on|at|with|in|under|against|over|using)\b|\s*[:(])"
    r"|^\W*measured\b|\bbenchmark(ed)?\s+(at|on)\b"
    rf"|{_NUM}(\s*-\s*\d+([.,]\d+)?)?\s*(ms|µs|us|ns|tok/s|tokens/s|tokens per second|img/s"
    r"|images/s|req/s|requests/s|it/s|s/it|s/token|GB/s|GiB/s|MB/s|TFLOP/s|GFLOP/s|TFLOPS)(?!\w)"
    r"|\d(\.\d+)?\s*[x×]\s+(faster|slower|quicker|speed-?up|the (decode |prefill )?speed)"
    r"|\bspeed-?up\s+(of\s+)?~?\d"
    r"|\d+(\.\d+)?\s*%\s+(faster|slower|speed-?up|of (the )?(bandwidth|token|step|time))"
    r"|\b\d+(\.\d+)?\s*s\s+(vs|→|->)\s*\d",
    re.IGNORECASE,
)


def _comment_lines(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    out = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.COMMENT
    ]
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and node.body:
                first = node.body[0].lineno
                out += [(first + i, line) for i, line in enumerate(doc.splitlines())]
    return out


# Comments of the package's other sources: C (`/* */`, `//`), JavaScript, HTML.
C_LIKE = {".c", ".h", ".js", ".mjs", ".html"}
C_COMMENT = re.compile(r"/\*.*?\*/|(?<![:\w\\])//[^\n]*|<!--.*?-->", re.S)


def _c_comment_lines(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    out = []
    for m in C_COMMENT.finditer(text):
        first = text.count("\n", 0, m.start()) + 1
        out += [(first + i, line) for i, line in enumerate(m.group(0).splitlines())]
    return out


def _sources() -> list[Path]:
    return sorted(
        p for p in PKG.rglob("*")
        if p.suffix in C_LIKE and p.is_file() and "node_modules" not in p.parts
        and not p.name.endswith(".min.js")
    )


def measurement_hits(py: list[Path], other: list[Path]) -> list[str]:
    lines = [(p, n, ln) for p in py for n, ln in _comment_lines(p)]
    lines += [(p, n, ln) for p in other for n, ln in _c_comment_lines(p)]
    return [f"{p.name}:{n}: {ln.strip()}" for p, n, ln in lines if MEASUREMENT.search(ln)]


def test_no_measurements_in_code_comments():
    hits = measurement_hits(list(_modules().values()), _sources())
    assert not hits, "measurements belong in benchmarks/ or docs/:\n" + "\n".join(hits)


def test_measurement_check_reads_every_comment_kind(tmp_path):
    py = tmp_path / "m.py"
    py.write_text(
        '"""Module.\n\nMeasured (2-core VM): 40 tok/s at batch 1.\n"""\n\n'
        "def f():\n    \"\"\"Cheap (~1 us each).\"\"\"\n    return 1  # 41 tok/s here\n"
        "X = 'a string with 5 ms is not a comment'\n"
    )
    c = tmp_path / "k.c"
    c.write_text("/* tile:\n * 30.6 -> 43 GB/s */\nint x; // 0.5 ms per step\n"
                 'const char *u = "https://example.com/5ms";\n')
    js = tmp_path / "a.js"
    js.write_text("// decode is 2x faster than wasm\nlet url = 'http://x/7 ms';\n")
    hits = measurement_hits([py], [c, js])
    assert sorted(h.split(":")[:2] for h in hits) == [
        ["a.js", "1"], ["k.c", "2"], ["k.c", "3"], ["m.py", "3"], ["m.py", "7"], ["m.py", "8"]]


@pytest.mark.parametrize(
    "line,bad",
    [
        ("# decode is 2.8x faster than eager", True),
        ("# 41 tok/s on the 2-core box", True),
        ("# measured on an EPYC", True),
        ("# vision 812 ms at 1024 px", True),
        ("# (B, T, H, D): heads split after the projection", False),
        ("# 1024 px images become 256 tokens", False),
        ("# ~7-10 ms per token on the 0.5B shape", True),
        ("# a ctypes call alone is ~1-3 us", True),
        ("(~1.4-2x the decode speed of fp32 compute)", True),
        ("# reaches ~5 GB/s where a plain read reaches ~26 GB/s", True),
        ("Measured (2-core AMD EPYC Zen 5 VM, AVX2)", True),
        ("# int4 gives a 1.8x speed-up on the 2-core box", True),
        ("# a speedup of 2.5 over eager", True),
        ("# left ~30% of the bandwidth unused", True),
        ("# decode 29.9 -> 40.2 tok/s", True),
        ("# 12.5 s -> 9 s per epoch", True),
        ("# (inf/NaN or denormals would change the speed being measured).", False),
        ("so TTFT is measured at the first content chunk", False),
        ("so that accuracy can be measured by exact match", False),
        ("MBU = measured decode tok/s ÷ roofline", False),
        ("\"'2s' / '500ms' / '1.5' / '1m' → seconds.\"", False),
        ("# --every takes '500ms' or '2s'", False),
        ("# 4x supersampled shapes and pixel noise", False),
        ("# the 0.5B shape: 896 hidden, 24 layers", False),
        ("# 2 × layers tensors (B, kv, P, hd)", False),
    ],
)
def test_measurement_pattern(line, bad):
    assert bool(MEASUREMENT.search(line)) is bad


# A path to a Python file as the doc writes it: `backends/torch.py`, tests/test_cli.py, api.py.
DOC_PATH = re.compile(r"(?<![\w/.<>-])((?:[\w-]+/)*[\w-]+\.py)\b")


def doc_missing_modules(doc: str, pkg: Path) -> list[str]:
    """Python files of `pkg` the doc does not name by their path relative to `pkg` (a bare file
    name does not count: `cli.py` would stand for bench/cli.py and quant/cli.py alike)."""
    named = set(DOC_PATH.findall(doc))
    rels = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py"))
    return [r for r in rels if "node_modules" not in r and r not in named]


def doc_stale_paths(doc: str, root: Path, pkg: Path) -> list[str]:
    """Python paths the doc names that exist neither in `pkg` nor from the repository root."""
    return sorted(p for p in set(DOC_PATH.findall(doc)) if not (pkg / p).exists()
                  and not (root / p).exists())


def test_architecture_doc_names_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = doc_missing_modules(doc, PKG)
    assert not missing, f"docs/architecture.md does not name (path relative to fastvlm/): {missing}"


def test_architecture_doc_names_no_stale_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    stale = doc_stale_paths(doc, ROOT, PKG)
    assert not stale, f"docs/architecture.md names files that do not exist: {stale}"


def test_doc_checkers_catch_missing_and_stale(tmp_path):
    pkg = tmp_path / "fastvlm"
    for rel in ("api.py", "bench/cli.py", "quant/cli.py", "train/config.py", "config.py"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("")
    full = "`api.py` `bench/cli.py` `quant/cli.py` `train/config.py` `config.py`"
    assert doc_missing_modules(full, pkg) == []
    # a bare name or a longer path containing the name does not stand for the module
    assert doc_missing_modules("`api.py` cli.py `train/config.py`", pkg) == [
        "bench/cli.py", "config.py", "quant/cli.py"]
    assert doc_stale_paths(full + " `engine/old.py` quant.py", tmp_path, pkg) == [
        "engine/old.py", "quant.py"]
    assert doc_stale_paths("`backends/<name>.py`", tmp_path, pkg) == []
