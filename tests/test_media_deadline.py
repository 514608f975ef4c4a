"""Issue 17, item 3: `--fetch-timeout` is one wall-clock deadline per media fetch (DNS, connect,
status line, headers, body, every redirect hop), slow fetches cannot starve requests that
fetch nothing, and SIGTERM does not wait for a trickling download.

All servers here are raw sockets on 127.0.0.1 that send as slowly as a hostile media host would;
loopback is allowed through `allowed_media_domains`, as in test_media.py.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import guard_network
from PIL import Image

from fastvlm.server import media
from fastvlm.server.media import MediaError, MediaPolicy

TIMEOUT = 1.5
SLACK = 1.0  # the acceptance bound: a fetch ends within fetch_timeout + 1 s


@pytest.fixture(autouse=True)
def netguard(monkeypatch):
    violations: list[str] = []
    guard_network(monkeypatch, violations)
    yield violations
    assert violations == []


def png() -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(b, "PNG")
    return b.getvalue()


class Trickler:
    """A loopback HTTP server whose handler `script(conn, path)` writes as slowly as it likes.
    Threads stop when the test ends (closed sockets make their writes fail)."""

    def __init__(self, script, backlog: int = 64) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.script = script
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            req = b""
            while b"\r\n\r\n" not in req:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                req += chunk
            path = req.split(b" ", 2)[1].decode()
            self.script(self, conn, path)
        except OSError:
            pass

    def trickle(self, conn: socket.socket, data: bytes, every: float) -> None:
        for i in range(len(data)):
            if self.stop.is_set():
                return
            conn.sendall(data[i : i + 1])
            time.sleep(every)

    def url(self, path: str = "/x.png") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for c in self.conns:
            c.close()


def slow_body(srv, conn, path):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
    srv.trickle(conn, b"\x89PNG" + b"\0" * 99_996, 0.2)


def slow_headers(srv, conn, path):
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    srv.trickle(conn, b"X-Slow: " + b"a" * 10_000, 0.1)


def slow_status_line(srv, conn, path):
    srv.trickle(conn, b"HTTP/1.1 200 OK " + b"x" * 10_000, 0.1)


def silent(srv, conn, path):
    srv.stop.wait(30)


def chunked_trickle(srv, conn, path):
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while not srv.stop.is_set():
        conn.sendall(b"1\r\nx\r\n")
        time.sleep(0.2)


def redirect_chain(srv, conn, path):
    """Each hop takes ~1.4 s, under the timeout (no single read or hop is slow enough to be
    cut off), and redirects to the next one: only a deadline over all hops ends it."""
    n = int(path.strip("/") or 0)
    line = f"HTTP/1.1 302 Found\r\nLocation: /{n + 1}\r\n".encode()
    srv.trickle(conn, line, 1.4 / len(line))
    conn.sendall(b"Content-Length: 0\r\n\r\n")


SCRIPTS = {
    "slow-body": slow_body,
    "slow-headers": slow_headers,
    "slow-status-line": slow_status_line,
    "silent": silent,
    "chunked-trickle": chunked_trickle,
    "redirect-chain": redirect_chain,
}


def policy(**kw) -> MediaPolicy:
    base = dict(allowed_media_domains=["127.0.0.1"], fetch_timeout_s=TIMEOUT, max_redirects=50)
    return MediaPolicy(**{**base, **kw})


@pytest.mark.parametrize("what", ["image", "video"])
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_phase_of_a_fetch_shares_one_deadline(name, what):
    srv = Trickler(SCRIPTS[name])
    try:
        t0 = time.monotonic()
        if what == "video":
            pytest.importorskip("av")
        with pytest.raises(MediaError) as e:
            if what == "video":
                media.load_media_video(srv.url("/0"), policy())
            else:
                media.load_media_image(srv.url("/0"), policy())
        took = time.monotonic() - t0
    finally:
        srv.close()
    assert took < TIMEOUT + SLACK, f"{name}: {took:.1f} s"
    assert e.value.status == 400 and e.value.code == "media_timeout", (e.value.code, str(e.value))


def tls_trickle(srv, conn, path):
    """A TLS handshake record header announcing 16 KiB, whose bytes then come one at a time."""
    conn.sendall(b"\x16\x03\x03\x40\x00")
    srv.trickle(conn, b"\0" * 16384, 0.1)


@pytest.mark.parametrize("script", [silent, tls_trickle])
def test_tls_handshake_is_bounded(script):
    """https:// to a server that never completes a TLS handshake (silence, or one byte at a
    time): the handshake gets only the time left."""
    srv = Trickler(script)
    srv._handle = lambda conn: script(srv, conn, "/")  # no HTTP request ever arrives
    try:
        t0 = time.monotonic()
        with pytest.raises(MediaError) as e:
            media.load_media_image(f"https://127.0.0.1:{srv.port}/x.png", policy())
        took = time.monotonic() - t0
    finally:
        srv.close()
    assert took < TIMEOUT + SLACK, took
    assert e.value.status == 400


def test_slow_connect_is_bounded():
    """A listener whose accept queue is full: the kernel drops our SYN, connect() hangs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the accept queue (never accepted)
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises(MediaError) as e:
            media.load_media_image(f"http://127.0.0.1:{port}/x.png", policy())
        took = time.monotonic() - t0
    finally:
        for s in fillers:
            s.close()
        srv.close()
    assert took < TIMEOUT + SLACK, took
    assert e.value.status == 400


