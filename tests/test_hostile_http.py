"""Hostile HTTP framing against `fastvlm serve`: lying Content-Length, chunked bodies over the
cap, malformed framing and headers, slow bodies. Raw sockets on 127.0.0.1 only, because no
client library sends these. Every case must end in a 4xx or a closed connection within a
bound, never a 5xx, and leave the server serving.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from conftest import guard_network

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hostile_util import CHAT, by_status, metrics, raw_request, status_delta  # noqa: E402
from test_server import LiveServer, body, image_msg  # noqa: E402

from fastvlm.api import load  # noqa: E402
from fastvlm.server.app import ServerConfig, create_app  # noqa: E402
from fastvlm.server.serving import ServeLimits  # noqa: E402

CAP = 64 * 1024  # --max-request-mb of the server under test, in bytes
VIOLATIONS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def netguard():
    with pytest.MonkeyPatch.context() as mp:
        guard_network(mp, VIOLATIONS)
        yield
    assert not VIOLATIONS


@pytest.fixture(scope="module")
def srv():
    cfg = ServerConfig(max_request_bytes=CAP, limits=ServeLimits(max_concurrency=1))
    s = LiveServer(create_app(cfg, vlm=load(None)))
    s.wait_ready()
    yield s
    s.stop()


def post_head(length: str | int | None, extra: str = "") -> bytes:
    cl = "" if length is None else f"Content-Length: {length}\r\n"
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{cl}{extra}\r\n"
    ).encode()


VALID = json.dumps(body([image_msg("hi")], max_tokens=2)).encode()


def assert_alive_and_no_5xx(srv, before: dict) -> None:
    r = httpx.post(srv.url + CHAT, json=body([image_msg("hi")], max_tokens=2), timeout=30)
    assert r.status_code == 200, r.text
    bad = {s: n for s, n in status_delta(metrics(srv.url), before).items() if s.startswith("5")}
    assert not bad, f"5xx counted in /metrics: {bad}"


# ---------------------------------------------------------------------- lying Content-Length
@pytest.mark.parametrize(
    "length, status",
    [(CAP + 1, 413), (10**12, 413), (2**63 - 1, 413), (10**30, 400), ("9" * 200, 400)],
)
def test_huge_content_length_with_small_body_is_refused_at_once(srv, length, status):
    """The cap is judged from the header: nothing is read, nobody waits for the body. Lengths
    past 64 bits never reach the app: the HTTP parser refuses them (400)."""
    before = metrics(srv.url)
    got, raw, took = raw_request(srv.port, post_head(length) + VALID, timeout=10)
    assert got == status, raw[:300]
    assert took < 3, f"{status} took {took:.1f} s"
    if status == 413:
        assert b'"request_too_large"' in raw
    assert_alive_and_no_5xx(srv, before)


# ---------------------------------------------------------------------- chunked over the cap
def _chunks(total: int, size: int) -> bytes:
    out = b""
    while total > 0:
        n = min(size, total)
        out += f"{n:x}\r\n".encode() + b"a" * n + b"\r\n"
        total -= n
    return out


@pytest.mark.parametrize(
    "name, payload",
    [
        ("many small chunks", _chunks(CAP + 4096, 1000) + b"0\r\n\r\n"),
        ("one chunk larger than the cap", _chunks(4 * CAP, 4 * CAP) + b"0\r\n\r\n"),
        ("over the cap, never terminated", _chunks(CAP + 10, 4096)),
        ("declared 4 GiB chunk, 2x cap sent", b"100000000\r\n" + b"a" * (2 * CAP)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_chunked_body_over_the_cap_is_413(srv, name, payload):
    """No Content-Length: the cap is counted while reading, and the 413 comes as soon as it
    is passed (also when the client never finishes the body)."""
    before = metrics(srv.url)
    head = post_head(None, "Transfer-Encoding: chunked\r\n")
    status, raw, took = raw_request(srv.port, head + payload, timeout=10)
    assert status == 413, (name, raw[:300])
    assert took < 5, f"{name}: 413 took {took:.1f} s"
    assert_alive_and_no_5xx(srv, before)


# ---------------------------------------------------------------------- malformed framing
BIG_HEADER = "X-Junk: " + "a" * 200_000 + "\r\n"
MANY_HEADERS = "".join(f"X-H{i}: v\r\n" for i in range(5000))
# (name, bytes, whether a normal answer is also acceptable: the framing is legal HTTP)
MALFORMED = [
    ("negative content-length", post_head(-1) + VALID),
    ("non-numeric content-length", post_head("12abc") + VALID),
    ("two conflicting content-lengths", post_head(len(VALID), "Content-Length: 3\r\n") + VALID),
    (
        "content-length and chunked",
        post_head(len(VALID), "Transfer-Encoding: chunked\r\n")
        + _chunks(len(VALID), 64)
        + b"0\r\n\r\n",
        True,  # RFC 9112: chunked wins over Content-Length
    ),
    ("unknown transfer-encoding", post_head(None, "Transfer-Encoding: gzip\r\n") + VALID),
    ("bad chunk size", post_head(None, "Transfer-Encoding: chunked\r\n") + b"zz\r\nab\r\n"),
    (
        "chunk size overflows 64 bits",
        post_head(None, "Transfer-Encoding: chunked\r\n") + b"f" * 40 + b"\r\na\r\n",
    ),
    ("200 KB header line", post_head(len(VALID), BIG_HEADER) + VALID),
    ("5000 headers", post_head(len(VALID), MANY_HEADERS) + VALID, True),
    ("100 KB request target", f"GET /{'a' * 100_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
    ("header without colon", post_head(len(VALID), "NoColonHere\r\n") + VALID),
    ("TLS client hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("NUL in request line", b"POST /v1/chat/\x00completions HTTP/1.1\r\nHost: x\r\n\r\n"),
]


MALFORMED = [m if len(m) == 3 else (*m, False) for m in MALFORMED]


def _ok(status, legal: bool) -> bool:
    return status is None or 400 <= status < 500 or (legal and status == 200)


@pytest.mark.parametrize("name, data, legal", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_framing_is_4xx_or_closed(srv, name, data, legal):
    before = metrics(srv.url)
    status, raw, took = raw_request(srv.port, data, timeout=10)
    assert _ok(status, legal), (name, raw[:300])
    assert took < 5, f"{name}: the server held the connection {took:.1f} s"
    assert_alive_and_no_5xx(srv, before)


# ---------------------------------------------------------------------- slow bodies
def test_trickled_body_is_served(srv):
    """A slow but honest client (one byte every 5 ms) still gets its answer."""
    small = json.dumps(
        {"model": "fastvlm-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).encode()
    status, raw, _ = raw_request(srv.port, post_head(len(small)) + small, timeout=30, pace=0.005)
    assert status == 200, raw[:300]


def _stall(port: int, declared: int, sent: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(post_head(declared) + sent)
    return s


@pytest.mark.parametrize("n", [4, 16])
def test_stalled_bodies_take_no_slot_and_leave_no_5xx(srv, n):
    """Clients that send half a body and stall neither block other clients (max_concurrency is
    1 here: a stalled body holds no admission slot) nor turn into 5xx when they finally go."""
    before = metrics(srv.url)
    stalled = [_stall(srv.port, 1000, VALID[: 10 + i]) for i in range(n)]
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        r = httpx.post(srv.url + CHAT, json=body([image_msg("hi")], max_tokens=4), timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 10
        assert httpx.get(srv.url + "/health").status_code == 200
        assert srv.service.admitted == 0
    finally:
        for s in stalled:
            s.close()
    time.sleep(0.5)
    assert_alive_and_no_5xx(srv, before)


def test_disconnect_mid_body_is_not_a_server_error(srv, caplog):
    """A client that dies half-way through its body is the client's problem: no 500 in
    /metrics and no traceback logged (issue 17 item 4 / 5 classes)."""
    before = metrics(srv.url)
    socks = [_stall(srv.port, 5000, VALID[: 20 * (i + 1)]) for i in range(3)]
    time.sleep(0.3)
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST
    time.sleep(0.5)
    assert_alive_and_no_5xx(srv, before)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_many_parallel_hostile_connections_then_normal_service(srv):
    """A mixed flood of the cases above from 24 connections at once; afterwards the server
    answers normally and counted no 5xx."""
    before = metrics(srv.url)
    cases = [(d, legal) for _, d, legal in MALFORMED] + [(post_head(10**12) + VALID, False)]
    results: list = []

    def one(data: bytes, legal: bool) -> None:
        results.append(_ok(raw_request(srv.port, data, timeout=15)[0], legal))

    threads = [threading.Thread(target=one, args=cases[i % len(cases)]) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 24
    assert all(results), results
    assert_alive_and_no_5xx(srv, before)
    assert by_status(metrics(srv.url)).get("500", 0) == 0


# ---------------------------------------------------------------------- invalid unicode
def _chat_raw(messages: str) -> bytes:
    return b'{"model": "fastvlm-tiny", "max_tokens": 2, "messages": [' + messages.encode() + b"]}"


SURROGATES = [
    ("user string", _chat_raw(r'{"role": "user", "content": "a\ud800b"}')),
    (
        "system string",
        _chat_raw(
            r'{"role": "system", "content": "\udfff"}, '
            r'{"role": "user", "content": "hi"}'
        ),
    ),
    ("text part", _chat_raw(r'{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}')),
    (
        "assistant history",
        _chat_raw(
            r'{"role": "user", "content": "hi"}, '
            r'{"role": "assistant", "content": "\udc00"}, '
            r'{"role": "user", "content": "again"}'
        ),
    ),
]


@pytest.mark.parametrize("name, raw", SURROGATES, ids=[s[0] for s in SURROGATES])
def test_lone_surrogate_in_text_is_400(srv, name, raw):
    r = httpx.post(srv.url + CHAT, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, (name, r.status_code)
    assert r.json()["error"]["message"]
