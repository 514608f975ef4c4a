"""`fastvlm export web MODEL OUT`: a static folder that runs the model in the browser.

    OUT/index.html, app.js               the page: pick an image, ask, streamed answer + tokens/s
    OUT/vendor/transformers.min.js       transformers.js (pinned lock file, copied from
    OUT/vendor/ort-wasm-simd-threaded.asyncify.{mjs,wasm}   node_modules at export time)
    OUT/model/                           the ONNX export (onnx-community layout)

Nothing is fetched from a CDN at page load: transformers.js is set to local models only and
onnxruntime-web's `wasmPaths` point at the copies in vendor/. WebGPU is used where the browser
has it, WASM otherwise. Serve it with any static server, e.g. `python -m http.server -d OUT`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..errors import ConfigError
from .js_deps import PACKAGE_DIR, ensure_node_modules
from .onnx import (
    ALLOWED,
    ExportResult,
    add_common_args,
    export_onnx,
    load_source,
    prepare_out,
    print_result,
)
from .precision import resolve_precision

PAGE_DIR = PACKAGE_DIR / "web"
# (package, path inside it) → copied to OUT/vendor/
VENDOR = (
    ("@huggingface/transformers", "dist/transformers.min.js"),
    ("onnxruntime-web", "dist/ort-wasm-simd-threaded.asyncify.mjs"),
    ("onnxruntime-web", "dist/ort-wasm-simd-threaded.asyncify.wasm"),
)
DEFAULT_PRESET = "small"  # a browser tab's memory and download: int4 decoder, fp16 vision


def copy_runtime(out: Path, log=print) -> list[Path]:
    """The page and the pinned transformers.js / onnxruntime-web files into `out`."""
    root = ensure_node_modules(log)
    vendor = out / "vendor"
    vendor.mkdir(parents=True, exist_ok=True)
    copied = []
    for pkg, rel in VENDOR:
        src = root / "node_modules" / pkg / rel
        if not src.exists():
            raise ConfigError(f"{src} is missing from the pinned install: rerun after `npm ci`")
        copied.append(Path(shutil.copy2(src, vendor / src.name)))
    for page in sorted(PAGE_DIR.iterdir()):
        copied.append(Path(shutil.copy2(page, out / page.name)))
    return copied


def export_web(
    model,
    out: str | Path,
    precision: str | dict[str, str] | None = DEFAULT_PRESET,
    tokenizer=None,
    *,
    parity: bool = True,
    log=print,
    **onnx_options,
) -> ExportResult:
    """Export an in-memory `FastVLMModel` to a browser-ready folder `out` (see module doc)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    copy_runtime(out, log)  # first: fail on a missing node before the slow export
    res = export_onnx(model, out / "model", precision, tokenizer, parity=parity, log=log,
                      **onnx_options)  # fmt: skip
    res.out = out
    for f in sorted((out / "vendor").iterdir()):
        res.files[f"vendor/{f.name}"] = f.stat().st_size
    return res


def from_onnx_export(folder: Path, out: Path, log=print) -> ExportResult:
    """Wrap an existing `fastvlm export onnx` folder (no re-export)."""
    from ..backends.ort import MANIFEST, is_onnx_export

    if not (folder / "tokenizer_config.json").exists() or not is_onnx_export(folder):
        raise ConfigError(
            f"{folder} is not an ONNX export in the transformers.js layout: re-export it with "
            "this fastvlm (`fastvlm export onnx`) or pass the source model"
        )
    out.mkdir(parents=True, exist_ok=True)
    copy_runtime(out, log)
    shutil.copytree(folder, out / "model")
    prec = json.loads((folder / MANIFEST).read_text()).get("precision", {})
    res = ExportResult(out, prec)
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.parent.name in ("onnx", "vendor"):
            res.files[str(f.relative_to(out))] = f.stat().st_size
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastvlm export web", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.set_defaults(preset=DEFAULT_PRESET)
    a = p.parse_args(argv)
    out = Path(a.out)
    from ..hub import resolve
    from ..backends.ort import is_onnx_export

    src = Path(resolve(a.model))
    if is_onnx_export(src):  # already exported: package it as is
        prepare_out(out, a.force)
        res = from_onnx_export(src, out)
    else:
        prec = resolve_precision(a.preset, a.precision, ALLOWED, "ONNX")  # fail before loading
        prepare_out(out, a.force)
        model, tok, folder = load_source(a)
        res = export_web(model, out, prec, tok, parity=not a.no_parity,
                         min_agreement=a.min_agreement, name=folder.name)  # fmt: skip
    rc = print_result(res)
    print(f"serve it: python -m http.server -d {out} 8000  →  http://127.0.0.1:8000/")
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
