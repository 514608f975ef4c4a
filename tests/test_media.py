"""Server media safety (fastvlm/server/media.py): SSRF guard, redirects, caps, bombs, files.

No test here may send a packet outside 127.0.0.0/8 and [::1]: the `netguard` fixture makes
name resolution of anything but loopback fail and turns any connect() to a non-loopback
address into a recorded violation, so a broken guard fails the test instead of connecting.
Private / link-local / metadata addresses are checked through the decision functions with
fake DNS answers and a fake `_connect`.
"""

from __future__ import annotations

import base64
import http.server
import importlib.util
import io
import ipaddress
import socket
import struct
import sys
import tempfile
import threading
import zlib

import numpy as np
import pytest
from conftest import guard_network
from PIL import Image

from fastvlm.server import fetch, media
from fastvlm.server.media import MediaError, MediaPolicy


@pytest.fixture(autouse=True)
def netguard(monkeypatch):
    violations: list[str] = []
    guard_network(monkeypatch, violations)
    yield violations


def png_bytes(size=(32, 24), color=(200, 30, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "PNG")
    return b.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height greyscale pixels, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------- decision function
LOOPBACK_DISGUISES = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "[::1]",
    "::ffff:127.0.0.1",
    "[::ffff:7f00:1]",
    "127.255.255.254",
]


@pytest.mark.parametrize("host", LOOPBACK_DISGUISES)
def test_loopback_disguises_refused(host):
    ip = media.parse_ip(host)
    assert ip is not None and media.blocked_reason(ip) == "loopback"
    with pytest.raises(MediaError, match="loopback") as e:
        media.resolve_checked(host, 80, MediaPolicy())
    assert e.value.status == 400


@pytest.mark.parametrize(
    "addr",
    [
        "10.0.0.1",
        "10.255.255.255",
        "172.16.5.4",
        "172.31.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "169.254.0.1",
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.0.1",
        "198.18.0.1",
        "fd00::1",
        "fe80::1",
        "::",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",  # NAT64 form of 169.254.169.254
        "2002:a9fe:a9fe::1",  # 6to4 form of 169.254.169.254
        "fd00:ec2::254",  # AWS IPv6 metadata
    ],
)
def test_private_and_special_addresses_refused(addr):
    ip = ipaddress.ip_address(addr)
    assert media.blocked_reason(ip) is not None, addr
    with pytest.raises(MediaError):
        media.resolve_checked(addr, 80, MediaPolicy())


@pytest.mark.parametrize("addr", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "1.1.1.1"])
def test_public_addresses_allowed_by_decision(addr):
    assert media.blocked_reason(ipaddress.ip_address(addr)) is None


def _fake_dns(monkeypatch, table: dict[str, list[str]], calls: list[str] | None = None):
    def gai(host, port, *a, **k):
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [
            (
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (ip, port),
            )
            for ip in table[host]
        ]

    monkeypatch.setattr(fetch.socket, "getaddrinfo", gai)


class _Connected(Exception):
    pass


def _fake_connect(monkeypatch, seen: list):
    def fake(ip, port, timeout):
        seen.append((str(ip), port))
        raise _Connected(str(ip))

    monkeypatch.setattr(fetch, "_connect", fake)


@pytest.mark.parametrize(
    "answer",
    [["169.254.169.254"], ["10.1.2.3"], ["192.168.0.10"], ["93.184.216.34", "10.0.0.1"], ["::1"]],
)
def test_names_resolving_to_private_addresses_refused_before_connect(monkeypatch, answer):
    seen: list = []
    _fake_dns(monkeypatch, {"images.example": answer})
    _fake_connect(monkeypatch, seen)
    with pytest.raises(MediaError, match="address"):
        media.fetch_url("http://images.example/cat.png", MediaPolicy())
    assert seen == []  # refused before any socket was opened


def test_connection_is_pinned_to_the_checked_address(monkeypatch):
    """DNS rebinding: the name is resolved once per hop and the socket goes to that IP."""
    calls: list[str] = []
    seen: list = []
    _fake_dns(monkeypatch, {"images.example": ["93.184.216.34"]}, calls)
    _fake_connect(monkeypatch, seen)
    with pytest.raises(_Connected):
        media.fetch_url("http://images.example:8080/cat.png", MediaPolicy())
    assert calls == ["images.example"]
    assert seen == [("93.184.216.34", 8080)]


