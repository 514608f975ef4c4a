"""Every command that takes --model, on an ONNX export of the demo model (issue 17 item 8).

Each command must either work (and agree with PyTorch where it generates) or refuse up front
with one `error: ...` line and exit 1: never a traceback, never exit 0 with every item failed.
The CLI runs in subprocesses so that an uncaught exception shows up as a traceback on stderr."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import has_module

import fastvlm

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("shapes*.png"))
pytestmark = pytest.mark.skipif(
    not (has_module("onnx") and has_module("onnxruntime")), reason="onnx/onnxruntime missing"
)


@pytest.fixture(scope="module")
def demo():
    return fastvlm.load(engine="reference")


@pytest.fixture(scope="module")
def exports(demo_onnx_export):
    return {p: demo_onnx_export(p) for p in ("quality", "small")}


def run(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fastvlm", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def ok_or_clear_error(r: subprocess.CompletedProcess) -> bool:
    """True when the command succeeded; else it must be exactly one clear error line, exit 1."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if r.returncode == 0:
        return True
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert r.returncode == 1 and len(errors) == 1, (r.returncode, r.stderr[-2000:])
    return False


def torch_text(demo, image, **kw) -> str:
    return demo.describe(str(image), max_tokens=24, **kw)


# ---------------------------------------------------------------------- describe / chat
@pytest.mark.parametrize("preset", ["quality", "small"])
def test_describe_on_onnx_export(exports, demo, preset):
    out = exports[preset]
    r = run("describe", "--model", str(out), str(EXAMPLES[0]), "--max-tokens", "24")
    assert ok_or_clear_error(r)
    if preset == "quality":
        assert r.stdout.strip() == torch_text(demo, EXAMPLES[0])
    # media flags the torch path takes: token reduction, an image cap, the README's --json
    for extra in (["--tokens-per-image", "4"], ["--tokens-per-image", "1"], ["--max-images", "2"],
                  ["--json"]):  # fmt: skip
        r = run("describe", "--model", str(out), str(EXAMPLES[1]), "--max-tokens", "24", *extra)
        assert ok_or_clear_error(r), extra
        if preset == "quality" and extra[0] == "--tokens-per-image":
            want = torch_text(demo, EXAMPLES[1], tokens_per_image=int(extra[1]))
            assert r.stdout.strip() == want, extra


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tokens-per-image", "5"], "use one of 16, 9, 4, 1"),
        (["--tokens-per-image", "64"], "use one of 16, 9, 4, 1"),
        (["--max-images", "1", "--image", str(EXAMPLES[0]), "--image", str(EXAMPLES[1])], "image"),
        (["--image-size", "512"], "ONNX export"),
    ],
)
def test_bad_media_flags_are_one_error_line(exports, extra, message):
    r = run("describe", "--model", str(exports["quality"]), "--max-tokens", "4", *extra,
            *([] if "--image" in extra else [str(EXAMPLES[0])]))  # fmt: skip
    assert not ok_or_clear_error(r)
    assert message in r.stderr


def test_chat_via_stdin(exports, demo):
    script = f"/image {EXAMPLES[2]}\nDescribe this image.\n"
    r = run("chat", "--model", str(exports["quality"]), "--max-tokens", "24", stdin=script)
    assert ok_or_clear_error(r)
    assert r.stdout.strip() == torch_text(demo, EXAMPLES[2])
    r = run("chat", "--model", str(exports["small"]), "--max-tokens", "8", "--tokens-per-image",
            "4", stdin=script)  # fmt: skip
    assert ok_or_clear_error(r) and r.stdout.strip()


# ---------------------------------------------------------------------- watch / batch / eval
def test_watch_on_tiny_video(exports, tmp_path):
    if not has_module("av"):
        pytest.skip("PyAV not installed (fastvlm[video])")
    from test_multimodal import make_video

    clip = tmp_path / "clip.mp4"
    make_video(clip, seconds=2, fps=10, size=64)
    for extra in ([], ["--tokens-per-image", "4"]):
        r = run("watch", str(clip), "--model", str(exports["quality"]), "--every", "1s",
                "--frames", "2", "--max-tokens", "6", "--json", *extra)  # fmt: skip
        assert ok_or_clear_error(r), extra
        rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
        assert len(rows) == 2 and all(row.get("text") for row in rows), rows


