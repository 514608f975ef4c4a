"""Helpers shared by the hostile-input suite (tests/test_hostile_*.py).

The in-process server (`LiveServer`), the request builders and the chunk-counting model spy
come from tests/test_server.py so both suites start servers the same way; this file adds what
only the hostile tests need: a model whose generations can be held at a gate (exact 429
counts without timing luck), raw-socket HTTP for requests no client library will send, a
`fastvlm serve` subprocess with an RSS probe, and /metrics parsing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from test_server import _SpyVLM

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"


class HeldVLM(_SpyVLM):
    """The real model behind a gate: every generation waits (bounded) until `release()`, so
    the requests a test admits stay in flight exactly as long as the test needs."""

    def __init__(self, real) -> None:
        super().__init__(real)
        self.gate = threading.Event()
        self.gate.set()
        self.started = 0  # generations that reached the model

    @property
    def engine(self):  # as on FastVLM: the service then batches requests instead of locking
        return self._real.engine

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def stream_chunks(self, messages, **sampling):
        self.started += 1
        self.gate.wait(60)  # bounded: a broken test never hangs the suite
        yield from super().stream_chunks(messages, **sampling)


# ---------------------------------------------------------------------- /metrics
def metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    """Every sample of /metrics as {name or name{labels}: value}."""
    out = {}
    for line in httpx.get(url + "/metrics", headers=headers or {}).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def by_status(m: dict[str, float]) -> dict[str, float]:
    """requests_total per HTTP status from a `metrics()` dict."""
    pat = re.compile(r'fastvlm_requests_total\{status="(\d+)"\}')
    return {mt.group(1): v for k, v in m.items() if (mt := pat.fullmatch(k))}


def status_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    a, b = by_status(before), by_status(after)
    return {s: int(a[s] - b.get(s, 0)) for s in a if a[s] != b.get(s, 0)}


def wait_idle(srv, timeout: float = 30) -> None:
    """Until the service has no admitted request, no run and no generation thread."""
    svc = srv.service
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = [t for t in threading.enumerate() if t.name.startswith("gen-")]
        if not busy and not svc.runs and svc.admitted == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"still busy: admitted={svc.admitted} runs={len(svc.runs)}")


# ---------------------------------------------------------------------- raw HTTP
def raw_request(port: int, data: bytes, timeout: float = 10, pace: float = 0.0) -> tuple:
    """Send `data` on a fresh connection (optionally one byte per `pace` s) and read until the
    server closes or answers. Returns (status or None, raw response, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            if pace:
                for i in range(len(data)):
                    s.sendall(data[i : i + 1])
                    time.sleep(pace)
            else:
                s.sendall(data)
        except OSError:  # the server may answer and close before it has read everything
            pass
        buf = b""
        try:
            while b"\r\n\r\n" not in buf or not _complete(buf):
                part = s.recv(65536)
                if not part:
                    break
                buf += part
        except (TimeoutError, ConnectionResetError):
            pass
    m = re.match(rb"HTTP/1\.[01] (\d{3})", buf)
    return (int(m.group(1)) if m else None), buf, time.monotonic() - t0


def _complete(buf: bytes) -> bool:
    head, _, rest = buf.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return m is not None and len(rest) >= int(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- subprocess server
class ServeProcess:
    """`python -m fastvlm serve` on a free 127.0.0.1 port, with this checkout first on the path."""

    def __init__(self, *args: str, ready_s: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "fastvlm", "serve", "--port", str(self.port), *args]
        self.log = open(os.devnull, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + ready_s
        while time.time() < deadline:
            assert self.proc.poll() is None, "fastvlm serve exited during start-up"
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("fastvlm serve never became ready")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode
