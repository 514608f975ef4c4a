"""`fastvlm serve` end to end: a real uvicorn server on 127.0.0.1 (random port, in a thread)
with the embedded tiny model, driven by the official `openai` client, raw HTTP and headless
Chromium (schemathesis runs: test_server_fuzz.py).

Network rule: nothing here may send a packet outside 127.0.0.0/8 and [::1]. A module-wide
guard makes resolving any other name fail and records any connect() to another address; the
last test asserts the record is empty.
"""

from __future__ import annotations

import base64
import http.server
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import guard_network

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from fastvlm.server.app import ServerConfig, create_app  # noqa: E402
from fastvlm.server.media import MediaPolicy  # noqa: E402
from fastvlm.server.serving import ServeLimits  # noqa: E402

MODEL = "fastvlm-tiny"
VIOLATIONS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def netguard():
    with pytest.MonkeyPatch.context() as mp:
        guard_network(mp, VIOLATIONS)
        yield


class LiveServer:
    """uvicorn in a thread on a pre-bound 127.0.0.1 socket (no port race)."""

    def __init__(self, app, graceful_s: float | None = None, http=None) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=graceful_s,
            **({"http": http} if http is not None else {}),  # e.g. the read-deadline protocol
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if httpx.get(self.url + "/health").status_code == 200:
                return
            time.sleep(0.1)
        raise AssertionError("server never became ready")

    @property
    def service(self):
        return self.app.state.fastvlm["service"]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def live():
    """The default configuration; the model loads in the lifespan (not passed in)."""
    srv = LiveServer(create_app(ServerConfig()))
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def vlm(live):
    return live.service.vlm


