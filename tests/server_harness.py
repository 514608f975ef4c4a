"""Shared harness of the server hardening tests: a real uvicorn server on 127.0.0.1 in a
thread whose loggers propagate to the root logger (`log_config=None`, so `caplog` sees what
uvicorn and the app log), a FastVLM wrapper with switchable faults, and request helpers.
Import the fixtures into a test module to use them."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from conftest import guard_network

from fastvlm.server.app import ServerConfig, create_app

MODEL = "fastvlm-tiny"
VIOLATIONS: list[str] = []
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module", autouse=True)
def netguard():
    """Nothing may leave loopback (conftest's guard); asserted at the end of each module."""
    with pytest.MonkeyPatch.context() as mp:
        guard_network(mp, VIOLATIONS)
        yield
    assert not VIOLATIONS, VIOLATIONS


class Server:
    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        cfg = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.server.started and httpx.get(self.url + "/health").status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError("server never became ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class FaultyVLM:
    """The real FastVLM, plus switchable faults and a record of the ids each request encoded."""

    def __init__(self, real) -> None:
        self._real = real
        self.fail: str | None = None  # None | "start" | "middle"
        self.delay = 0.0
        self.encoded: list[list[int]] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def stream_chunks(self, messages, **kw):
        special = kw.get("allow_special_tokens", False)
        ids, _ = self._real.encode(messages, allow_special_tokens=special)
        self.encoded.append(ids)
        if self.fail == "start":
            raise RuntimeError("injected fault before the first token")
        for i, chunk in enumerate(self._real.stream_chunks(messages, **kw)):
            if self.fail == "middle" and i == 1:
                raise RuntimeError("injected fault mid-generation")
            if self.delay:
                time.sleep(self.delay)
            yield chunk


@pytest.fixture(scope="module")
def real_vlm():
    from fastvlm.api import load

    return load(None, device="cpu")


@pytest.fixture(scope="module")
def srv(real_vlm):
    vlm = FaultyVLM(real_vlm)
    s = Server(create_app(ServerConfig(), vlm=vlm))
    s.vlm = vlm
    yield s
    s.stop()


@pytest.fixture
def faults(srv):
    yield srv.vlm
    srv.vlm.fail, srv.vlm.delay = None, 0.0


def post(url: str, raw: bytes | dict, **kw) -> httpx.Response:
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(url + CHAT, content=data, headers=headers, timeout=60, **kw)


def req(**kw) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi."}],
        "max_tokens": 2,
        "temperature": 0,
        **kw,
    }


def raw_req(fragment: str) -> bytes:
    """A request body with one hand-written JSON fragment (escapes stay as written)."""
    return ('{"model": "fastvlm-tiny", "max_tokens": 2, ' + fragment + "}").encode()


def assert_error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == "invalid_request_error"
    return err


def assert_no_traceback(caplog) -> None:
    for rec in caplog.records:
        assert rec.exc_info is None and rec.levelno < 40, (rec.name, rec.getMessage())
    assert "Traceback" not in caplog.text


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def delta(before: dict, after: dict) -> dict:
    keys = set(before) | set(after)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in keys if "_bucket" not in k}
    return {k: v for k, v in d.items() if v and not k.endswith(("_sum", "_count"))}