def test_hanging_dns_is_bounded(monkeypatch):
    real = socket.getaddrinfo

    def slow_dns(host, *a, **k):
        if host == "slow.example":
            time.sleep(6)
            return real("127.0.0.1", *a, **k)
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    t0 = time.monotonic()
    with pytest.raises(MediaError) as e:
        media.load_media_image(
            "http://slow.example:9/x.png", policy(allowed_media_domains=["slow.example"])
        )
    took = time.monotonic() - t0
    assert took < TIMEOUT + SLACK, took
    assert e.value.code == "media_timeout"


def test_fast_servers_are_unaffected():
    body = png()

    def ok(srv, conn, path):
        if path == "/r":
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n")
            return
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        conn.sendall(head + body)

    srv = Trickler(ok)
    try:
        assert media.load_media_image(srv.url("/r"), policy()).size == (16, 16)
        assert media.load_media_image(srv.url("/ok"), policy(fetch_timeout_s=60)).size == (16, 16)
    finally:
        srv.close()


# ---------------------------------------------------------------------- the server
def _text_body(text: str = "hi") -> dict:
    return {
        "model": "fastvlm-tiny",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 2,
        "temperature": 0,
    }


def _image_body(url: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
    return {**_text_body(), "messages": [{"role": "user", "content": parts}]}


@pytest.fixture(scope="module")
def tiny_vlm():
    pytest.importorskip("fastapi")
    import fastvlm

    return fastvlm.load(None)


class _Live:
    """uvicorn in a thread on a pre-bound loopback socket (as test_server.py's LiveServer)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def _live(vlm, media_policy: MediaPolicy) -> _Live:
    pytest.importorskip("uvicorn")
    from fastvlm.server.app import ServerConfig, create_app

    return _Live(create_app(ServerConfig(media=media_policy), vlm=vlm))


def test_text_requests_do_not_wait_behind_slow_fetches(tiny_vlm):
    """More slow fetches in flight than asyncio's default pool has threads (min(32, cpus + 4))."""
    httpx = pytest.importorskip("httpx")
    n = min(32, (os.cpu_count() or 1) + 4) + 2
    trick = Trickler(slow_body)
    srv = _live(tiny_vlm, policy(fetch_timeout_s=6.0))  # default media pool: 8 threads, 64 jobs
    results: list = []
    try:
        httpx.post(srv.url + "/v1/chat/completions", json=_text_body(), timeout=60)  # warm

        def slow_client():
            r = httpx.post(
                srv.url + "/v1/chat/completions", json=_image_body(trick.url()), timeout=60
            )
            results.append(r)

        threads = [threading.Thread(target=slow_client) for _ in range(n)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # every slow fetch is now holding a thread
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/chat/completions", json=_text_body(), timeout=60)
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
    finally:
        trick.close()
        srv.stop()
    assert r.status_code == 200
    assert took < 2.0, f"a text-only request waited {took:.1f} s behind slow fetches"
    assert len(results) == n and all(x.status_code == 400 for x in results)
    assert {x.json()["error"]["code"] for x in results} == {"media_timeout"}


def test_full_media_pool_answers_429_and_queued_jobs_keep_their_deadline(tiny_vlm):
    httpx = pytest.importorskip("httpx")
    trick = Trickler(slow_body)
    srv = _live(tiny_vlm, policy(fetch_timeout_s=2.0, media_workers=1, max_queued_media=2))
    url = srv.url + "/v1/chat/completions"
    out: list = []
    try:

        def client():
            t0 = time.monotonic()
            r = httpx.post(url, json=_image_body(trick.url()), timeout=60)
            out.append((r, time.monotonic() - t0))

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        busy = httpx.post(url, json=_image_body(trick.url()), timeout=60)
        for t in threads:
            t.join(30)
    finally:
        trick.close()
        srv.stop()
    assert busy.status_code == 429 and busy.headers.get("Retry-After")
    assert busy.json()["error"]["code"] == "media_busy"
    # one worker: the second job waited for it, but its deadline started when it was queued
    assert sorted(r.status_code for r, _ in out) == [400, 400]
    assert max(took for _, took in out) < 2.0 + SLACK + 0.5, out


def test_sigterm_does_not_wait_for_a_trickling_download(tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    trick = Trickler(slow_body)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastvlm", "serve", "--port", str(port), "--fetch-timeout", "3"]
    cmd += ["--allowed-media-domains", "127.0.0.1", "--engine", "reference"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, "server exited"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        body = {**_image_body(trick.url()), "model": "fastvlm-tiny"}
        client = threading.Thread(
            target=lambda: httpx.post(url + "/v1/chat/completions", json=body, timeout=60),
            daemon=True,
        )
        client.start()
        time.sleep(1.0)  # the download is trickling now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        trick.close()
    assert rc in (0, -signal.SIGTERM), rc  # uvicorn re-raises the signal it handled
    assert took < 3 + SLACK + 2.0, f"shutdown took {took:.1f} s"


def test_a_data_url_needs_no_network_and_no_deadline():
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    assert media.load_media_image(url, policy(fetch_timeout_s=0.001)).size == (16, 16)
