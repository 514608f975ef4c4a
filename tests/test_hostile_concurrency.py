"""Overload and disconnects against `fastvlm serve` (in-process uvicorn, 127.0.0.1, the demo
model): bursts past `--max-concurrency` get exactly the expected 200 / 429 split, each 429 with
Retry-After; clients that vanish mid-stream, mid-wait or before the first token cancel their
generation, are counted in /metrics, and give their slot back (a full burst succeeds after).

Determinism: admitted requests are held at a gate in front of the real model (`HeldVLM`), so
"in flight" does not depend on how fast this machine decodes; a per-chunk delay makes "long"
generations long on any machine.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hostile_util import CHAT, HeldVLM, metrics, status_delta, wait_idle  # noqa: E402
from test_server import LiveServer, body, data_url, image_msg, png  # noqa: E402

from fastvlm.api import load  # noqa: E402
from fastvlm.server.app import ServerConfig, create_app  # noqa: E402
from fastvlm.server.serving import ServeLimits  # noqa: E402

LONG = 900  # max_tokens of a "long" generation (ignore_eos: it would yield all of them)


pytestmark = pytest.mark.usefixtures("module_netguard")  # nothing leaves loopback


@pytest.fixture(scope="module")
def model():
    return load(None)


class Server:
    """A LiveServer around a HeldVLM with `max_concurrency=k`; stopped on exit."""

    def __init__(self, model, k: int, spy: HeldVLM | None = None) -> None:
        self.k = k
        self.spy = spy or HeldVLM(model)
        cfg = ServerConfig(limits=ServeLimits(max_concurrency=k))
        self.live = LiveServer(create_app(cfg, vlm=self.spy))
        self.live.wait_ready()
        self.url = self.live.url
        self.port = self.live.port

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.spy.release()
        self.live.stop()


def short(stream: bool = False, i: int = 0) -> dict:
    color = (40 * i % 256, 200, 90)
    return body([image_msg("Describe.", data_url(png(color)))], max_tokens=6, stream=stream)


def long_req(stream: bool) -> dict:
    return body(
        [image_msg("Describe this image.")], max_tokens=LONG, ignore_eos=True, stream=stream
    )


def send(url: str, b: dict, timeout: float = 60) -> tuple[int, dict, str]:
    if b.get("stream"):
        with httpx.stream("POST", url + CHAT, json=b, timeout=timeout) as r:
            return r.status_code, dict(r.headers), r.read().decode()
    r = httpx.post(url + CHAT, json=b, timeout=timeout)
    return r.status_code, dict(r.headers), r.text


def assert_slots_free(srv: Server, cancelled_before: float, cancelled: int | None) -> None:
    """Cancellations counted exactly, gauges back to 0, a burst of exactly max_concurrency
    requests served in full (no slot leaked), and the engine idle after it."""
    assert srv.live.service.gen_lock is None  # the shared-engine path, as in production
    wait_idle(srv.live)
    m = metrics(srv.url)
    if cancelled is not None:
        assert m["fastvlm_requests_cancelled_total"] - cancelled_before == cancelled
    assert m["fastvlm_requests_running"] == 0 and m["fastvlm_queue_depth"] == 0
    with ThreadPoolExecutor(srv.k) as pool:
        got = list(pool.map(lambda i: send(srv.url, short(i % 2 == 0, i))[0], range(srv.k)))
    assert got == [200] * srv.k, got
    # a cancelled row is reaped at the engine's next step: after the burst none is left
    engine = srv.spy.engine
    deadline = time.time() + 10
    while engine.has_work() and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.has_work(), "the engine still holds a request"
    wait_idle(srv.live)


# ---------------------------------------------------------------------- bursts
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["plain", "stream", "mixed"])
def test_burst_past_max_concurrency_gets_exact_429s(model, k, mode):
    n = 8
    with Server(model, k) as srv:
        before = metrics(srv.url)
        srv.spy.hold()
        reqs = [short(mode == "stream" or (mode == "mixed" and i % 2 == 1), i) for i in range(n)]
        results: list = []
        lock = threading.Lock()

        def one(b):
            res = send(srv.url, b)
            with lock:
                results.append(res)

        threads = [threading.Thread(target=one, args=(b,)) for b in reqs]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while len(results) < n - k and time.time() < deadline:
            time.sleep(0.01)
        # the k admitted requests are held at the gate; everything else was refused at once
        with lock:
            refused = list(results)
        assert len(refused) == n - k, f"{len(refused)} answered while {k} are held"
        assert srv.live.service.admitted == k
        for status, headers, text in refused:
            assert status == 429, text[:300]
            assert headers.get("retry-after") == "1", headers
            err = json.loads(text)["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "server_busy"
        srv.spy.release()
        for t in threads:
            t.join(60)
        statuses = sorted(r[0] for r in results)
        assert statuses == [200] * k + [429] * (n - k)
        for status, _, text in results:
            if status == 200:
                assert '"content"' in text
        assert status_delta(metrics(srv.url), before) == {"200": k, "429": n - k}
        assert_slots_free(srv, before["fastvlm_requests_cancelled_total"], 0)


# ---------------------------------------------------------------------- disconnects
def _read_frames(r, n: int) -> None:
    """Read until `n` content frames have arrived (0: just the opening role frame)."""
    got = 0
    for line in r.iter_lines():
        if not line.startswith("data: {"):
            continue
        if n == 0 or ('"content":"' in line and '"role"' not in line and (got := got + 1) >= n):
            return


@pytest.mark.parametrize("after", [0, 1, 25])
def test_sse_disconnect_mid_stream_stops_generation(model, after):
    with Server(model, 2) as srv:
        srv.spy.delay = 0.002  # LONG chunks take ≥ 1.8 s: the disconnect always comes first
        c0 = metrics(srv.url)["fastvlm_requests_cancelled_total"]
        with httpx.stream("POST", srv.url + CHAT, json=long_req(True), timeout=60) as r:
            assert r.status_code == 200
            _read_frames(r, after)
        wait_idle(srv.live)
        assert srv.spy.closed == [True], "the generation was not closed early"
        assert srv.spy.yielded[0] < LONG
        srv.spy.delay = 0.0
        assert_slots_free(srv, c0, 1)


@pytest.mark.parametrize("k", [2, 4])
def test_simultaneous_sse_disconnects_all_counted(model, k):
    with Server(model, k) as srv:
        srv.spy.delay = 0.002
        c0 = metrics(srv.url)["fastvlm_requests_cancelled_total"]
        ready = threading.Barrier(k + 1, timeout=60)

        def one(i):
            with httpx.stream("POST", srv.url + CHAT, json=long_req(True), timeout=60) as r:
                assert r.status_code == 200
                _read_frames(r, 1 + i)
                ready.wait()  # every stream is in flight before any goes away

        with ThreadPoolExecutor(k) as pool:
            futs = [pool.submit(one, i) for i in range(k)]
            ready.wait()
            for f in futs:
                f.result()
        wait_idle(srv.live)
        assert srv.spy.closed == [True] * k
        assert max(srv.spy.yielded) < LONG
        srv.spy.delay = 0.0
        assert_slots_free(srv, c0, k)


def _raw_post(port: int, b: dict) -> socket.socket:
    data = json.dumps(b).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    s.sendall(head + data)
    return s


def _close(s: socket.socket, how: str) -> None:
    if how == "reset":  # SO_LINGER 0: the peer sees RST, not FIN
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_non_stream_disconnect_mid_generation_stops_it(model, how):
    with Server(model, 2) as srv:
        srv.spy.delay = 0.005  # LONG chunks take ≥ 4.5 s
        before = metrics(srv.url)
        s = _raw_post(srv.port, long_req(False))
        deadline = time.time() + 30
        while (not srv.spy.yielded or srv.spy.yielded[0] < 5) and time.time() < deadline:
            time.sleep(0.01)
        _close(s, how)
        wait_idle(srv.live)
        assert srv.spy.closed == [True] and srv.spy.yielded[0] < LONG
        srv.spy.delay = 0.0
        assert_slots_free(srv, before["fastvlm_requests_cancelled_total"], 1)
        assert "500" not in status_delta(metrics(srv.url), before)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_first_token_frees_slots(model, stream):
    """Clients that leave while their requests wait for a first token (held at the gate): the
    generations stop right after the gate opens and no slot stays taken."""
    k = 3
    with Server(model, k) as srv:
        before = metrics(srv.url)
        srv.spy.delay = 0.005  # LONG chunks take ≥ 4.5 s once the gate opens
        srv.spy.hold()
        socks = [_raw_post(srv.port, long_req(stream)) for _ in range(k)]
        deadline = time.time() + 30
        while srv.spy.started < k and time.time() < deadline:
            time.sleep(0.01)
        assert srv.spy.started == k and srv.live.service.admitted == k
        for i, s in enumerate(socks):
            _close(s, "reset" if i % 2 else "close")
        time.sleep(0.8)  # non-streaming requests notice a disconnect within 0.5 s
        srv.spy.release()
        wait_idle(srv.live)
        assert srv.spy.closed == [True] * k
        assert max(srv.spy.yielded) < LONG, srv.spy.yielded
        srv.spy.delay = 0.0
        assert_slots_free(srv, before["fastvlm_requests_cancelled_total"], k)


# ---------------------------------------------------------------------- failing generations
class FailingVLM(HeldVLM):
    """The real model, but generation raises `exc` after `after` chunks."""

    def __init__(self, real, exc: BaseException, after: int) -> None:
        super().__init__(real)
        self.exc, self.after = exc, after

    def stream_chunks(self, messages, **sampling):
        for i, c in enumerate(super().stream_chunks(messages, **sampling)):
            if i == self.after:
                raise self.exc
            yield c


FAILURES = [
    (ValueError("bad input found late"), 400),
    (RuntimeError("engine broke"), 500),
]


def _failing(model, exc, after: int) -> Server:
    return Server(model, 2, FailingVLM(model, exc, after))


def _fail_once(srv: Server, stream: bool) -> tuple[int, str]:
    status, _, text = send(srv.url, long_req(stream))
    srv.spy.exc, srv.spy.after = None, -1  # the slot check that follows must succeed
    return status, text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("exc, status", FAILURES, ids=["ValueError", "RuntimeError"])
def test_generation_error_frees_its_slot(model, exc, status, stream):
    with _failing(model, exc, 3) as srv:
        c0 = metrics(srv.url)["fastvlm_requests_cancelled_total"]
        got, text = _fail_once(srv, stream)
        if stream:  # the 200 was sent before the error: it is reported in-band
            assert got == 200 and '"error"' in text and text.endswith("data: [DONE]\n\n")
        else:
            assert got == status and json.loads(text)["error"]["message"], text
        assert_slots_free(srv, c0, None)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("exc, status", FAILURES, ids=["ValueError", "RuntimeError"])
def test_generation_error_is_not_counted_as_cancelled(model, exc, status, stream):
    with _failing(model, exc, 3) as srv:
        c0 = metrics(srv.url)["fastvlm_requests_cancelled_total"]
        _fail_once(srv, stream)
        wait_idle(srv.live)
        assert metrics(srv.url)["fastvlm_requests_cancelled_total"] == c0


class BrokenVLM(HeldVLM):
    """The real model whose processor fails unexpectedly (a server bug, not a client error)."""

    @property
    def processor(self):
        raise RuntimeError("processor broke")


def _internal_error(model, stream: bool) -> tuple[int, dict, dict]:
    with Server(model, 2, BrokenVLM(model)) as srv:
        before = metrics(srv.url)
        status, _, text = send(srv.url, short(stream))
        wait_idle(srv.live)
        return status, json.loads(text), status_delta(metrics(srv.url), before)


@pytest.mark.parametrize("stream", [False, True])
def test_internal_error_is_a_500_error_object(model, stream):
    status, err, _ = _internal_error(model, stream)
    assert status == 500 and err["error"]["code"] == "internal", err
    assert "processor broke" not in json.dumps(err)  # no internals in the answer


@pytest.mark.parametrize("stream", [False, True])
def test_internal_error_is_counted_as_500(model, stream):
    _, _, delta = _internal_error(model, stream)
    assert delta == {"500": 1}, delta