def png(color=(200, 30, 30), size=(48, 40)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "PNG")
    return b.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_msg(text: str, *urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def body(messages, **kw) -> dict:
    return {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 12, **kw}


def to_internal(messages: list[dict]) -> list[dict]:
    """OpenAI messages with data URLs → the library's messages with PIL images."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = [
                {
                    "type": "image",
                    "image": Image.open(
                        io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))
                    ).convert("RGB"),
                }
                if p["type"] == "image_url"
                else p
                for p in c
            ]
        out.append({"role": m["role"], "content": c})
    return out


def sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n"), "SSE stream must end with a blank line"
    events = text[:-2].split("\n\n")
    for e in events:
        assert e.startswith("data: ") and "\n" not in e, f"bad SSE frame {e[:80]!r}"
    return [e[6:] for e in events]


# ---------------------------------------------------------------------- basics
def test_health_models_metrics(live):
    r = httpx.get(live.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(live.url + "/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    r = httpx.get(live.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in (
        "fastvlm_requests_total",
        "fastvlm_generation_tokens_total",
        "fastvlm_queue_depth",
        "fastvlm_time_to_first_token_seconds_bucket",
        "fastvlm_request_latency_seconds_count",
    ):
        assert name in r.text
    assert httpx.get(live.url + "/openapi.json").json()["paths"]["/v1/chat/completions"]


def test_not_ready_until_loaded(monkeypatch, vlm):
    import fastvlm.api

    gate = threading.Event()

    def slow_load(*a, **k):
        gate.wait(30)
        return vlm

    monkeypatch.setattr(fastvlm.api, "load", slow_load)
    srv = LiveServer(create_app(ServerConfig()))
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(srv.url + "/v1/chat/completions", json=body([image_msg("hi")]))
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        srv.wait_ready(30)
        r = httpx.post(srv.url + "/v1/chat/completions", json=body([image_msg("hi")]))
        assert r.status_code == 200
    finally:
        gate.set()
        srv.stop()


# ---------------------------------------------------------------------- openai client
def test_openai_client_non_streaming(live, vlm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    messages = [image_msg("Describe this image.", data_url(png()))]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    # Same text as the library gives for the same input.
    expected = vlm.chat(to_internal(messages), max_tokens=16, temperature=0)
    assert r.choices[0].message.content == expected and expected
    # Usage: prompt_tokens counts the image placeholders (16 per image for the tiny model).
    ids, _ = vlm.encode(to_internal(messages))
    assert ids.count(vlm.image_token_id) == vlm.num_image_tokens == 16
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.prompt_tokens_details.image_tokens == 16
    n_gen = len(vlm.tokenizer.encode(expected, add_special_tokens=False).ids)
    assert 1 <= r.usage.completion_tokens <= 16
    assert abs(r.usage.completion_tokens - n_gen) <= 1  # EOS is counted, not shown
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16


def test_openai_client_streaming_with_usage(live, vlm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    messages = [image_msg("What colour is it?", data_url(png((20, 200, 20))))]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] in (["stop"], ["length"]) and finishes[-1]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    ids, _ = vlm.encode(to_internal(messages))
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert text == vlm.chat(to_internal(messages), max_tokens=20, temperature=0)
    # the non-streaming endpoint agrees
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_raw_sse_framing(live):
    b = body([image_msg("Describe this image.", data_url(png()))], stream=True, max_tokens=8)
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=b) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and raw.endswith(b"data: [DONE]\n\n")
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in objs[0]  # only with stream_options.include_usage
    assert all(o["object"] == "chat.completion.chunk" and o["model"] == MODEL for o in objs)
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(o["choices"][0]["finish_reason"] is None for o in objs[:-1])


def test_multi_image_multi_turn_system_stop(live, vlm):
    red, blue = data_url(png((220, 20, 20))), data_url(png((20, 20, 220), (30, 60)))
    messages = [
        {"role": "system", "content": "You describe shapes."},
        image_msg("Compare these.", red, blue),
        {"role": "assistant", "content": "Two shapes."},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "And now?"},
                {"type": "input_image", "image_url": red},
            ],
        },
    ]
    r = httpx.post(
        live.url + "/v1/chat/completions",
        json=body(messages, max_completion_tokens=10, seed=3, top_p=0.9, user="u1"),
    )
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    internal = to_internal(messages)
    internal[3]["content"] = [
        {"type": "text", "text": "And now?"},
        {"type": "image", "image": internal[1]["content"][0]["image"]},
    ]
    ids, pixels = vlm.encode(internal)
    assert pixels.shape[0] == 3 and ids.count(vlm.image_token_id) == 48
    assert u["prompt_tokens"] == len(ids) and u["prompt_tokens_details"]["image_tokens"] == 48
    assert u["completion_tokens"] <= 10
    # stop strings: the text is cut before the stop string
    full = httpx.post(live.url + "/v1/chat/completions", json=body(messages, max_tokens=12))
    text = full.json()["choices"][0]["message"]["content"]
    if len(text) > 3:
        stop = text[2:4]
        r = httpx.post(
            live.url + "/v1/chat/completions", json=body(messages, max_tokens=12, stop=[stop])
        )
        c = r.json()["choices"][0]
        assert stop not in c["message"]["content"] and c["finish_reason"] == "stop"
        assert text.startswith(c["message"]["content"])


# ---------------------------------------------------------------------- hostile inputs


def _bomb() -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
        + chunk(b"IEND", b"")
    )


def _img(url: str) -> dict:
    return body([image_msg("Describe.", url)])


def _video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


HOSTILE = [
    ("malformed json", b'{"model": "fastvlm-tiny", "messages": [', 400, "invalid_json"),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("empty body", b"", 400, None),
    ("messages wrong type", {"model": MODEL, "messages": "hi"}, 400, "invalid_value"),
    (
        "content wrong type",
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        None,
    ),
    ("bad role", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("no messages", {"model": MODEL, "messages": []}, 400, None),
    (
        "missing model",
        {"messages": [{"role": "user", "content": "x"}]},
        400,
        "missing_required_parameter",
    ),
    ("max_tokens string", body([image_msg("x")], max_tokens="many"), 400, None),
    ("temperature string", body([image_msg("x")], temperature="hot"), 400, None),
    ("negative max_tokens", body([image_msg("x")], max_tokens=-5), 400, None),
    ("huge max_tokens", body([image_msg("x")], max_tokens=10**12), 400, "max_tokens_too_large"),
    (
        "max_tokens over context",
        body([image_msg("x")], max_tokens=4000),
        400,
        "context_length_exceeded",
    ),
    ("n=2", body([image_msg("x")], n=2), 400, "unsupported_parameter"),
    ("tools", body([image_msg("x")], tools=[{"type": "function"}]), 400, "unsupported_parameter"),
    ("logprobs", body([image_msg("x")], logprobs=True), 400, "unsupported_parameter"),
    ("unknown param", body([image_msg("x")], frobnicate=1), 400, "unsupported_parameter"),
    ("unknown model", {**body([image_msg("x")]), "model": "gpt-4o"}, 404, "model_not_found"),
    ("10 MB text", body([{"role": "user", "content": "a" * 10_000_000}]), 413, None),
    ("invalid base64", _img("data:image/png;base64,@@@not-base64@@@"), 400, None),
    ("non-image bytes", _img(data_url(b"MZ\x90\x00 definitely not an image" * 10)), 400, None),
    ("decompression bomb", _img(data_url(_bomb())), 413, None),
    ("loopback 127.0.0.1", _img("http://127.0.0.1:9/a.png"), 400, "media_url_refused"),
    ("loopback 127.1", _img("http://127.1:9/a.png"), 400, "media_url_refused"),
    ("loopback 2130706433", _img("http://2130706433:9/a.png"), 400, "media_url_refused"),
    ("loopback 0x7f000001", _img("http://0x7f000001:9/a.png"), 400, "media_url_refused"),
    ("loopback localhost", _img("http://localhost:9/a.png"), 400, "media_url_refused"),
    ("loopback [::1]", _img("http://[::1]:9/a.png"), 400, "media_url_refused"),
    (
        "mapped ::ffff:127.0.0.1",
        _img("http://[::ffff:127.0.0.1]:9/a.png"),
        400,
        "media_url_refused",
    ),
    (
        "metadata 169.254.169.254",
        _img("http://169.254.169.254/latest/meta-data/"),
        400,
        "media_url_refused",
    ),
    ("file:///etc/passwd", _img("file:///etc/passwd"), 400, "media_url_refused"),
    ("plain path", _img("/etc/passwd"), 400, "media_url_refused"),
    ("ftp url", _img("ftp://127.0.0.1/a.png"), 400, None),
    (
        "video_url garbage",  # invalid_video (or video_unsupported without PyAV)
        body(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
                    ],
                }
            ]
        ),
        400,
        None,
    ),
    (
        "video_url file:///etc/passwd",
        body([{"role": "user", "content": [_video("file:///etc/passwd")]}]),
        400,
        "media_url_refused",
    ),
    ("tokens_per_image=5", body([image_msg("x")], tokens_per_image=5), 400, "invalid_value"),
    ("fps=0", body([image_msg("x")], fps=0), 400, "invalid_value"),
    ("max_frames=0", body([image_msg("x")], max_frames=0), 400, "invalid_value"),
    (
        "image in assistant msg",
        body(
            [
                {
                    "role": "assistant",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(png())}}],
                }
            ]
        ),
        400,
        None,
    ),
    (
        "unknown part type",
        body([{"role": "user", "content": [{"type": "audio", "x": 1}]}]),
        400,
        None,
    ),
]


@pytest.mark.parametrize("name, payload, status, code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_inputs_get_4xx_and_server_survives(live, name, payload, status, code):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    r = httpx.post(
        live.url + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, (name, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_unknown_route_and_method_are_openai_errors(live):
    r = httpx.get(live.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(live.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# ---------------------------------------------------------------------- video, token reduction
needs_av = pytest.mark.skipif(
    importlib.util.find_spec("av") is None, reason="PyAV not installed (fastvlm[video])"
)
VIDEO_PROMPT = "What happens in this video?"


def make_clip(path: Path, seconds: float = 1.0, fps: int = 10, noise: bool = False) -> bytes:
    """An mp4 written with PyAV: 64x64 frames of a different colour each (or random noise,
    which compresses badly: a big file)."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            if noise:
                a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            else:
                a = np.zeros((64, 64, 3), np.uint8)
                a[..., i % 3] = (60 + 19 * i) % 256
                x = 4 * i % 40
                a[16:48, 8 + x : 24 + x] = 255  # a square moving right
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    if importlib.util.find_spec("av") is None:
        pytest.skip("PyAV not installed (fastvlm[video])")
    d = tmp_path_factory.mktemp("clips")
    return {
        "clip": make_clip(d / "clip.mp4"),
        "big": make_clip(d / "big.mp4", seconds=2, noise=True),
        "dir": d,
    }


def video_msg(url: str, text: str = VIDEO_PROMPT, *images: str) -> dict:
    parts = [{"type": "video_url", "video_url": {"url": url}}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def video_internal(clips, fps, max_frames: int, text: str = VIDEO_PROMPT) -> list[dict]:
    """The library's messages for the same clip, decoded by the library itself."""
    from fastvlm.video import read_frames, video_part

    frames = read_frames(clips["dir"] / "clip.mp4", fps=fps, max_frames=max_frames)
    return [{"role": "user", "content": [video_part(frames), {"type": "text", "text": text}]}]


def chat(url: str, payload: dict, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=payload, timeout=60, **kw)


@needs_av
def test_openai_client_video_data_url_counts_frames_times_tokens(live, vlm, clips):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    messages = [video_msg(data_url(clips["clip"], "video/mp4"))]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"max_frames": 4}
    )
    internal = video_internal(clips, None, 4)  # 4 frames spread over the 10
    ids, pixels = vlm.encode(internal)
    assert pixels.shape[0] == 4
    assert r.usage.prompt_tokens_details.image_tokens == 4 * 16
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == vlm.chat(internal, max_tokens=8, temperature=0)
    # fps sampling + token reduction, streamed: 5 frames (0.0, 0.2, ... 0.8 s) x 4 tokens
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"fps": 5, "tokens_per_image": 4},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    internal = video_internal(clips, 5, 16)
    ids, pixels = vlm.encode(internal, tokens_per_image=4)
    assert pixels.shape[0] == 5
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.image_tokens == 5 * 4
    assert usage.prompt_tokens == len(ids)
    assert text == vlm.chat(internal, tokens_per_image=4, max_tokens=8, temperature=0)


