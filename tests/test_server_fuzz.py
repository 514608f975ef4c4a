"""Bounded fuzzing of `fastvlm serve` with schemathesis, from the app's own /openapi.json.

Two drivers: the schemathesis CLI (examples + coverage phases: boundary values, wrong types,
missing fields, for every operation) and its Python API with hypothesis (positive and negative
cases for the chat route, plus hostile JSON of our own: lone surrogates, NaN, huge numbers,
deep nesting, non-object bodies). Every response must be < 500 and valid JSON (SSE frames for
streams), and every 4xx an OpenAI error object. Small `max_examples`: well under a minute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_server import MODEL, LiveServer  # noqa: E402

from fastvlm.server.app import ServerConfig, create_app  # noqa: E402
from fastvlm.server.serving import ServeLimits  # noqa: E402

CHAT = "/v1/chat/completions"
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


pytestmark = pytest.mark.usefixtures("module_netguard")  # nothing leaves loopback


@pytest.fixture(scope="module")
def fuzz_server():
    """Small max_tokens limit: requests the fuzzer gets through finish quickly."""
    from fastvlm.api import load

    vlm = load(None, device="cpu")
    srv = LiveServer(create_app(ServerConfig(limits=ServeLimits(max_tokens_limit=8)), vlm=vlm))
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def schema(fuzz_server):
    return schemathesis.openapi.from_dict(httpx.get(fuzz_server.url + "/openapi.json").json())


def check_response(status: int, content_type, text: str) -> None:
    """No 5xx; JSON (or SSE of JSON) bodies; every 4xx an OpenAI error object."""
    assert status < 500, text[:500]
    if isinstance(content_type, list):  # schemathesis' responses keep every header's values
        content_type = content_type[0] if content_type else ""
    if content_type.startswith("text/event-stream"):
        frames = [f for f in text.split("\n\n") if f]
        assert frames[-1] == "data: [DONE]", text[-300:]
        for f in frames[:-1]:
            assert f.startswith("data: ") and isinstance(json.loads(f[6:]), dict), f[:300]
        return
    if content_type.startswith(("text/plain", "text/html")):  # /metrics, the playground
        assert status == 200
        return
    body = json.loads(text)  # raises on anything but JSON
    if status >= 400:
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, body
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert err["param"] is None or isinstance(err["param"], str)
        assert err["code"] is None or isinstance(err["code"], str)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schema_cases_get_no_5xx_and_openai_errors(fuzz_server, schema, mode):
    op = schema[CHAT]["POST"]
    seen: list[int] = []

    @SETTINGS
    @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def run(case):
        r = case.call(base_url=fuzz_server.url, timeout=60)
        seen.append(r.status_code)
        check_response(r.status_code, r.headers.get("content-type", ""), r.text)

    run()
    assert seen and max(seen) < 500
    if mode == "negative":
        assert all(400 <= s < 500 for s in seen), sorted(set(seen))
    for path in ("/health", "/v1/models", "/metrics", "/v1/nope"):  # the GET routes, once each
        r = httpx.get(fuzz_server.url + path)
        check_response(r.status_code, r.headers.get("content-type", ""), r.text)


# Hostile JSON of our own: valid JSON syntax, invalid or extreme content.
_chars = st.characters(codec=None, categories=None)  # every code point, lone surrogates too
_nasty = st.sampled_from(
    ["\ud800", "a\udfffb", "\udc00\ud800", "x\ud83d", "<|im_start|>system\n", "<image>",
     "<|endoftext|>", "<|im_end|>\n<|im_start|>assistant\n"]
)  # fmt: skip
_text = _nasty | st.text(_chars, max_size=12)
_number = (
    st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, -1, 2**63, 2**64, 1e308])
)
_scalar = st.none() | st.booleans() | _number | _text
_json = st.recursive(
    _scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(_text, c, max_size=3), max_leaves=8
)
_fields = st.sampled_from(
    ["model", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
     "stream", "logit_bias", "metadata", "tools", "reasoning_effort", "tokens_per_image",
     "stream_options", "user", "fps", "max_frames", "response_format"]
)  # fmt: skip
_valid_extra = st.fixed_dictionaries(
    {}, optional={"stop": _text | st.lists(_text, max_size=2), "user": _text,
                  "metadata": st.dictionaries(_text, _text, max_size=2), "stream": st.booleans()}
)  # fmt: skip
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
     "content": _text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
                                 max_size=2) | _json}
)  # fmt: skip
# Mostly well-formed requests with nasty text (they reach the tokenizer), some with junk fields.
_body = st.fixed_dictionaries(
    {"model": st.just(MODEL) | st.just(MODEL) | _text,
     "messages": st.lists(_message, min_size=1, max_size=3), "max_tokens": st.integers(1, 4)}
).flatmap(
    lambda base: (_valid_extra | _valid_extra | st.dictionaries(_fields, _json, max_size=2)).map(
        lambda extra: {**base, **extra}
    )
)  # fmt: skip
_encoded = _body.map(lambda b: json.dumps(b, ensure_ascii=True, allow_nan=True).encode())
_raw = _encoded | _encoded | _encoded | _json.map(lambda v: json.dumps(v, allow_nan=True).encode())


def test_hostile_json_gets_no_5xx_and_openai_errors(fuzz_server):
    statuses: list[int] = []

    # Control tokens typed in a well-formed request are text, so these must be served (200):
    # pinned as examples because which generated bodies are well-formed varies between runs.
    nasty_ok = [
        {"model": MODEL, "messages": [{"role": "user", "content": t}], "max_tokens": 2}
        for t in ("<|im_start|>system\n", "<|im_end|>\n<|im_start|>assistant\n", "<image>")
    ]

    @settings(SETTINGS, max_examples=80)
    @given(raw=_raw)
    @example(raw=json.dumps(nasty_ok[0]).encode())
    @example(raw=json.dumps(nasty_ok[1]).encode())
    @example(raw=json.dumps(nasty_ok[2]).encode())
    def run(raw: bytes):
        headers = {"content-type": "application/json"}
        r = httpx.post(fuzz_server.url + CHAT, content=raw, headers=headers, timeout=60)
        statuses.append(r.status_code)
        check_response(r.status_code, r.headers.get("content-type", ""), r.text)

    run()
    assert statuses and max(statuses) < 500 and min(statuses) >= 200
    assert any(400 <= s < 500 for s in statuses) and statuses.count(200) >= len(nasty_ok)
    assert httpx.get(fuzz_server.url + "/health").status_code == 200


# ---------------------------------------------------------------------- schemathesis CLI
def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _schemathesis(url: str, tmp_path, phases: str, max_examples: int) -> str:
    beside = Path(sys.executable).with_name("schemathesis")  # same env, even if not on PATH
    exe = str(beside) if beside.exists() else shutil.which("schemathesis")
    if exe is None:
        pytest.skip("the schemathesis command is not installed")
    cmd = [
        exe,
        "run",
        url + "/openapi.json",
        "--checks=not_a_server_error",
        f"--phases={phases}",
        f"--max-examples={max_examples}",
        "--workers=1",
        "--seed=1",
        "--no-color",
        "--generation-database=none",
        "--request-timeout=60",
        "--max-failures=5",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "passed" in p.stdout and " 0 passed" not in p.stdout
    assert httpx.get(url + "/health").status_code == 200
    return p.stdout


def test_schemathesis_examples_and_coverage_find_no_5xx(fuzz_server, tmp_path):
    """Boundary values, wrong types and missing fields for every operation."""
    _schemathesis(fuzz_server.url, tmp_path, "examples,coverage", 30)
    # the schema's example reached the model (not only 4xx paths)
    assert _metric(fuzz_server.url, "fastvlm_generation_tokens_total") > 0


@pytest.mark.slow
def test_schemathesis_fuzzing_finds_no_5xx(fuzz_server, tmp_path):
    _schemathesis(fuzz_server.url, tmp_path, "fuzzing", 200)


def test_extreme_sampling_values_are_not_server_errors(fuzz_server):
    """Found by schemathesis: tiny top_p / temperature made the sampler see inf/nan."""
    for extra in (
        {"top_p": 1e-300},  # normal in float64, 0 in float32 (5e-324 is denormal: FTZ-fragile)
        {"temperature": 1e-300},
        {"temperature": 2, "top_p": 1e-300, "repetition_penalty": 0.01, "seed": 0},
        {"top_k": 1, "temperature": 2},
    ):
        b = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = httpx.post(fuzz_server.url + CHAT, json={**b, **extra})
        assert r.status_code == 200, (extra, r.text)
