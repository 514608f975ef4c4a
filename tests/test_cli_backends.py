"""Every CLI command x every backend (issue 19): the demo model on PyTorch and its ONNX export on
ONNX Runtime. Each command either works (and generating commands agree across the backends,
greedy, fp32) or refuses up front with exactly one `error:` line saying why, and exit 1.

Commands run in-process through `fastvlm.cli.main` (an escaping exception fails the test); only
`serve` runs as a real process on loopback. The export is built once per session (conftest)."""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import has_module

import fastvlm
from fastvlm import hub
from fastvlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "examples").glob("shapes*.png"))[:2]
BACKENDS = ["torch", "onnxruntime"]
TOKENS = 8
pytestmark = pytest.mark.skipif(
    not (has_module("onnx") and has_module("onnxruntime")), reason="onnx/onnxruntime missing"
)


@pytest.fixture(scope="module")
def models(demo_onnx_export):
    """backend → the model folder it runs: the demo checkpoint, or its ONNX export."""
    return {"torch": str(hub.resolve(None)), "onnxruntime": str(demo_onnx_export("quality"))}


@pytest.fixture(scope="module")
def want():
    """What greedy decoding of each example image gives (the library on PyTorch)."""
    demo = fastvlm.load()
    return {str(p): demo.describe(str(p), max_tokens=TOKENS) for p in IMAGES}


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("FASTVLM_BACKEND", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ok(rc: int, err: str) -> None:
    assert rc == 0 and "Traceback" not in err, err[-2000:]


def refused(rc: int, err: str, why: str) -> str:
    """Exactly one stderr line, `error: ...` containing `why`, and exit 1."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err[-2000:])
    assert why in lines[0], lines[0]
    return lines[0]


def gen(backend: str, models) -> list[str]:
    """The flags every generating command gets: the backend's model and the backend itself."""
    return ["--model", models[backend], "--backend", backend, "--max-tokens", str(TOKENS)]


# ---------------------------------------------------------------------- generating commands
@pytest.mark.parametrize("backend", BACKENDS)
def test_describe_plain_verbose_json(capsys, models, want, backend):
    img = str(IMAGES[0])
    rc, out, err = cli(capsys, "describe", img, *gen(backend, models))
    ok(rc, err)
    assert out.strip() == want[img]
    rc, out, err = cli(capsys, "describe", img, *gen(backend, models), "-v")
    ok(rc, err)
    assert out.strip() == want[img] and "prompt tokens (16 image)" in err
    rc, out, err = cli(capsys, "describe", *map(str, IMAGES), *gen(backend, models), "--json")
    ok(rc, err)
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert {r["image"]: r["text"] for r in rows} == want
    assert all(r["image_tokens"] == 16 and r["generation_tokens"] >= 1 for r in rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_via_stdin(capsys, monkeypatch, models, want, backend):
    img = str(IMAGES[1])
    script = f"/image {img}\nDescribe this image.\n/reset\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    rc, out, err = cli(capsys, "chat", *gen(backend, models))
    ok(rc, err)
    assert out.strip() == want[img]
    assert "(attached" in err and "(history cleared)" in err


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_in_process(capsys, tmp_path, models, want, backend):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in IMAGES:
        (folder / p.name).write_bytes(p.read_bytes())
    out_file = tmp_path / "out.jsonl"
    rc, out, err = cli(capsys, "batch", folder, out_file, *gen(backend, models), "--workers", "0",
                       "--quiet", "--prompt", "Describe this image.")  # fmt: skip
    ok(rc, err)
    rows = {r["id"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    assert {k: r.get("text") for k, r in rows.items()} == {p.name: want[str(p)] for p in IMAGES}


def test_eval_agrees_across_backends(capsys, models):
    got = {}
    for backend in BACKENDS:
        rc, out, err = cli(capsys, "eval", *gen(backend, models), "--shapes", "2", "--quiet")
        ok(rc, err)
        got[backend] = json.loads(out.splitlines()[-1])
        assert got[backend]["errors"] == 0 and got[backend]["examples"] > 0
    assert got["torch"]["examples"] == got["onnxruntime"]["examples"]
    assert got["torch"]["per_type"] == got["onnxruntime"]["per_type"]


def test_watch_on_a_tiny_video_agrees_across_backends(capsys, tmp_path, models):
    if not has_module("av"):
        pytest.skip("PyAV not installed (fastvlm[video])")
    from test_multimodal import make_video

    clip = tmp_path / "clip.mp4"
    make_video(clip, seconds=2, fps=10, size=64)
    rows = {}
    for backend in BACKENDS:
        rc, out, err = cli(capsys, "watch", clip, *gen(backend, models), "--every", "1s",
                           "--frames", "2", "--json")  # fmt: skip
        ok(rc, err)
        rows[backend] = [json.loads(ln) for ln in out.splitlines()]
        assert [(r["start"], r["end"]) for r in rows[backend]] == [(0.0, 1.0), (1.0, 2.0)]
        assert all(r["text"] for r in rows[backend])
    assert rows["torch"] == rows["onnxruntime"]


# ---------------------------------------------------------------------- serve on loopback
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_on_loopback_one_request(models, want, backend):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import base64

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fastvlm", "serve", "--model", models[backend], "--backend",
           backend, "--port", str(port), "--served-model-name", "m", "--log-level",
           "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.25)
        img = IMAGES[0]
        url = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": "Describe this image."}]  # fmt: skip
        body = {"model": "m", "max_tokens": TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": content}]}  # fmt: skip
        req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        assert reply["choices"][0]["message"]["content"] == want[str(img)]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err[-2000:]


# ---------------------------------------------------------------------- weight / file commands
@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "{M}", "{T}/out"],
        ["convert", "{M}", "{T}/out", "--to", "hf"],
        ["export", "onnx", "{M}", "{T}/out", "--no-parity"],
        ["train", "--model", "{M}", "--shapes", "4", "--max-steps", "1", "--output", "{T}/out"],
        ["lora", "merge", "{M}", "{T}/adapter", "{T}/out"],
    ],
    ids=lambda a: a[0],
)
def test_weight_commands_refuse_an_onnx_export_saying_why(capsys, tmp_path, models, argv):
    """Commands that rewrite PyTorch weights cannot apply to an ONNX export: one line, nothing
    written."""
    m = models["onnxruntime"]
    args = [a.replace("{M}", m).replace("{T}", str(tmp_path)) for a in argv]
    rc, _, err = cli(capsys, *args)
    refused(rc, err, f"{m} is an ONNX export")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, made",
    [
        (["quantize", "{M}", "{T}/out", "--quiet"], "config.json"),
        (["convert", "{M}", "{T}/out", "--to", "hf"], "config.json"),
        (["export", "onnx", "{M}", "{T}/out", "--no-parity"], "fastvlm_export.json"),
    ],
    ids=lambda a: a[0] if isinstance(a, list) else a,
)
def test_weight_commands_on_torch(capsys, tmp_path, models, argv, made):
    args = [a.replace("{M}", models["torch"]).replace("{T}", str(tmp_path)) for a in argv]
    rc, _, err = cli(capsys, *args)
    ok(rc, err)
    assert (tmp_path / "out" / made).exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_download_of_a_local_folder_copies_it(capsys, tmp_path, models, backend):
    rc, out, err = cli(capsys, "download", models[backend], "--dir", tmp_path / "copy")
    ok(rc, err)
    assert Path(out.strip()) == tmp_path / "copy"
    want = sorted(p.name for p in Path(models[backend]).iterdir())
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == want


def test_bench_runs_on_torch_and_refuses_an_export(capsys, models):
    rc, out, err = cli(capsys, "bench", "--model", models["torch"], "--max-tokens", "2",
                       "--repeats", "1", "--concurrency", "1", "--vision-batch", "1")  # fmt: skip
    ok(rc, err)
    assert json.loads(out.splitlines()[-1])["runs"]
    rc, _, err = cli(capsys, "bench", "--model", models["onnxruntime"])
    refused(rc, err, "ONNX export")


# ---------------------------------------------------------------------- --backend / env var
LOADING = ["describe", "chat", "batch", "eval", "watch"]
RUN = itertools.count()  # a fresh batch output per run: batch resumes (skips) finished items


def _argv(cmd: str, tmp_path: Path, *extra: str) -> list[str]:
    head = {
        "describe": ["describe", str(IMAGES[0])],
        "chat": ["chat"],
        "batch": ["batch", str(IMAGES[0].parent), str(tmp_path / f"o{next(RUN)}.jsonl"),
                  "--workers", "0", "--quiet", "--limit", "1"],  # fmt: skip
        "eval": ["eval", "--shapes", "1", "--quiet"],
        "watch": ["watch", str(tmp_path / "clip.mp4"), "--frames", "1", "--every", "1s"],
    }[cmd]
    return [*head, "--max-tokens", "2", *extra]


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    if has_module("av"):
        from test_multimodal import make_video

        make_video(tmp_path / "clip.mp4", seconds=1, fps=4, size=32)
    return tmp_path


def _skip_without_av(cmd: str) -> None:
    if cmd == "watch" and not has_module("av"):
        pytest.skip("PyAV not installed (fastvlm[video])")


@pytest.mark.parametrize("cmd", LOADING)
def test_backend_flag_and_env_reach_the_loader(capsys, monkeypatch, inputs, models, cmd):
    _skip_without_av(cmd)
    demo, export = models["torch"], models["onnxruntime"]
    not_export = "is not a fastvlm ONNX export"
    # the flag: onnxruntime on the PyTorch checkpoint is refused by the ORT loader
    rc, _, err = cli(capsys, *_argv(cmd, inputs, "--model", demo, "--backend", "onnxruntime"))
    refused(rc, err, not_export)
    # the env var is the default ...
    monkeypatch.setenv("FASTVLM_BACKEND", "onnxruntime")
    rc, _, err = cli(capsys, *_argv(cmd, inputs, "--model", demo))
    refused(rc, err, not_export)
    # ... and the flag wins over it
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    rc, _, err = cli(capsys, *_argv(cmd, inputs, "--model", demo, "--backend", "torch"))
    ok(rc, err)
    # torch forced on an export: the weights loader says what the folder is
    rc, _, err = cli(capsys, *_argv(cmd, inputs, "--model", export, "--backend", "torch"))
    refused(rc, err, "is an ONNX export")


@pytest.mark.parametrize("cmd", LOADING)
@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("value", ["bogus", "onnx", "pytorch", ""])
def test_a_bad_backend_is_one_error_line(capsys, monkeypatch, inputs, cmd, how, value):
    _skip_without_av(cmd)
    if how == "env" and not value:
        value = "torch-gpu"  # an empty variable means "unset" (auto): see the test below
    argv = _argv(cmd, inputs, *(["--backend", value] if how == "flag" else []))
    if how == "env":
        monkeypatch.setenv("FASTVLM_BACKEND", value)
    rc, _, err = cli(capsys, *argv)
    line = refused(rc, err, "is not valid")
    assert "FASTVLM_BACKEND" in line and "auto, torch, onnxruntime" in line


@pytest.mark.parametrize("value", ["", "  "])
def test_a_blank_backend_variable_means_auto(capsys, monkeypatch, inputs, value):
    monkeypatch.setenv("FASTVLM_BACKEND", value)
    rc, out, err = cli(capsys, *_argv("describe", inputs))
    ok(rc, err)
    assert out.strip()


@pytest.mark.parametrize(
    "env, argv, want",
    [
        (None, [], "auto"),
        ("onnxruntime", [], "onnxruntime"),
        ("TORCH", [], "torch"),
        ("onnxruntime", ["--backend", "torch"], "torch"),
        (None, ["--backend", "ONNXRuntime"], "onnxruntime"),
    ],
)
def test_serve_backend_from_flag_and_env(monkeypatch, env, argv, want):
    from fastvlm.server.app import build_parser, config_from_args

    if env is not None:
        monkeypatch.setenv("FASTVLM_BACKEND", env)
    assert config_from_args(build_parser().parse_args(argv)).backend == want


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_refuses_a_bad_backend_before_starting(capsys, monkeypatch, how):
    pytest.importorskip("uvicorn")
    if how == "env":
        monkeypatch.setenv("FASTVLM_BACKEND", "tensorrt")
    rc, _, err = cli(capsys, "serve", *(["--backend", "tensorrt"] if how == "flag" else []))
    refused(rc, err, "backend 'tensorrt' is not valid")


# ---------------------------------------------------------------------- entry points
def test_python_m_fastvlm_and_the_console_script_entry_point():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    mod, func = scripts["fastvlm"].split(":")
    import importlib

    assert getattr(importlib.import_module(mod), func) is main
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "fastvlm", "describe", "-h"], capture_output=True,
                       text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "--backend" in r.stdout and "FASTVLM_BACKEND" in r.stdout
