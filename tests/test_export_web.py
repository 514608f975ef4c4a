"""`fastvlm export web`: the static folder runs the demo model in headless Chromium, offline.

The folder is served on loopback; every request the page makes is recorded and anything not to
that origin is aborted (and fails the test): no CDN at page load. The answer must equal
PyTorch's greedy answer for the same image and prompt. Skips only where chromium or node is
absent."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
from conftest import has_module
from PIL import Image

import fastvlm
from fastvlm.export.js_deps import node_available

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
EXAMPLES = sorted((ROOT / "examples").glob("shapes*.png"))
PROMPT = "Describe this image."
pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package"),
    pytest.mark.skipif(not node_available(), reason="node / npm not installed"),
    pytest.mark.skipif(
        not (has_module("onnx") and has_module("onnxruntime")), reason="onnx/onnxruntime missing"
    ),
]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def demo():
    return fastvlm.load(engine="reference")


def serve(folder: Path):
    handler = functools.partial(_Quiet, directory=str(folder))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def ask_in_browser(url: str, images: list[Path], max_tokens: int) -> tuple[list[str], list, str]:
    sync_api = pytest.importorskip("playwright.sync_api")
    outside, answers = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update"],
        )  # fmt: skip
        try:
            page = browser.new_page()

            def guard(route):
                if route.request.url.startswith(url + "/") or route.request.url.startswith(
                    ("blob:", "data:")
                ):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            page.route("**/*", guard)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function(
                "['ready'].includes(document.getElementById('status').textContent) ||"
                " document.getElementById('status').textContent.startsWith('error')",
                timeout=180_000,
            )
            status = page.inner_text("#status")
            assert status == "ready", (status, errors)
            device = page.evaluate("window.fastvlmDevice")
            page.fill("#max_tokens", str(max_tokens))
            page.fill("#prompt", PROMPT)
            for img in images:
                page.evaluate("window.fastvlmDone = undefined")
                page.set_input_files("#file", str(img))
                page.wait_for_function("document.getElementById('preview').complete")
                page.wait_for_timeout(200)  # RawImage.fromBlob finishes decoding
                page.click("#ask")
                page.wait_for_function("window.fastvlmDone !== undefined", timeout=180_000)
                answers.append(page.inner_text("#answer"))
                stats = page.inner_text("#stats")
                assert "tokens/s" in stats and "first token" in stats, stats
        finally:
            browser.close()
    return answers, outside, device


@pytest.mark.parametrize("preset", ["quality", "balanced", "small"])
def test_web_export_answers_like_pytorch_offline(demo, tmp_path, preset):
    from fastvlm.export.web import export_web

    out = tmp_path / "site"
    res = export_web(demo.model, out, preset, demo.tokenizer, log=lambda *_: None)
    assert res.parity.passed
    for f in ("index.html", "app.js", "vendor/transformers.min.js", "model/config.json",
              "vendor/ort-wasm-simd-threaded.asyncify.wasm"):  # fmt: skip
        assert (out / f).exists(), f
    page_src = (out / "app.js").read_text() + (out / "index.html").read_text()
    assert "http://" not in page_src and "https://" not in page_src  # no CDN reference
    wide = tmp_path / "wide.png"  # non-square: the page pads it to a square like fastvlm does
    Image.open(EXAMPLES[1]).convert("RGB").resize((384, 256), Image.BICUBIC).save(wide)
    srv, url = serve(out)
    try:
        by_preset = {"quality": [EXAMPLES[0], wide], "balanced": EXAMPLES[1:3]}
        images = by_preset.get(preset, EXAMPLES[2:])
        answers, outside, device = ask_in_browser(url, images, 32)
    finally:
        srv.shutdown()
    assert outside == [], f"the page fetched from outside its folder: {outside}"
    assert device in ("wasm", "webgpu")
    for img, got in zip(images, answers, strict=True):
        want = demo.describe(str(img), PROMPT, max_tokens=32)
        assert got.strip() == want.strip(), (img.name, got, want)


def test_web_cli_wraps_an_existing_onnx_export(demo, tmp_path):
    """`fastvlm export web EXPORT OUT` packages an export as is; a non-export folder without
    the transformers.js side files is one clear error."""
    from fastvlm.cli import main
    from fastvlm.export.onnx import export_onnx

    src = tmp_path / "onnx"
    export_onnx(demo.model, src, "small", demo.tokenizer, parity=False, log=lambda *_: None)
    assert main(["export", "web", str(src), str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "model" / "onnx" / "decoder_model_merged_q4.onnx").exists()
    assert (tmp_path / "w" / "vendor" / "transformers.min.js").exists()
    (src / "tokenizer_config.json").unlink()  # an export from an older fastvlm
    assert main(["export", "web", str(src), str(tmp_path / "w2")]) == 1
