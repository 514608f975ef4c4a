"""`/metrics` counts what happened (a crash is a 500, a generation error is not a
cancellation, a client that went away is), and a clean SIGTERM stops `fastvlm serve` with exit
status 0. Harness: server_harness.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import server_harness as harness  # noqa: E402
from server_harness import (  # noqa: E402
    CHAT,
    assert_error,
    delta,
    metrics,
    post,
    req,
)

# the harness' fixtures, by name
faults, netguard, real_vlm, srv = harness.faults, harness.netguard, harness.real_vlm, harness.srv

# ---------------------------------------------------------------------- metrics
ERRS = "fastvlm_generation_errors_total"
CANCELLED = "fastvlm_requests_cancelled_total"


@pytest.mark.parametrize("stream", [False, True])
def test_generation_error_is_a_500_and_not_a_cancellation(srv, faults, caplog, stream):
    faults.fail = "start"
    before = metrics(srv.url)
    err = post(srv.url, req(stream=stream)).json()["error"]
    assert err["code"] == "internal" and err["type"] == "server_error"
    assert delta(before, metrics(srv.url)) == {'fastvlm_requests_total{status="500"}': 1, ERRS: 1}
    assert sum(r.exc_info is not None for r in caplog.records) == 1  # logged once, here


def test_error_mid_stream_is_counted_as_an_error(srv, faults):
    faults.fail = "middle"
    before = metrics(srv.url)
    r = post(srv.url, req(stream=True, max_tokens=8, ignore_eos=True))
    assert r.status_code == 200 and '"code": "internal"' in r.text  # in-band, after the 200
    d = delta(before, metrics(srv.url))
    assert d.pop(ERRS) == 1 and CANCELLED not in d
    assert d.pop('fastvlm_requests_total{status="200"}') == 1


@pytest.mark.parametrize("where", ["prepare", "admit", "stream"])
def test_unhandled_exception_is_one_logged_500(srv, monkeypatch, caplog, where):
    from fastvlm.server.serving import ChatService

    def boom(*a, **k):
        raise KeyError("injected internal bug")

    monkeypatch.setattr(ChatService, where, boom)
    caplog.set_level("DEBUG")
    before = metrics(srv.url)
    r = post(srv.url, req(stream=where == "stream"))
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": "internal",
    }
    d = delta(before, metrics(srv.url))
    assert d == {'fastvlm_requests_total{status="500"}': 1}, d  # not 499, not cancelled
    assert sum(r.exc_info is not None for r in caplog.records) == 1
    assert caplog.text.count("Traceback") <= 1


def test_client_disconnect_is_counted_as_cancelled(srv, faults):
    faults.delay = 0.01  # 900 tokens ≥ 9 s: the client leaves long before
    long = req(stream=True, max_tokens=900, ignore_eos=True)
    before = metrics(srv.url)
    with httpx.stream("POST", srv.url + CHAT, json=long, timeout=60) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    deadline = time.time() + 30
    while metrics(srv.url).get(CANCELLED, 0) == before.get(CANCELLED, 0):
        assert time.time() < deadline, "the disconnect was never counted"
        time.sleep(0.1)
    d = delta(before, metrics(srv.url))
    assert d.get(CANCELLED) == 1 and ERRS not in d, d
    assert 'fastvlm_requests_total{status="500"}' not in d
    # non-streaming: the client times out; the server notices and cancels
    before = metrics(srv.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + CHAT, json={**long, "stream": False}, timeout=1.5)
    deadline = time.time() + 30
    while metrics(srv.url).get(CANCELLED, 0) == before.get(CANCELLED, 0):
        assert time.time() < deadline, "the disconnect was never counted"
        time.sleep(0.1)
    d = delta(before, metrics(srv.url))
    counts = {k: v for k, v in d.items() if "tokens_total" not in k}
    assert counts == {CANCELLED: 1, 'fastvlm_requests_total{status="499"}': 1}, d


@pytest.mark.parametrize("stream", [True, False])
def test_server_side_cancel_is_counted_as_cancelled(srv, faults, stream):
    """Shutdown cancels in-flight runs: they end early, which is neither success nor error."""
    import threading

    faults.delay = 0.01
    service = srv.app.state.fastvlm["service"]
    before = metrics(srv.url)
    done: list[httpx.Response] = []
    body = req(stream=stream, max_tokens=900, ignore_eos=True)
    t = threading.Thread(target=lambda: done.append(post(srv.url, body)))
    t.start()
    deadline = time.time() + 30
    while metrics(srv.url).get("fastvlm_requests_running", 0) < 1:
        assert time.time() < deadline, "the request never started generating"
        time.sleep(0.02)
    service.cancel_all()
    t.join(30)
    assert done and done[0].status_code == 200
    d = delta(before, metrics(srv.url))
    assert d.get(CANCELLED) == 1 and ERRS not in d, d
    assert d.get("fastvlm_generation_tokens_total", 0) < 900, d


def test_client_errors_count_as_their_status(srv):
    before = metrics(srv.url)
    assert_error(post(srv.url, req(max_tokens=0)))
    r = post(srv.url, req(model="nope"))
    assert r.status_code == 404
    assert delta(before, metrics(srv.url)) == {
        'fastvlm_requests_total{status="400"}': 1,
        'fastvlm_requests_total{status="404"}': 1,
    }


# ---------------------------------------------------------------------- SIGTERM
@pytest.mark.parametrize("when", ["ready", "listening"])
def test_sigterm_exits_zero(when):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastvlm", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health").status_code
                if when == "listening" or status == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read().decode()
    assert rc == 0, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
