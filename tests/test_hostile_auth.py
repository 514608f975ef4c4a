"""API key and CORS under attack: a wrong or missing key is a 401 before any work (no body read,
no media fetched, no model call) whatever else is wrong with the request; path spellings do not
slip past the key; without configured origins no CORS header is ever granted.
"""

from __future__ import annotations

import base64
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hostile_util import CHAT, HeldVLM, raw_request  # noqa: E402
from test_server import MODEL, LiveServer, _bomb, _img, body, data_url, image_msg  # noqa: E402

from fastvlm.api import load  # noqa: E402
from fastvlm.server.app import ServerConfig, create_app  # noqa: E402
from fastvlm.server.media import MediaPolicy  # noqa: E402

KEY = "k3y-Of-the-day"


pytestmark = pytest.mark.usefixtures("module_netguard")  # nothing leaves loopback


@pytest.fixture(scope="module")
def model():
    return load(None)


def _server(model, **cfg):
    spy = HeldVLM(model)
    srv = LiveServer(create_app(ServerConfig(**cfg), vlm=spy))
    srv.spy = spy
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def keyed(model):
    srv = _server(
        model,
        api_key=KEY,
        max_request_bytes=1 << 20,
        media=MediaPolicy(allowed_media_domains=["127.0.0.1"]),
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def open_srv(model):
    srv = _server(model)
    yield srv
    srv.stop()


BAD_AUTH = [
    ("no header", {}),
    ("empty bearer", {"Authorization": "Bearer"}),
    ("wrong key", {"Authorization": "Bearer nope"}),
    ("key without scheme", {"Authorization": KEY}),
    ("basic scheme", {"Authorization": "Basic " + base64.b64encode(f"u:{KEY}".encode()).decode()}),
    ("key prefix", {"Authorization": f"Bearer {KEY[:-1]}"}),
    ("key plus suffix", {"Authorization": f"Bearer {KEY}x"}),
    ("key in other case", {"Authorization": f"Bearer {KEY.upper()}"}),
    ("key in x-api-key", {"X-API-Key": KEY}),
    ("non-ascii token", {"Authorization": "Bearer k\xe9y".encode()}),
    ("latin-1 token", {"Authorization": b"Bearer \xff\xfe" + KEY.encode()}),
    ("bearer twice", {"Authorization": f"Bearer Bearer {KEY}"}),
]

# Requests that would fail later (400/404/413) or cost work (fetch, decode, generate) with a
# key: without one each must be a 401 first.
HOSTILE_BODIES = [
    ("valid", body([image_msg("hi")])),
    ("unknown model", {**body([image_msg("hi")]), "model": "gpt-4o"}),
    ("bomb png", _img(data_url(_bomb()))),
    ("loopback fetch", _img("http://127.0.0.1:9/a.png")),
    ("unknown field", body([image_msg("hi")], frobnicate=1)),
    ("malformed json", b'{"model": '),
    ("over the body cap", body([{"role": "user", "content": "a" * (2 << 20)}])),
]


@pytest.mark.parametrize("auth_name, headers", BAD_AUTH, ids=[a[0] for a in BAD_AUTH])
def test_bad_key_is_401_before_anything_else(keyed, auth_name, headers):
    started = keyed.spy.started
    for name, payload in HOSTILE_BODIES:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        hdrs = {**headers, "Content-Type": "application/json"}
        r = httpx.post(keyed.url + CHAT, content=raw, headers=hdrs, timeout=30)
        assert r.status_code == 401, (auth_name, name, r.text[:200])
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert KEY not in r.text
    for path in ("/v1/models", "/v1/nope"):
        assert httpx.get(keyed.url + path, headers=headers).status_code == 401
    assert keyed.spy.started == started, "the model ran for an unauthenticated request"


@pytest.mark.parametrize("declared", [1 << 20, 10**9])
def test_401_comes_without_reading_the_body(keyed, declared):
    """Only the headers are sent; the 401 must not wait for a body that never comes."""
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer wrong\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    status, raw, took = raw_request(keyed.port, head, timeout=10)
    assert status == 401 and took < 3, (raw[:200], took)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer {KEY}"},  # RFC 9110: the scheme is case-insensitive
        {"Authorization": f"BEARER   {KEY}"},
    ],
)
def test_right_key_in_any_legal_spelling_is_served(keyed, headers):
    r = httpx.post(keyed.url + CHAT, json=body([image_msg("hi")], max_tokens=2), headers=headers)
    assert r.status_code == 200, r.text
    assert httpx.get(keyed.url + "/v1/models", headers=headers).json()["data"][0]["id"] == MODEL


VALID = json.dumps(body([image_msg("hi")], max_tokens=2)).encode()


PATHS = [
    "/v1/models",
    "/v1/models/",
    "//v1/models",
    "/v1//models",
    "/v1/./models",
    "/v1/x/../models",
    "/V1/models",
    "/v1/%6dodels",
    "/%761/models",
    "/v1/models?api_key=" + KEY,
    "/v1/models#frag",
]