def test_allowed_media_domains_exempts_only_named_hosts(monkeypatch):
    _fake_dns(monkeypatch, {"intranet.corp": ["10.0.0.5"], "evil.corp": ["10.0.0.6"]})
    policy = MediaPolicy(allowed_media_domains=["intranet.corp"])
    assert [str(a) for a in media.resolve_checked("intranet.corp", 80, policy)] == ["10.0.0.5"]
    assert media.host_allowed("img.intranet.corp", ["intranet.corp"])
    assert not media.host_allowed("evilintranet.corp", ["intranet.corp"])
    with pytest.raises(MediaError):
        media.resolve_checked("evil.corp", 80, policy)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/x.png",
        "gopher://127.0.0.1/",
        "http://user:pw@127.0.0.1/x.png",
        "javascript:alert(1)",
        "",
    ],
)
def test_bad_schemes_and_credentials_refused(url):
    with pytest.raises(MediaError):
        media.load_media_image(url, MediaPolicy(allowed_media_domains=["127.0.0.1"]))


def test_remote_fetching_can_be_switched_off():
    with pytest.raises(MediaError, match="data URL"):
        media.load_media_image("http://127.0.0.1/x.png", MediaPolicy(allow_remote=False))


# ---------------------------------------------------------------------- a real local server
class _ImageServer:
    """HTTP server on 127.0.0.1 with a few routes; records every path it was asked for."""

    def __init__(self, routes: dict[str, tuple[int, dict, bytes]]) -> None:
        self.hits: list[str] = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits.append(self.path)
                status, headers, body = routes.get(self.path, (404, {}, b"no"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v.replace("PORT", str(outer.port)))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server():
    img = png_bytes()
    srv = _ImageServer(
        {
            "/ok.png": (200, {"Content-Type": "image/png"}, img),
            "/to-ok": (302, {"Location": "/ok.png"}, b""),
            "/to-localhost": (302, {"Location": "http://localhost:PORT/ok.png"}, b""),
            "/to-ipv6": (301, {"Location": "http://[::1]:PORT/ok.png"}, b""),
            "/to-127.1": (307, {"Location": "http://127.1:PORT/ok.png"}, b""),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/big": (200, {"Content-Type": "image/png"}, b"\0" * 300_000),
            "/text": (200, {"Content-Type": "text/plain"}, b"hello, not an image"),
        }
    )
    yield srv
    srv.close()


ALLOW_LOCAL = MediaPolicy(allowed_media_domains=["127.0.0.1"], max_image_bytes=200_000)


def test_fetch_from_allowed_host_and_redirect_to_it(image_server):
    assert media.load_media_image(image_server.url("/ok.png"), ALLOW_LOCAL).size == (32, 24)
    assert media.load_media_image(image_server.url("/to-ok"), ALLOW_LOCAL).size == (32, 24)
    assert image_server.hits == ["/ok.png", "/to-ok", "/ok.png"]


@pytest.mark.parametrize("path", ["/to-localhost", "/to-ipv6", "/to-127.1", "/to-metadata"])
def test_redirect_to_loopback_or_metadata_refused(image_server, path, netguard):
    with pytest.raises(MediaError, match="address") as e:
        media.load_media_image(image_server.url(path), ALLOW_LOCAL)
    assert e.value.status == 400
    assert image_server.hits == [path]  # the redirect target was never contacted
    assert not [v for v in netguard if v.startswith("connect")]


def test_loopback_refused_without_allow_list(image_server):
    for host in ("127.0.0.1", "localhost", "127.1", "2130706433", "0x7f000001"):
        with pytest.raises(MediaError, match="loopback"):
            media.load_media_image(image_server.url("/ok.png", host), MediaPolicy())
    assert image_server.hits == []


def test_redirect_limit_byte_cap_and_non_image(image_server):
    with pytest.raises(MediaError, match="redirected more than"):
        media.load_media_image(image_server.url("/loop"), ALLOW_LOCAL)
    with pytest.raises(MediaError) as e:
        media.load_media_image(image_server.url("/big"), ALLOW_LOCAL)
    assert e.value.status == 413
    with pytest.raises(MediaError, match="not a readable image"):
        media.load_media_image(image_server.url("/text"), ALLOW_LOCAL)
    with pytest.raises(MediaError, match="HTTP 404"):
        media.load_media_image(image_server.url("/missing"), ALLOW_LOCAL)


def test_https_verifies_the_certificate_of_the_host_name(tmp_path):
    """The pinned HTTPS connection still checks the certificate: a self-signed server fails."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    srv = _ImageServer({"/ok.png": (200, {"Content-Type": "image/png"}, png_bytes())})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.httpd.socket = ctx.wrap_socket(srv.httpd.socket, server_side=True)
    try:
        url = f"https://127.0.0.1:{srv.port}/ok.png"
        with pytest.raises(MediaError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
            media.load_media_image(url, ALLOW_LOCAL)
    finally:
        srv.close()


def test_fetch_timeout(monkeypatch):
    """A server that accepts but never answers is cut off by the deadline."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        port = srv.getsockname()[1]
        policy = MediaPolicy(allowed_media_domains=["127.0.0.1"], fetch_timeout_s=0.5)
        with pytest.raises(MediaError, match="could not be fetched|timed out"):
            media.load_media_image(f"http://127.0.0.1:{port}/slow.png", policy)
    finally:
        srv.close()


# ---------------------------------------------------------------------- data URLs, bytes
def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_data_url_ok_and_rgb():
    img = media.load_media_image(data_url(png_bytes((40, 30))), MediaPolicy())
    assert img.mode == "RGB" and img.size == (40, 30)


@pytest.mark.parametrize(
    "url, status",
    [
        ("data:image/png;base64,!!!notbase64", 400),
        ("data:image/png,rawdata", 400),
        ("data:text/html;base64," + base64.b64encode(b"<b>").decode(), 400),
        (data_url(b"GIF89a this is not really a gif"), 400),
        (data_url(b""), 400),
        (data_url(bomb_png(100_000, 100_000)), 413),  # 1e10 pixels
        (data_url(bomb_png(6_000, 6_000)), 413),  # over our cap, under PIL's own
    ],
)
def test_bad_data_urls(url, status):
    with pytest.raises(MediaError) as e:
        media.load_media_image(url, MediaPolicy())
    assert e.value.status == status


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_common_formats_decode(fmt):
    b = io.BytesIO()
    Image.new("RGB", (20, 10), (10, 200, 30)).save(b, fmt)
    assert media.load_media_image(data_url(b.getvalue()), MediaPolicy()).size == (20, 10)


def test_exotic_formats_are_never_opened(monkeypatch):
    """EPS would hand the bytes to Ghostscript; other rare decoders are refused likewise."""
    from PIL import EpsImagePlugin

    def boom(*a, **k):
        raise AssertionError("the EPS decoder was reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", boom)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    for data in (eps, b"P6\n2 2\n255\n" + b"\0" * 12):  # EPS, PPM
        with pytest.raises(MediaError, match="not a readable image"):
            media.load_media_image(data_url(data), MediaPolicy())


def test_data_url_byte_cap_checked_before_decoding():
    with pytest.raises(MediaError) as e:
        media.load_media_image(data_url(b"\0" * 5000), MediaPolicy(max_image_bytes=1000))
    assert e.value.status == 413


# ---------------------------------------------------------------------- local files
def test_local_files_refused_by_default():
    for url in ("file:///etc/passwd", "/etc/passwd", "../../etc/passwd", "file://host/etc/x"):
        with pytest.raises(MediaError):
            media.load_media_image(url, MediaPolicy())


def test_local_files_only_under_allowed_path(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (root / "link.png").symlink_to(outside)
    policy = MediaPolicy(allowed_local_media_path=str(root))
    assert media.load_media_image(f"file://{root}/a.png", policy).size == (32, 24)
    assert media.load_media_image("a.png", policy).size == (32, 24)
    for url in (
        f"file://{outside}",
        "file:///etc/passwd",
        "../secret.png",
        f"{root}/../secret.png",
        "link.png",  # a symlink inside pointing outside
    ):
        with pytest.raises(MediaError, match="outside|not found"):
            media.load_media_image(url, policy)


# ---------------------------------------------------------------------- video
needs_av = pytest.mark.skipif(
    importlib.util.find_spec("av") is None, reason="PyAV not installed (fastvlm[video])"
)


def make_clip(path, seconds: float = 1.0, fps: int = 10, size: int = 32) -> bytes:
    """A small mp4 written with PyAV; each frame's brightness is its index (frames differ)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            a = np.full((size, size, 3), 20 * i % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


@pytest.fixture
def clip(tmp_path):
    return make_clip(tmp_path / "clip.mp4")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Temporary files go to a folder the test can inspect (to prove they are deleted)."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@needs_av
def test_video_data_url_decodes_sampled_frames_and_deletes_its_temp_file(clip, private_tmp):
    frames = media.load_media_video(data_url(clip, "video/mp4"), MediaPolicy(), None, 4)
    assert [f.index for f in frames] == [0, 3, 6, 9]
    assert [f.time for f in frames] == pytest.approx([0.0, 0.3, 0.6, 0.9], abs=1e-3)
    assert all(f.image.mode == "RGB" and f.image.size == (32, 32) for f in frames)
    frames = media.load_media_video(data_url(clip, "video/mp4"), MediaPolicy(), 5.0, 16)
    assert [f.time for f in frames] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8], abs=1e-3)
    with pytest.raises(MediaError) as e:  # corrupt: 400, and the temp file is gone too
        media.load_media_video(data_url(clip[: len(clip) // 2], "video/mp4"), MediaPolicy())
    assert e.value.status == 400 and e.value.code == "invalid_video"
    assert "fastvlm-video-" not in str(e.value)  # the temporary path is not shown
    assert list(private_tmp.iterdir()) == []


@needs_av
def test_video_caps(clip, private_tmp):
    small = MediaPolicy(max_video_bytes=len(clip) - 1)
    with pytest.raises(MediaError) as e:
        media.load_media_video(data_url(clip, "video/mp4"), small)
    assert e.value.status == 413 and e.value.code == "video_too_large"
    with pytest.raises(MediaError) as e:  # frames over the pixel cap (checked per frame)
        media.load_media_video(data_url(clip, "video/mp4"), MediaPolicy(max_image_pixels=100))
    assert e.value.status == 413 and "pixel limit" in str(e.value)
    # the video cap is separate from (and larger than) the image cap
    assert media.load_media_video(data_url(clip, "video/mp4"), MediaPolicy(max_image_bytes=10))
    with pytest.raises(MediaError, match="not a video"):  # an image MIME type is not a video
        media.load_media_video(data_url(clip, "image/png"), MediaPolicy())
    assert list(private_tmp.iterdir()) == []


def test_video_data_url_checked_before_pyav(monkeypatch):
    """PyAV missing → a 400 naming the extra, before any byte is fetched or decoded."""
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(MediaError, match=r"fastvlm\[video\]") as e:
        media.load_media_video("http://127.0.0.1:9/never-fetched.mp4", MediaPolicy())
    assert e.value.status == 400 and e.value.code == "video_unsupported"


@needs_av
def test_video_urls_use_the_guarded_fetcher_with_the_video_cap(clip, netguard):
    big = clip + b"\0" * 300_000
    srv = _ImageServer(
        {
            "/clip.mp4": (200, {"Content-Type": "video/mp4"}, clip),
            "/to-clip": (302, {"Location": "/clip.mp4"}, b""),
            "/to-localhost": (302, {"Location": "http://localhost:PORT/clip.mp4"}, b""),
            "/big.mp4": (200, {"Content-Type": "video/mp4"}, big),
        }
    )
    try:
        allow = MediaPolicy(
            allowed_media_domains=["127.0.0.1"], max_image_bytes=100, max_video_bytes=200_000
        )
        assert len(media.load_media_video(srv.url("/to-clip"), allow, None, 3)) == 3
        with pytest.raises(MediaError, match="loopback"):  # not allowed: refused, not fetched
            media.load_media_video(srv.url("/clip.mp4"), MediaPolicy())
        with pytest.raises(MediaError, match="loopback"):  # a redirect is checked again
            media.load_media_video(srv.url("/to-localhost"), allow)
        with pytest.raises(MediaError) as e:
            media.load_media_video(srv.url("/big.mp4"), allow)
        assert e.value.status == 413 and e.value.code == "video_too_large"
        assert srv.hits == ["/to-clip", "/clip.mp4", "/to-localhost", "/big.mp4"]
    finally:
        srv.close()
    assert not [v for v in netguard if v.startswith("connect")]


@needs_av
def test_local_videos_only_under_allowed_path(tmp_path, clip):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.mp4").write_bytes(clip)
    (tmp_path / "secret.mp4").write_bytes(clip)
    with pytest.raises(MediaError, match="allowed-local-media-path"):
        media.load_media_video(f"file://{root}/a.mp4", MediaPolicy())
    policy = MediaPolicy(allowed_local_media_path=str(root))
    assert len(media.load_media_video(f"file://{root}/a.mp4", policy, None, 2)) == 2
    with pytest.raises(MediaError, match="outside"):
        media.load_media_video("../secret.mp4", policy)
