"""`fastvlm serve` start-up: options checked before the socket opens (one `error:` line,
exit 1), and a lazy model load that fails anyway (one log line, /health says "error")."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server import LiveServer, body, image_msg  # noqa: E402

from fastvlm.errors import ConfigError  # noqa: E402
from fastvlm.server.app import ServerConfig, create_app  # noqa: E402



pytestmark = pytest.mark.usefixtures("module_netguard")  # nothing leaves loopback


LOAD_FAILURES = [
    (RuntimeError("weights are corrupt"), "unexpected RuntimeError: weights are corrupt"),
    (ConfigError("image_size 100 is not valid: use a multiple of 64"), "image_size 100 is not"),
    (FileNotFoundError(2, "No such file", "/m/model.safetensors"), "/m/model.safetensors: No"),
    (ValueError("multi\nline\nmessage"), "multi line message"),
]


@pytest.mark.parametrize("exc, message", LOAD_FAILURES, ids=lambda v: type(v).__name__)
def test_load_failure_is_reported(monkeypatch, caplog, exc, message):
    """A failed lazy load is one log line without a traceback, /health says so with a 500
    (not the 503 of "still loading", which orchestrators would wait on forever) and requests
    get a 503 without Retry-After (retrying will not help)."""
    import fastvlm.api

    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(fastvlm.api, "load", broken)
    monkeypatch.delenv("FASTVLM_TRACEBACK", raising=False)
    srv = LiveServer(create_app(ServerConfig()))
    try:
        deadline = time.time() + 30
        while httpx.get(srv.url + "/health").json()["status"] == "loading":
            assert time.time() < deadline
            time.sleep(0.05)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 500 and r.json()["status"] == "error", r.text
        assert message in r.json()["detail"] and "\n" not in r.json()["detail"]
        r = httpx.post(srv.url + "/v1/chat/completions", json=body([image_msg("hi")]))
        assert r.status_code == 503 and message in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "model_load_failed"
        assert "retry-after" not in r.headers
    finally:
        srv.stop()
    failed = [rec for rec in caplog.records if "failed to load" in rec.getMessage()]
    assert len(failed) == 1 and message in failed[0].getMessage()
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text


BAD_SERVE_OPTIONS = [
    (["--image-size", "100"], "image_size 100"),
    (["--image-size", "0"], "image_size 0"),
    (["--image-size", "-64"], "image_size -64"),
    (["--image-size", "999999"], "image_size 999999"),
    (["--dtype", "fp8"], "dtype"),
    (["--device", "tpu"], "device"),
    (["--model", "/nonexistent/model/folder"], "/nonexistent/model/folder"),
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--max-request-mb", "-1"], "--max-request-mb"),
    (["--request-read-timeout", "0"], "--request-read-timeout"),
    (["--fetch-timeout", "nan"], "--fetch-timeout"),
    (["--slots", "0"], "--slots"),
    (["--port", "70000"], "--port"),
    (["--log-level", "loud"], "--log-level"),
    (["--allowed-local-media-path", "/nonexistent/media"], "/nonexistent/media"),
]


@pytest.mark.parametrize("args, words", BAD_SERVE_OPTIONS, ids=lambda v: " ".join(v))
def test_serve_refuses_bad_options_before_listening(monkeypatch, capsys, args, words):
    """Every option the lazy load or the server would trip over is checked before uvicorn
    starts: one `error:` line naming it, exit 1, no socket opened."""
    import uvicorn

    from fastvlm.cli import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(1))
    monkeypatch.delenv("FASTVLM_TRACEBACK", raising=False)
    assert main(["serve", *args]) == 1
    assert not started, "the server started listening"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert "unexpected" not in err[0]


def test_serve_accepts_valid_model_options(monkeypatch):
    """The up-front checks refuse only what the loader would refuse."""
    import uvicorn

    from fastvlm.cli import main

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **k: seen.append(k))
    argv = ["serve", "--image-size", "128", "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--request-read-timeout", "7", "--port", "0"]) == 0
    assert seen and seen[0]["http"].read_timeout == 7