@pytest.mark.parametrize("path", PATHS)
def test_no_path_spelling_reaches_the_api_without_the_key(keyed, path):
    data = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    status, raw, _ = raw_request(keyed.port, data, timeout=10)
    assert status in (400, 401, 404, 405), (path, raw[:300])
    assert b'"data"' not in raw, f"{path} listed the models without a key"
    post = (
        f"POST {path.replace('models', 'chat/completions')} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(VALID)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + VALID
    status, raw, _ = raw_request(keyed.port, post, timeout=30)
    assert status in (400, 401, 404, 405, 307), (path, raw[:300])
    assert b'"choices"' not in raw


def test_public_endpoints_need_no_key_and_leak_nothing(keyed):
    """/health and /metrics are for orchestrators and scrapers (no key); they must not echo
    the key or request content."""
    for path in ("/health", "/metrics"):
        r = httpx.get(keyed.url + path)
        assert r.status_code == 200 and KEY not in r.text and "hi" not in r.text.split()


def test_without_a_key_any_authorization_header_is_ignored(open_srv):
    for headers in ({}, {"Authorization": "Bearer whatever"}, {"Authorization": "garbage"}):
        r = httpx.post(
            open_srv.url + CHAT, json=body([image_msg("hi")], max_tokens=2), headers=headers
        )
        assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- CORS
PREFLIGHT = {
    "Origin": "http://evil.test",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.mark.parametrize("path", [CHAT, "/v1/models", "/health", "/metrics", "/"])
@pytest.mark.parametrize("which", ["open", "keyed"])
def test_no_cors_grant_without_configured_origins(open_srv, keyed, which, path):
    srv = open_srv if which == "open" else keyed
    pre = httpx.options(srv.url + path, headers=PREFLIGHT)
    assert 400 <= pre.status_code < 500, pre.text
    assert not [h for h in pre.headers if h.startswith("access-control-")], pre.headers
    if path.startswith("/v1/"):
        assert "error" in pre.json()  # an OpenAI error object, not an empty 200
    simple = httpx.get(srv.url + path, headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in simple.headers
    assert "access-control-allow-credentials" not in simple.headers


def test_cors_allows_only_the_configured_origin(model):
    srv = _server(model, cors_origins=["http://app.test"])
    try:
        for origin in (
            "http://evil.test",
            "http://app.test.evil.test",
            "null",
            "http://APP.test:80",
        ):
            pre = httpx.options(srv.url + CHAT, headers={**PREFLIGHT, "Origin": origin})
            assert pre.headers.get("access-control-allow-origin") in (None, ""), origin
            assert pre.status_code < 500
        ok = httpx.options(srv.url + CHAT, headers={**PREFLIGHT, "Origin": "http://app.test"})
        assert ok.headers.get("access-control-allow-origin") == "http://app.test"
    finally:
        srv.stop()


# ---------------------------------------------------------------------- CORS together with a key
APP = "http://app.test"


@pytest.fixture(scope="module", params=["keyed", "open"])
def cors_srv(model, request):
    key = KEY if request.param == "keyed" else None
    srv = _server(model, cors_origins=[APP], api_key=key)
    srv.key = key
    yield srv
    srv.stop()


@pytest.mark.parametrize("path", [CHAT, "/v1/models"])
@pytest.mark.parametrize("origin", [APP, "http://evil.test", "null", "http://app.test.evil.test"])
def test_preflight_is_answered_for_allowed_origins_only(cors_srv, origin, path):
    """Browsers send preflights without credentials: an allowed origin gets its grant whether
    or not a key is required; any other origin gets none (and never a 5xx)."""
    pre = httpx.options(cors_srv.url + path, headers={**PREFLIGHT, "Origin": origin})
    if origin == APP:
        assert pre.status_code == 200, pre.text
        assert pre.headers.get("access-control-allow-origin") == APP
        allowed = pre.headers.get("access-control-allow-headers", "").lower()
        assert "authorization" in allowed and "content-type" in allowed
        assert "POST" in pre.headers.get("access-control-allow-methods", "")
    else:
        assert 400 <= pre.status_code < 500, pre.text
        assert not [h for h in pre.headers if h.startswith("access-control-allow-o")], pre.headers
    assert cors_srv.spy.started == 0  # a preflight never reaches the model


@pytest.mark.parametrize("auth", ["right key", "no key", "wrong key"])
@pytest.mark.parametrize("origin", [APP, "http://evil.test"])
def test_actual_request_carries_cors_headers_for_allowed_origins(cors_srv, origin, auth):
    """The page of an allowed origin can read every answer, a 401 included; other origins
    get the same status but no CORS grant."""
    headers = {"Origin": origin}
    if auth == "right key":
        headers["Authorization"] = f"Bearer {KEY}"
    elif auth == "wrong key":
        headers["Authorization"] = "Bearer nope"
    r = httpx.post(cors_srv.url + CHAT, json=body([image_msg("hi")], max_tokens=2), headers=headers)
    expected = 401 if cors_srv.key and auth != "right key" else 200
    assert r.status_code == expected, r.text
    if expected == 401:
        assert r.json()["error"]["code"] == "invalid_api_key"
    grant = r.headers.get("access-control-allow-origin")
    assert grant == (APP if origin == APP else None), r.headers
    models = httpx.get(cors_srv.url + "/v1/models", headers=headers)
    assert models.status_code == expected
    assert models.headers.get("access-control-allow-origin") == grant