def test_tokens_per_image_reduces_prompt_tokens_and_is_validated(live, vlm):
    messages = [image_msg("Describe these.", data_url(png()), data_url(png((0, 0, 200))))]
    full = chat(live.url, body(messages, max_tokens=6))
    pooled = chat(live.url, body(messages, max_tokens=6, tokens_per_image=4))
    assert full.status_code == 200 and pooled.status_code == 200, pooled.text
    fu, pu = full.json()["usage"], pooled.json()["usage"]
    assert fu["prompt_tokens_details"]["image_tokens"] == 2 * 16
    assert pu["prompt_tokens_details"]["image_tokens"] == 2 * 4
    assert fu["prompt_tokens"] - pu["prompt_tokens"] == 2 * (16 - 4)
    internal = to_internal(messages)
    assert pu["prompt_tokens"] == len(vlm.encode(internal, tokens_per_image=4)[0])
    text = pooled.json()["choices"][0]["message"]["content"]
    assert text == vlm.chat(internal, tokens_per_image=4, max_tokens=6, temperature=0)
    native = chat(live.url, body(messages, max_tokens=6, tokens_per_image=16))
    assert native.json()["usage"] == fu  # the native count is the same as no pooling
    for bad in (5, 64, 0, -4):
        r = chat(live.url, body(messages, tokens_per_image=bad))
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert err["param"] == "tokens_per_image" and err["code"] == "invalid_value"
        assert "16, 9, 4, 1" in err["message"] and str(bad) in err["message"]
    r = chat(live.url, body(messages, tokens_per_image="four"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens_per_image"
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def video_http(clips):
    """A loopback HTTP server holding the clips (and a redirect to a loopback disguise)."""
    routes = {
        "/clip.mp4": (200, {"Content-Type": "video/mp4"}, clips["clip"]),
        "/big.mp4": (200, {"Content-Type": "video/mp4"}, clips["big"]),
        "/to-localhost": (302, {"Location": "http://localhost:PORT/clip.mp4"}, b""),
    }
    hits: list[str] = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            status, headers, data = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v.replace("PORT", str(httpd.server_address[1])))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.hits = hits
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def video_srv(vlm, clips):
    """127.0.0.1 allowed as a media host, a small video byte cap and 6 images per request."""
    cap = 4 * len(clips["clip"])
    assert len(clips["big"]) > cap
    cfg = ServerConfig(
        limits=ServeLimits(max_images=6),
        media=MediaPolicy(allowed_media_domains=["127.0.0.1"], max_video_bytes=cap),
    )
    srv = LiveServer(create_app(cfg, vlm=vlm))
    srv.wait_ready()
    yield srv
    srv.stop()


@needs_av
def test_video_over_the_byte_cap_is_413(video_srv, video_http, clips):
    """413 (as for images): the media is too large, not malformed; data URL and download."""
    for url in (data_url(clips["big"], "video/mp4"), video_http.url + "/big.mp4"):
        r = chat(video_srv.url, body([video_msg(url)], max_tokens=2))
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "video_too_large" and "limit" in err["message"]
    assert httpx.get(video_srv.url + "/health").json()["status"] == "ok"


@needs_av
def test_corrupt_video_is_400_and_server_survives(live, clips):
    for data in (b"\x00\x00\x00\x18ftypmp42 not a video" * 20, clips["clip"][:600]):
        r = chat(live.url, body([video_msg(data_url(data, "video/mp4"))], max_tokens=2))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_video"
        assert "fastvlm-video-" not in err["message"]  # no temporary path leaks
        assert httpx.get(live.url + "/health").json()["status"] == "ok"


@needs_av
def test_video_url_on_loopback_refused_unless_allowed(live, video_srv, video_http):
    url = video_http.url + "/clip.mp4"
    video_http.hits.clear()
    r = chat(live.url, body([video_msg(url)], max_tokens=2))  # default policy: SSRF guard
    assert r.status_code == 400 and r.json()["error"]["code"] == "media_url_refused"
    assert "loopback" in r.json()["error"]["message"]
    assert video_http.hits == []  # refused before connecting
    r = chat(video_srv.url, body([video_msg(url)], max_tokens=2, max_frames=3))
    assert r.status_code == 200, r.text  # 127.0.0.1 is allowed there
    assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 3 * 16
    r = chat(video_srv.url, body([video_msg(video_http.url + "/to-localhost")], max_tokens=2))
    assert r.status_code == 400 and r.json()["error"]["code"] == "media_url_refused"
    assert video_http.hits == ["/clip.mp4", "/to-localhost"]  # the redirect was not followed
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


@needs_av
def test_video_frames_count_against_the_image_limit(video_srv, clips):
    """video_srv allows 6 images per request."""
    url = data_url(clips["clip"], "video/mp4")
    img = data_url(png())
    # default max_frames fits the limit: 6 - 2 images = 4 frames
    r = chat(video_srv.url, body([video_msg(url, "Describe.", img, img)], max_tokens=2))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == (4 + 2) * 16
    for extra, param in (({"max_frames": 7}, "max_frames"), ({"max_frames": 5}, "messages")):
        r = chat(video_srv.url, body([video_msg(url, "Describe.", img, img)], **extra))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "too_many_images" and err["param"] == param, err
    bad_role = {"role": "assistant", "content": [_video(url)]}
    r = chat(video_srv.url, body([bad_role, {"role": "user", "content": "hi"}]))
    assert r.status_code == 400 and "user messages" in r.json()["error"]["message"]


def test_video_without_pyav_names_the_extra(live, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails, as without PyAV
    r = chat(live.url, body([video_msg("http://127.0.0.1:9/never-fetched.mp4")], max_tokens=2))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "video_unsupported" and "fastvlm[video]" in err["message"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


# ---------------------------------------------------------------------- concurrency
def test_eight_concurrent_streams_equal_sequential(live):
    colors = [
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (250, 250, 0),
        (0, 200, 200),
        (120, 0, 120),
        (255, 255, 255),
        (30, 30, 30),
    ]
    prompts = ["Describe this image.", "What shapes are there?", "Describe.", "Colours?"]
    reqs = [
        body(
            [image_msg(prompts[i % 4], data_url(png(c, (40 + 8 * i, 40))))],
            max_tokens=10 + 2 * i,
            stream=True,
        )
        for i, c in enumerate(colors)
    ]

    def run(b) -> str:
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=b, timeout=120) as r:
            assert r.status_code == 200
            events = sse_events(r.read())
        assert events[-1] == "[DONE]"
        return "".join(
            json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
        )

    sequential = [run(b) for b in reqs]
    peak, done = [0], threading.Event()

    def watch():  # how many requests produce tokens at the same time
        while not done.is_set():
            peak[0] = max(peak[0], live.service.metrics.running)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(run, reqs))
    finally:
        done.set()
        watcher.join()
    assert concurrent == sequential
    assert len(set(sequential)) > 1  # the inputs really differ
    if live.service.gen_lock is None:  # a shared engine: the requests really overlapped
        assert peak[0] > 1


def test_disconnect_cancels_engine_request(live, vlm):
    """On the shared-engine path: a client that goes away stops its decode."""
    engine = getattr(type(vlm), "engine", None) and vlm.engine
    if not engine:
        pytest.skip("this FastVLM has no shared engine")
    long = body(
        [image_msg("Describe this image.", data_url(png()))],
        max_tokens=900,
        ignore_eos=True,
        stream=True,
    )
    rows0 = engine.counters["decode_rows"]
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=long, timeout=60) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += '"content":"' in line
            if got == 4:
                break
    # Decoding stops (the cancelled row is dropped at the engine's next step) ...
    deadline, rows = time.time() + 30, -1
    while time.time() < deadline and engine.counters["decode_rows"] != rows:
        rows = engine.counters["decode_rows"]
        time.sleep(0.5)
    assert engine.counters["decode_rows"] == rows, "the engine still decodes for a gone client"
    assert rows - rows0 < 899
    # ... and the next request is served; afterwards the engine is idle (slot reaped).
    r = httpx.post(live.url + "/v1/chat/completions", json=body([image_msg("hi")]))
    assert r.status_code == 200
    assert not engine.has_work()


