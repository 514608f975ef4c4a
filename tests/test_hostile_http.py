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

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hostile_util import (  # noqa: E402
    CHAT,
    HeldVLM,
    _complete,
    by_status,
    metrics,
    raw_request,
    status_delta,
)
from test_server import LiveServer, body, image_msg  # noqa: E402

from fastvlm.api import load  # noqa: E402
from fastvlm.server.app import ServerConfig, create_app  # noqa: E402
from fastvlm.server.serving import ServeLimits  # noqa: E402

CAP = 64 * 1024  # --max-request-mb of the server under test, in bytes


pytestmark = pytest.mark.usefixtures("module_netguard")  # nothing leaves loopback


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


# ---------------------------------------------------------------------- read deadline (slowloris)
DEADLINE = 2.0  # --request-read-timeout of `slow_srv`
BOUND = DEADLINE + 1.0  # every slow client is answered or closed within this
CHUNKED = "Transfer-Encoding: chunked\r\n"


@pytest.fixture(scope="module")
def slow_srv():
    from fastvlm.server.deadline import read_deadline_protocol

    cfg = ServerConfig(request_read_timeout=DEADLINE)
    spy = HeldVLM(load(None))  # generations can be held past the deadline
    s = LiveServer(create_app(cfg, vlm=spy), http=read_deadline_protocol(DEADLINE))
    s.spy = spy
    s.wait_ready()
    yield s
    s.stop()


def _read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or `limit` s pass), and when it closed."""
    s.settimeout(limit)
    buf, t0 = b"", time.monotonic()
    try:
        while part := s.recv(65536):
            buf += part
    except TimeoutError:
        return buf, float("inf")
    except ConnectionResetError:
        pass
    return buf, time.monotonic() - t0


def _stalled(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


STALLS = [  # (name, bytes sent before stalling, expected status: None = closed without answer)
    ("idle new connection", b"", None),
    ("half a request line", b"POST /v1/chat/compl", 408),
    ("headers never finished", post_head(100)[:-2], 408),
    ("body never started", post_head(100), 408),
    ("one body byte", post_head(100) + b"{", 408),
    ("body stalled after 40 bytes", post_head(len(VALID)) + VALID[:40], 408),
    ("chunked body stalled", post_head(None, CHUNKED) + b'a\r\n{"m', 408),
    ("unread body on a 404", b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{", 404),
    ("unread body on a GET", b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{", 200),
]


@pytest.mark.parametrize("name, data, status", STALLS, ids=[s[0] for s in STALLS])
def test_stalled_request_is_answered_or_closed_by_the_deadline(slow_srv, name, data, status):
    """Each stalled phase (no bytes, partial headers, partial or unread body) ends by the
    read deadline: a 408 `request_timeout` OpenAI error (or the route's answer for a body it
    never reads) and a closed connection, not an open socket for as long as the client likes."""
    t0 = time.monotonic()
    s = _stalled(slow_srv.port, data)
    try:
        raw, _ = _read_until_closed(s, 15)
    finally:
        s.close()
    took = time.monotonic() - t0
    assert took <= BOUND, f"{name}: open for {took:.1f} s"
    if status is None:
        assert raw == b"", raw[:200]
        assert took >= DEADLINE - 0.2, f"closed after {took:.1f} s, before the deadline"
        return
    assert raw.startswith(b"HTTP/1.1 %d" % status), raw[:300]
    if status == 408:
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert b"connection: close" in head.lower()
        err = json.loads(payload)["error"]
        assert err["code"] == "request_timeout" and set(err) == {"message", "type", "param", "code"}
        assert took >= DEADLINE - 0.2, f"408 after {took:.1f} s, before the deadline"


@pytest.mark.parametrize(
    "name, head, rest",
    [
        ("body at 4 bytes/s", post_head(len(VALID)), VALID),
        ("headers at 4 bytes/s", post_head(len(VALID)), b""),
        ("chunked body at 4 bytes/s", post_head(None, CHUNKED), b"1\r\n{\r\n" * 40),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_trickled_request_is_cut_at_the_deadline(slow_srv, name, head, rest):
    """Bytes that keep coming do not extend the deadline: it is per request, not per read."""
    s = socket.create_connection(("127.0.0.1", slow_srv.port), timeout=10)
    slow, fast = (rest, head) if rest else (head, b"")
    t0 = time.monotonic()
    try:
        s.sendall(fast)
        for i in range(len(slow)):
            try:
                s.sendall(slow[i : i + 1])
            except OSError:  # closed by the server
                break
            time.sleep(0.25)
            if time.monotonic() - t0 > BOUND + 2:
                break
        raw, _ = _read_until_closed(s, 5)
    finally:
        s.close()
    took = time.monotonic() - t0
    assert raw.startswith(b"HTTP/1.1 408"), raw[:300]
    assert b'"request_timeout"' in raw
    assert took <= BOUND + 0.3, f"{name}: cut after {took:.1f} s"  # + one pacing step


def test_keep_alive_connection_gets_a_new_deadline_per_request(slow_srv):
    """After one served request, a second one whose headers stall is cut like the first."""
    s = socket.create_connection(("127.0.0.1", slow_srv.port), timeout=10)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not _complete(first):
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost:")
        raw, _ = _read_until_closed(s, 15)
    finally:
        s.close()
    assert time.monotonic() - t0 <= BOUND
    assert raw == b"" or raw.startswith(b"HTTP/1.1 408"), raw[:200]


def test_request_within_the_deadline_is_served(slow_srv):
    """Pauses that add up to less than the deadline are fine: the deadline is not too eager."""
    s = socket.create_connection(("127.0.0.1", slow_srv.port), timeout=30)
    try:
        s.sendall(post_head(len(VALID))[:20])
        time.sleep(DEADLINE / 3)
        s.sendall(post_head(len(VALID))[20:] + VALID[:30])
        time.sleep(DEADLINE / 3)
        s.sendall(VALID[30:])
        raw = s.recv(65536)
    finally:
        s.close()
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_answer_slower_than_the_deadline_is_not_cut(slow_srv, stream):
    """The deadline bounds reading the request, not answering it: a generation that outlasts
    it (the route still watching for a disconnect meanwhile) completes normally."""
    got: list = []
    req = body([image_msg("hi")], max_tokens=2, stream=stream)
    slow_srv.spy.hold()
    try:
        t = threading.Thread(
            target=lambda: got.append(httpx.post(slow_srv.url + CHAT, json=req, timeout=30))
        )
        t.start()
        time.sleep(DEADLINE + 1.5)
    finally:
        slow_srv.spy.release()
    t.join(30)
    assert got and got[0].status_code == 200, got and got[0].text
    if stream:
        assert got[0].text.rstrip().endswith("data: [DONE]"), got[0].text[-300:]
    else:
        assert got[0].json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_many_slow_clients_at_once_do_not_delay_others(slow_srv):
    """30 slow clients of every kind at once: a normal request is still served promptly, and
    every slow connection is closed by the deadline (+ 1 s)."""
    before = metrics(slow_srv.url)
    kinds = [d for _, d, _ in STALLS]
    t0 = time.monotonic()
    socks = [_stalled(slow_srv.port, kinds[i % len(kinds)]) for i in range(30)]
    try:
        r = httpx.post(slow_srv.url + CHAT, json=body([image_msg("hi")], max_tokens=2), timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < DEADLINE, "the normal request waited for the slow ones"
        for s in socks:
            _read_until_closed(s, BOUND + 2)
            assert time.monotonic() - t0 <= BOUND + 0.5, "a slow connection outlived the bound"
    finally:
        for s in socks:
            s.close()
    assert_alive_and_no_5xx(slow_srv, before)


def test_serve_command_applies_the_read_deadline():
    """`fastvlm serve --request-read-timeout` wires the deadline into the real server."""
    from hostile_util import ServeProcess

    p = ServeProcess("--request-read-timeout", "1.5")
    try:
        for data in (b"", b"GET /health HTTP/1.1\r\n", post_head(100) + b"{"):
            t0 = time.monotonic()
            s = _stalled(p.port, data)
            try:
                raw, _ = _read_until_closed(s, 10)
            finally:
                s.close()
            assert time.monotonic() - t0 <= 2.5, data
            assert raw == b"" if not data else raw.startswith(b"HTTP/1.1 408"), raw[:200]
    finally:
        assert p.stop() == 0