@pytest.mark.parametrize("workers", ["0", "1"])
def test_batch_writes_captions_not_error_rows(exports, demo, tmp_path, workers):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in EXAMPLES[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out.jsonl"
    r = run("batch", str(folder), str(out), "--model", str(exports["quality"]), "--workers",
            workers, "--max-tokens", "24", "--quiet", "--tokens-per-image", "4")  # fmt: skip
    assert ok_or_clear_error(r)
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == 2 and not any("error" in row for row in rows.values()), rows
    for p in EXAMPLES[:2]:
        assert rows[p.name]["text"] == torch_text(demo, p, tokens_per_image=4)


def test_eval_shapes_matches_torch(exports):
    for extra in ([], ["--tokens-per-image", "4"]):
        got = run("eval", "--model", str(exports["quality"]), "--shapes", "2", "--quiet",
                  "--max-tokens", "24", *extra)  # fmt: skip
        want = run("eval", "--shapes", "2", "--quiet", "--max-tokens", "24", *extra)
        assert ok_or_clear_error(got) and ok_or_clear_error(want)
        g, w = json.loads(got.stdout.splitlines()[-1]), json.loads(want.stdout.splitlines()[-1])
        assert g["errors"] == 0 and g["examples"] == w["examples"]
        assert g["per_type"] == w["per_type"], extra


def test_bench_refuses_an_export_with_one_line(exports):
    r = run("bench", "--model", str(exports["quality"]))
    assert not ok_or_clear_error(r)
    assert "ONNX export" in r.stderr


# ---------------------------------------------------------------------- serve (in-process)
def test_serve_app_on_onnx_export(exports, demo):
    from fastapi.testclient import TestClient

    from fastvlm.server.app import ServerConfig, create_app

    b64 = base64.b64encode(EXAMPLES[3].read_bytes()).decode()
    msg = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        {"type": "text", "text": "Describe this image."}]}]  # fmt: skip
    app = create_app(ServerConfig(model=str(exports["quality"]), served_model_name="x"))
    with TestClient(app) as c:
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        body = {"model": "x", "messages": msg, "max_tokens": 24, "temperature": 0}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == torch_text(demo, EXAMPLES[3])
        r = c.post("/v1/chat/completions", json={**body, "tokens_per_image": 4})
        assert r.status_code == 200, r.text
        want = torch_text(demo, EXAMPLES[3], tokens_per_image=4)
        assert r.json()["choices"][0]["message"]["content"] == want
        r = c.post("/v1/chat/completions", json={**body, "tokens_per_image": 7})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens_per_image"


# ---------------------------------------------------------------------- pooling, numerically
@pytest.mark.parametrize("k", [1, 4, 9, 16])
def test_onnx_pooling_matches_torch(exports, demo, k):
    from fastvlm.backends.ort import OrtModel

    ort = OrtModel(exports["quality"], intra_op_threads=1)
    px = torch.stack([demo.preprocess(str(p))[0] for p in EXAMPLES[:2]])
    with torch.no_grad():
        want = demo.model.embed_images(px, k).numpy()
    got = ort.embed_images(px, k)
    assert got.shape == want.shape == (2, k, demo.config.text.hidden_size)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--model", "{M}", "--shapes", "4", "--max-steps", "1", "--output", "{T}/tr"],
        ["quantize", "{M}", "{T}/q"],
        ["convert", "{M}", "{T}/c", "--to", "hf"],
        ["lora", "merge", "{M}", "{T}/adapter", "{T}/m"],
    ],
)
def test_weight_commands_refuse_an_export_with_one_line(exports, tmp_path, argv):
    """Commands that need PyTorch weights: one clear error, nothing written."""
    args = [a.replace("{M}", str(exports["small"])).replace("{T}", str(tmp_path)) for a in argv]
    r = run(*args)
    assert not ok_or_clear_error(r)
    assert str(exports["small"]) in r.stderr
    assert not any((tmp_path / n).exists() for n in ("q", "c", "m"))


def test_export_without_projector_graph_refuses_pooling(exports, tmp_path):
    """An export from before token reduction (no projector graph): native tokens still run,
    tokens_per_image is one clear error in the library and in the CLI."""
    import shutil

    from fastvlm.errors import ConfigError

    old = tmp_path / "old"
    shutil.copytree(exports["small"], old)
    manifest = json.loads((old / "fastvlm_export.json").read_text())
    (old / manifest["files"].pop("projector")).unlink()
    (old / "fastvlm_export.json").write_text(json.dumps(manifest))
    vlm = fastvlm.load(old)
    assert vlm.describe(str(EXAMPLES[0]), max_tokens=4)
    with pytest.raises(ConfigError, match="re-export"):
        vlm.describe(str(EXAMPLES[0]), max_tokens=4, tokens_per_image=4)
    r = run("describe", "--model", str(old), str(EXAMPLES[0]), "--tokens-per-image", "4")
    assert not ok_or_clear_error(r) and "re-export" in r.stderr