# ---------------------------------------------------------------------- strict server
class _SpyVLM:
    """Wraps the real FastVLM; counts the chunks each generation yields and whether it was
    closed early (proves a disconnect stops the model, not just the HTTP stream)."""

    def __init__(self, real) -> None:
        self._real = real
        self.yielded: list[int] = []
        self.closed: list[bool] = []
        self.delay = 0.0  # seconds per chunk: a slower model (the demo model decodes ~3k tok/s)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def stream_chunks(self, messages, **sampling):
        i = len(self.yielded)
        self.yielded.append(0)
        self.closed.append(False)
        finished = False
        try:
            for c in self._real.stream_chunks(messages, **sampling):
                self.yielded[i] += 1
                if self.delay:
                    time.sleep(self.delay)
                yield c
            finished = True
        finally:
            self.closed[i] = not finished


KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def image_server():
    img = png()
    routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, img),
        "/to-localhost": (302, {"Location": "http://localhost:PORT/ok.png"}, b""),
        "/to-ipv6": (302, {"Location": "http://[::1]:PORT/ok.png"}, b""),
    }
    hits: list[str] = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            status, headers, data = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v.replace("PORT", str(httpd.server_address[1])))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.hits = hits
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def strict(vlm):
    spy = _SpyVLM(vlm)
    cfg = ServerConfig(
        api_key=KEY,
        max_request_bytes=2 * 1024 * 1024,
        limits=ServeLimits(max_concurrency=1),
        media=MediaPolicy(allowed_media_domains=["127.0.0.1"]),
    )
    srv = LiveServer(create_app(cfg, vlm=spy))
    srv.spy = spy
    srv.wait_ready()
    yield srv
    srv.stop()


def test_api_key(strict):
    url = strict.url + "/v1/chat/completions"
    b = body([image_msg("hi")])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url, json=b, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(strict.url + "/v1/models").status_code == 401
    assert httpx.post(url, json=b, headers=AUTH).status_code == 200
    assert httpx.get(strict.url + "/health").status_code == 200  # no key needed
    openai = pytest.importorskip("openai")
    bad = openai.OpenAI(base_url=strict.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=strict.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == [MODEL]


def test_request_body_cap(strict):
    url = strict.url + "/v1/chat/completions"
    big = json.dumps(body([{"role": "user", "content": "a" * 3_000_000}])).encode()
    r = httpx.post(url, content=big, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the cap is enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = httpx.post(url, content=chunked(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(strict.url + "/health").status_code == 200


def test_redirect_from_local_server_to_loopback_refused(strict, image_server):
    port = image_server.server_address[1]
    url = strict.url + "/v1/chat/completions"
    ok = httpx.post(url, json=_img(f"http://127.0.0.1:{port}/ok.png"), headers=AUTH)
    assert ok.status_code == 200, ok.text  # 127.0.0.1 is allowed on this server
    for path in ("/to-localhost", "/to-ipv6"):
        image_server.hits.clear()
        r = httpx.post(url, json=_img(f"http://127.0.0.1:{port}{path}"), headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == "media_url_refused"
        assert "loopback" in r.json()["error"]["message"]
        assert image_server.hits == [path]  # the redirect target was never fetched
    assert httpx.get(strict.url + "/health").status_code == 200


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_disconnect_frees_slot_and_429_when_busy(strict):
    url = strict.url + "/v1/chat/completions"
    spy = strict.spy
    long = body(
        [image_msg("Describe this image.", data_url(png()))],
        max_tokens=900,
        ignore_eos=True,
        stream=True,
    )
    cancelled0 = _metric(strict.url, "fastvlm_requests_cancelled_total")
    n_before = len(spy.yielded)
    with httpx.stream("POST", url, json=long, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if '"content":"' in line and '"role"' not in line:
                got += 1
                if got == 3:
                    break
        # max_concurrency=1 and one stream in flight: the next request is refused at once
        busy = httpx.post(url, json=body([image_msg("hi")]), headers=AUTH)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
    # The client is gone: the generation must stop early and the slot come back.
    deadline = time.time() + 30
    while time.time() < deadline:
        if _metric(strict.url, "fastvlm_requests_cancelled_total") > cancelled0 and not [
            t for t in threading.enumerate() if t.name.startswith("gen-")
        ]:
            break
        time.sleep(0.05)
    i = n_before
    assert spy.closed[i], "the generator was not closed early"
    assert spy.yielded[i] < 900, "generation ran to the end after the disconnect"
    assert _metric(strict.url, "fastvlm_requests_running") == 0
    r = httpx.post(url, json=body([image_msg("hi")]), headers=AUTH)
    assert r.status_code == 200  # the slot is free: next request served


def test_non_streaming_client_timeout_cancels_generation(strict):
    spy = strict.spy
    long = body([image_msg("Describe.")], max_tokens=900, ignore_eos=True)
    i = len(spy.yielded)
    spy.delay = 0.005  # 900 chunks ≥ 4.5 s: the client's 1 s timeout comes first
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(strict.url + "/v1/chat/completions", json=long, headers=AUTH, timeout=1.0)
        deadline = time.time() + 30
        while (len(spy.closed) <= i or not spy.closed[i]) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        spy.delay = 0.0
    assert spy.closed[i] and spy.yielded[i] < 900
    r = httpx.post(strict.url + "/v1/chat/completions", json=body([image_msg("hi")]), headers=AUTH)
    assert r.status_code == 200


def test_graceful_shutdown_ends_inflight_generation(vlm):
    spy = _SpyVLM(vlm)
    spy.delay = 0.005  # 900 chunks ≥ 4.5 s: still generating when the 1 s grace time ends
    srv = LiveServer(create_app(ServerConfig(), vlm=spy), graceful_s=1)
    srv.wait_ready()
    long = body([image_msg("Describe.")], max_tokens=900, ignore_eos=True, stream=True)
    received: list[str] = []

    def client():
        try:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long, timeout=60) as r:
                for line in r.iter_lines():
                    received.append(line)
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=client)
    t.start()
    deadline = time.time() + 30
    while len(received) < 4 and time.time() < deadline:
        time.sleep(0.02)
    srv.stop()
    t.join(30)
    assert not t.is_alive()
    deadline = time.time() + 30
    while spy.closed and not spy.closed[0] and spy.yielded[0] < 900 and time.time() < deadline:
        time.sleep(0.05)
    assert spy.closed[0] or spy.yielded[0] == 900  # cancelled, or finished in the grace time


# ---------------------------------------------------------------------- the CLI
def test_fastvlm_serve_cli_end_to_end(tmp_path):
    """`python -m fastvlm serve` in a subprocess: loads, serves, CORS, stops on SIGINT."""
    import signal

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fastvlm", "serve", "--port", str(port)]
    cmd += ["--cors-origins", "http://app.test", "--served-model-name", "tiny", "--slots", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(
            url + "/v1/chat/completions", json={**body([image_msg("hi")]), "model": "tiny"}
        )
        assert r.status_code == 200 and r.json()["model"] == "tiny"
        pre = httpx.options(
            url + "/v1/chat/completions",
            headers={"Origin": "http://app.test", "Access-Control-Request-Method": "POST"},
        )
        assert pre.headers.get("access-control-allow-origin") == "http://app.test"
        other = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0


def test_serve_flags():
    from fastvlm.cli import TOOLS
    from fastvlm.server.app import build_parser

    assert TOOLS["serve"] == "fastvlm.server.app"
    text = build_parser().format_help()
    for flag in (
        "--api-key",
        "--max-concurrency",
        "--allowed-local-media-path",
        "--allowed-media-domains",
        "--cors-origins",
        "--max-tokens-limit",
        "--host",
        "--max-video-mb",
        "--max-video-bytes",
    ):
        assert flag in text
    from fastvlm.server.app import config_from_args

    cfg = config_from_args(build_parser().parse_args([]))
    assert cfg.media.max_video_bytes == 50 * 1024 * 1024 > cfg.media.max_image_bytes
    cfg = config_from_args(build_parser().parse_args(["--max-video-mb", "2", "--max-images", "8"]))
    assert cfg.media.max_video_bytes == 2 * 1024 * 1024 and cfg.limits.max_images == 8
    cfg = config_from_args(build_parser().parse_args(["--max-video-bytes", "12345"]))
    assert cfg.media.max_video_bytes == 12345


# ---------------------------------------------------------------------- load test client
def test_loadtest_reports_throughput_and_percentiles(live, capsys):
    from fastvlm.server import loadtest

    rc = loadtest.main(
        ["--url", live.url, "-c", "4", "-n", "8", "--max-tokens", "8", "--ignore-eos"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    s = json.loads(out[-1])
    assert s["completed"] == 8 and s["failed"] == 0 and s["model"] == MODEL
    assert s["output_tokens"] == 64  # ignore_eos: exactly max_tokens each
    assert s["prompt_tokens_per_request"] > 16
    assert 0 < s["ttft_s"]["p50"] <= s["ttft_s"]["p99"] <= s["latency_s"]["max"]
    assert s["output_tok_per_s"] > 0 and s["requests_per_s"] > 0
    assert any("TTFT" in line for line in out[:-1])


def test_loadtest_counts_errors(strict, capsys):
    from fastvlm.server import loadtest

    args = ["--url", strict.url, "-c", "4", "-n", "8", "--max-tokens", "64", "--ignore-eos"]
    rc = loadtest.main(args + ["--api-key", KEY, "--warmup", "0"])
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and s["failed"] > 0 and s["completed"] + s["failed"] == 8
    assert set(s["errors"]) == {"server_busy"}  # max_concurrency=1 → 429s


# ---------------------------------------------------------------------- playground
CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package")
def test_playground_in_headless_chromium(live, tmp_path, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    # The demo model streams a whole answer in a few ms (one network read for the browser); a
    # 20 ms pause per chunk stands in for a real model, so the page must render it step by step.
    real = live.service.vlm
    fast_stream = real.stream_chunks

    def slow_stream(*a, **kw):
        for c in fast_stream(*a, **kw):
            time.sleep(0.02)
            yield c

    monkeypatch.setattr(real, "stream_chunks", slow_stream)
    img = tmp_path / "red.png"
    img.write_bytes(png((230, 20, 20), (64, 64)))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            assert page.inner_text("#model") == MODEL
            page.set_input_files("#file", str(img))
            page.wait_for_selector("#thumbs img")
            page.fill("#prompt", "Describe this image.")
            page.fill("#max_tokens", "24")
            # count DOM updates of the answer: streamed text arrives in many small steps
            page.evaluate(
                """() => { window.__updates = [];
                new MutationObserver(() => {
                  const t = document.querySelector('.assistant .text');
                  if (t && t.textContent) window.__updates.push(t.textContent.length);
                }).observe(document.getElementById('chat'),
                           {subtree: true, childList: true, characterData: true}); }"""
            )
            page.click("#send")
            page.wait_for_function(
                "document.querySelector('.assistant .stats') &&"
                " document.querySelector('.assistant .stats').textContent.includes('tokens')",
                timeout=60_000,
            )
            answer = page.inner_text(".assistant .text")
            stats = page.inner_text(".assistant .stats")
            assert answer.strip() and "error" not in answer
            lengths = page.evaluate("window.__updates")
            assert len(set(lengths)) > 2 and lengths == sorted(lengths)  # grew step by step
            assert "TTFT" in stats and "tok/s" in stats and "prompt 40 tokens" in stats
            assert page.locator(".user img").count() == 1
            # second turn: the history (with the image) goes back to the server
            page.fill("#prompt", "And the colour?")
            page.click("#send")
            page.wait_for_function(
                "document.querySelectorAll('.assistant .stats').length == 2 &&"
                " document.querySelectorAll('.assistant .stats')[1].textContent.includes('tokens')",
                timeout=60_000,
            )
            stats2 = page.locator(".assistant .stats").nth(1).inner_text()
            n_prompt2 = int(stats2.split("prompt ")[1].split()[0])
            assert n_prompt2 > 40  # the first turn and its image are in the prompt
            assert page.inner_text("#status") == "4 messages in this chat"
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
        finally:
            browser.close()


def test_no_packet_left_loopback():
    assert VIOLATIONS == []
