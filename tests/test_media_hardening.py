"""Issue 17, items 1 and 2: request media must not make FFmpeg open other files or URLs, and an
image's preprocessing cost (padded square / resized copy) is bounded before anything is
allocated. Server path (fastvlm.server.media) and library path (fastvlm.video / processing).

New APIs are imported inside the tests that use them, so that this file also runs against the
code before the fix and fails there test by test.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest
from conftest import guard_network, tiny_config
from PIL import Image

from fastvlm.errors import ImageError
from fastvlm.images import load_image, preprocess_image
from fastvlm.processing import Processor
from fastvlm.server import media
from fastvlm.server.media import MediaError, MediaPolicy

needs_av = pytest.mark.skipif(
    importlib.util.find_spec("av") is None, reason="PyAV not installed (fastvlm[video])"
)
SECRET_LEVEL = 123  # the secret clip's frames are this grey; no accepted clip uses it


@pytest.fixture(autouse=True)
def netguard(monkeypatch):
    violations: list[str] = []
    guard_network(monkeypatch, violations)
    yield violations
    assert violations == []


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ---------------------------------------------------------------------- 1. containers
def write_clip(path, fmt=None, codec="mpeg4", level=None, n=6, size=32, wh=None) -> bytes:
    import av

    w, h = wh or (size, size)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height = w, h
        s.pix_fmt = "yuv420p"
        for i in range(n):
            v = level if level is not None else 30 + 10 * i
            a = np.full((h, w, 3), v, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


@pytest.fixture
def secret_dir(tmp_path, monkeypatch):
    """A folder holding `secret.mp4` (grey SECRET_LEVEL frames), made the working directory and
    the temporary-file folder, so that a relative name inside a playlist would resolve to it
    wherever the server or the library put the bytes."""
    write_clip(tmp_path / "secret.mp4", level=SECRET_LEVEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def hostile_videos(d) -> dict[str, bytes]:
    secret = d / "secret.mp4"
    mp4_head = (d / "secret.mp4").read_bytes()[:32]
    return {
        "ffconcat-relative": b"ffconcat version 1.0\nfile secret.mp4\n",
        "ffconcat-absolute": f"ffconcat version 1.0\nfile {secret}\n".encode(),
        "ffconcat-quoted": b"ffconcat version 1.0\nfile 'secret.mp4'\nduration 1\n",
        "hls-local": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nsecret.mp4\n#EXT-X-ENDLIST\n",
        "hls-http": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:9/a.ts\n"
        b"#EXTINF:1,\nfile:secret.mp4\n#EXT-X-ENDLIST\n",
        "sdp": b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        b"m=video 9 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n",
        "image2-png": png_frame(),
        "text": b"just some text, a .txt file\n",
        "mp4-magic-then-playlist": mp4_head[:12] + b"\nffconcat version 1.0\nfile secret.mp4\n",
        "ts-sync-then-playlist": (b"G" + b"#EXTM3U\nsecret.mp4\n".ljust(187)) * 3,
    }


def png_frame() -> bytes:  # noqa: N802 - a PNG, which FFmpeg's probe would read as image2pipe
    b = io.BytesIO()
    Image.new("RGB", (16, 16), (SECRET_LEVEL,) * 3).save(b, "PNG")
    return b.getvalue()


def assert_no_secret(frames) -> None:
    for f in frames:
        assert abs(float(np.asarray(f.image).mean()) - SECRET_LEVEL) > 3, "secret frame decoded"


@needs_av
def test_server_refuses_containers_that_open_other_files(secret_dir):
    for name, data in hostile_videos(secret_dir).items():
        try:
            frames = media.load_media_video(data_url(data, "video/mp4"), MediaPolicy())
        except MediaError as e:
            assert e.status == 400 and e.code == "invalid_video", (name, e.status, e.code)
            assert "secret" not in str(e) and str(secret_dir) not in str(e), name
            continue
        assert_no_secret(frames)
        pytest.fail(f"{name}: decoded as a video")


@needs_av
def test_library_read_frames_refuses_them_from_bytes_and_paths(secret_dir):
    from fastvlm.errors import VideoError
    from fastvlm.video import read_frames

    for name, data in hostile_videos(secret_dir).items():
        path = secret_dir / f"{name}.mp4"  # a video extension does not make it a video
        path.write_bytes(data)
        for src in (data, io.BytesIO(data), path, str(path)):
            with pytest.raises(VideoError):
                assert_no_secret(read_frames(src))
                pytest.fail(f"{name}: decoded")


@needs_av
def test_error_does_not_reveal_whether_a_path_exists(secret_dir):
    msgs = set()
    for target in ("secret.mp4", "missing.mp4", str(secret_dir / "secret.mp4"), "/etc/passwd"):
        playlist = f"ffconcat version 1.0\nfile {target}\n".encode()
        for mime_data in (playlist, b"#EXTM3U\n#EXTINF:1,\n" + target.encode() + b"\n"):
            with pytest.raises(MediaError) as e:
                media.load_media_video(data_url(mime_data, "video/mp4"), MediaPolicy())
            msgs.add((e.value.status, e.value.code, str(e.value)))
    assert len(msgs) == 1, msgs


@needs_av
def test_url_strings_naming_protocols_are_refused(secret_dir):
    from fastvlm.errors import VideoError
    from fastvlm.video import read_frames

    secret = secret_dir / "secret.mp4"
    urls = [
        f"subfile:,,start,0,end,0,,:{secret}",
        "file:secret.mp4",
        f"file://{secret}",
        f"concat:{secret}|{secret}",
        "img%03d.png",
        f"async:file:{secret}",
        "crypto:secret.mp4",
    ]
    (secret_dir / "img001.png").write_bytes(png_frame())
    for url in urls:
        with pytest.raises(MediaError) as e:
            media.load_media_video(url, MediaPolicy())
        assert e.value.status == 400
    for url in urls[:1] + urls[3:]:  # the library: a name is a file name, never a protocol
        with pytest.raises(VideoError):
            read_frames(url)


@needs_av
def test_allowed_local_folder_cannot_be_used_to_reach_a_sibling(secret_dir, tmp_path):
    """An ffconcat file inside --allowed-local-media-path naming a file outside it."""
    root = secret_dir / "media"
    root.mkdir()
    (root / "list.mp4").write_bytes(b"ffconcat version 1.0\nfile secret.mp4\n")
    policy = MediaPolicy(allowed_local_media_path=str(root))
    with pytest.raises(MediaError) as e:
        media.load_media_video("list.mp4", policy)
    assert e.value.code == "invalid_video"


@needs_av
def test_sniffing_is_not_the_only_wall(secret_dir, monkeypatch):
    """Even if sniffing named a playlist demuxer, FFmpeg gets no protocol to open a file with,
    and the opened format is checked against the allowlist."""
    from fastvlm import video

    monkeypatch.setattr(video, "sniff_container", lambda head: "concat")
    data = b"ffconcat version 1.0\nfile secret.mp4\n"
    with pytest.raises(video.VideoError):
        assert_no_secret(video.read_frames(data))
        pytest.fail("decoded")


@needs_av
@pytest.mark.parametrize(
    "fmt, codec, suffix",
    [
        ("mp4", "mpeg4", "mp4"),
        ("mov", "mpeg4", "mov"),
        ("matroska", "mpeg4", "mkv"),
        ("webm", "libvpx", "webm"),
        ("avi", "mpeg4", "avi"),
        ("mpegts", "mpeg2video", "ts"),
        ("flv", "flv", "flv"),
        ("gif", "gif", "gif"),
    ],
)
def test_real_videos_still_decode(tmp_path, fmt, codec, suffix):
    import av

    from fastvlm.video import read_frames

    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg has no {codec} encoder")
    path = tmp_path / f"clip.{suffix}"
    if codec == "gif":
        frames = [Image.new("RGB", (32, 32), (30 + 10 * i,) * 3) for i in range(6)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        data = path.read_bytes()
    else:
        data = write_clip(path, fmt=fmt, codec=codec)
    got = media.load_media_video(data_url(data, f"video/{suffix}"), MediaPolicy(), None, 3)
    assert len(got) == 3 and all(f.image.size == (32, 32) for f in got)
    assert len(read_frames(data, max_frames=2)) == 2
    assert len(read_frames(path, max_frames=2)) == 2


@needs_av
@pytest.mark.parametrize("wh", [(16, 480), (480, 16), (2, 64)])
def test_thin_video_frames_are_refused_like_images(tmp_path, wh):
    data = write_clip(tmp_path / "thin.mkv", fmt="matroska", wh=wh)
    with pytest.raises(MediaError) as e:
        media.load_media_video(data_url(data, "video/x-mkv"), MediaPolicy())
    assert e.value.status == 400 and e.value.code == "invalid_video"
    assert "aspect ratio" in str(e.value)


@needs_av
def test_frame_size_is_checked_from_the_header_before_decoding(tmp_path):
    from fastvlm.errors import VideoError
    from fastvlm.video import read_frames

    data = write_clip(tmp_path / "big.mkv", fmt="matroska", wh=(64, 48))
    with pytest.raises(VideoError, match="pixel limit") as e:
        read_frames(data, max_pixels=64 * 48 - 1)
    assert e.value.kind == "pixels"
    assert len(read_frames(data, max_pixels=64 * 48, max_frames=2)) == 2


# ---------------------------------------------------------------------- 2. image shapes
def header_png(width: int, height: int, mode: str = "L") -> bytes:
    """A valid PNG header claiming width x height (colour type per mode) with a tiny IDAT:
    only a header check can refuse it before the decoder tries."""
    ctype, depth = {"L": (0, 8), "RGB": (2, 8), "RGBA": (6, 8), "P": (3, 8), "I;16": (0, 16)}[mode]

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, ctype, 0, 0, 0)
    plte = chunk(b"PLTE", b"\0\0\0" * 2) if mode == "P" else b""
    body = chunk(b"IHDR", ihdr) + plte + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def real_png(size, mode) -> bytes:
    b = io.BytesIO()
    Image.new(mode, size).save(b, "PNG")
    return b.getvalue()


ABSURD = [  # (width, height): aspect ratio > 20 or a padded square > 2 x the pixel cap
    (1080, 23148),  # the long screenshot
    (23148, 1080),
    (1, 25_000_000),
    (25_000_000, 1),
    (1, 1000),
    (2001, 100),
    (10_000, 2_000),  # 20 M pixels, under the 25 M cap, but a 100 M pixel padded square
    (2_000, 10_000),
    (7_100, 3_000),  # ratio 2.4, padded 50.4 M > 50 M
]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("size", ABSURD, ids=lambda s: f"{s[0]}x{s[1]}")
def test_server_refuses_absurd_shapes_from_the_header(size, mode, monkeypatch):
    from PIL import ImageFile

    def no_decode(self, *a, **k):
        raise AssertionError("decoded before the shape was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(MediaError) as e:
        media.load_media_image(data_url(header_png(*size, mode), "image/png"), MediaPolicy())
    assert e.value.status == 400 and e.value.code == "invalid_image"
    assert "aspect ratio" in str(e.value) or "padded square" in str(e.value)


@pytest.mark.parametrize(
    "size, mode", [((2000, 100), "L"), ((100, 2000), "RGBA"), ((300, 200), "P"), ((64, 64), "I;16")]
)
def test_shapes_within_the_bounds_still_decode(size, mode):
    img = media.load_media_image(data_url(real_png(size, mode), "image/png"), MediaPolicy())
    assert img.size == size and img.mode == "RGB"
    assert load_image(real_png(size, mode)).size == size


def test_operator_limits_are_the_bound():
    png = data_url(real_png((300, 100), "L"), "image/png")
    for policy in (MediaPolicy(max_aspect_ratio=2.5), MediaPolicy(max_padded_pixels=80_000)):
        with pytest.raises(MediaError) as e:
            media.load_media_image(png, policy)
        assert e.value.status == 400
    assert media.load_media_image(png, MediaPolicy(max_padded_pixels=90_000)).size == (300, 100)


def test_real_thin_image_is_a_400_with_bounded_memory():
    """The issue's 500: a real 1 x 25 M greyscale PNG (under the pixel cap). In a fresh process,
    refusing it must not grow the peak RSS by more than the encoded bytes' order of magnitude."""
    code = r"""
import base64, io, resource, sys
from PIL import Image
from fastvlm.server import media
b = io.BytesIO()
Image.new("L", (1, 25_000_000)).save(b, "PNG")
url = "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()
del b
import gc; gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    media.load_media_image(url, media.MediaPolicy())
    print("accepted")
except media.MediaError as e:
    print(e.status, e.code)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    ).stdout.split()
    assert out[:2] == ["400", "invalid_image"], out
    assert int(out[2]) < 64, f"peak RSS grew by {out[2]} MiB"


@pytest.mark.parametrize(
    "size, mode",
    [
        ((1, 200_000), "pad"),
        ((200_000, 1), "crop"),
        ((30, 700), "pad"),
        ((700, 30), "crop"),
        ((9_500, 9_000), "pad"),  # under PIL's own limit, but the padded square is not
        ((200_000, 10_000), "crop"),  # ratio 20, but the resize's intermediate is 204 M pixels
    ],
)
def test_library_preprocess_refuses_before_allocating(size, mode):
    """PIL images handed in directly (no header to check): preprocess_image refuses before the
    padded square or the shortest-edge resize exists."""
    img = Image.new("RGB", size) if size[0] * size[1] < 1_000_000 else _lazy_rgb(size)
    with pytest.raises(ImageError, match="aspect ratio|pixels"):
        preprocess_image(img, 1024, mode)


def _lazy_rgb(size) -> Image.Image:
    """A PIL image object of `size` without its pixels (only `.size` and `.mode` are read
    before the guard fires)."""
    img = Image.new("RGB", (1, 1))
    img._size = size  # PIL keeps the size here
    return img


def test_library_describe_path_gets_image_error(tokenizer):
    proc = Processor(tiny_config(), tokenizer)
    for src in (
        header_png(1, 25_000_000),
        header_png(23_148, 1_080, "RGB"),
        Image.new("L", (1, 5_000)),
        np.zeros((2, 100), np.uint8),
    ):
        with pytest.raises(ImageError, match="aspect ratio"):
            proc.pixels([src])
    with pytest.raises(ImageError, match="no pixels"):
        preprocess_image(Image.new("RGB", (0, 5)), 64, "crop")


def test_pad_then_resize_is_not_resize_then_pad():
    """Why nothing is resized before padding: the results differ, so only the cost is bounded."""
    from fastvlm.images import expand2square

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 60, 3), dtype=np.uint8))
    ref = np.asarray(expand2square(img, (0, 0, 0)).resize((64, 64), Image.BICUBIC), np.int16)
    small = img.resize((13, 64), Image.BICUBIC)
    alt = np.asarray(expand2square(small, (0, 0, 0)).resize((64, 64), Image.BICUBIC), np.int16)
    assert np.abs(ref - alt).max() > 8


# ---------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    import fastvlm
    from fastvlm.server.app import ServerConfig, create_app

    with TestClient(create_app(ServerConfig(), vlm=fastvlm.load(None))) as c:
        yield c


def _chat(client, part: dict):
    body = {
        "model": "fastvlm-tiny",
        "max_tokens": 2,
        "temperature": 0,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}],
    }
    return client.post("/v1/chat/completions", json=body)


@needs_av
def test_http_hostile_videos_are_400_and_real_ones_200(client, secret_dir):
    for name, data in hostile_videos(secret_dir).items():
        r = _chat(client, {"type": "video_url", "video_url": {"url": data_url(data, "video/mp4")}})
        assert r.status_code == 400, (name, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] == "invalid_video" and "secret" not in r.text, name
    clip = write_clip(secret_dir / "ok.mkv", fmt="matroska")
    r = _chat(client, {"type": "video_url", "video_url": {"url": data_url(clip, "video/x-mkv")}})
    assert r.status_code == 200, r.text[:300]


def test_http_thin_and_padded_images_are_400_not_500(client):
    """The issue's 500: a real 1 x 25 M greyscale PNG is within the pixel cap."""
    for png in (real_png((1, 25_000_000), "L"), header_png(10_000, 2_000, "RGB")):
        r = _chat(client, {"type": "image_url", "image_url": {"url": data_url(png, "image/png")}})
        assert r.status_code == 400, r.text[:300]
        err = r.json()["error"]
        assert err["code"] == "invalid_image" and (
            "aspect ratio" in err["message"] or "padded" in err["message"]
        )


@needs_av
def test_capture_devices_still_open_with_v4l2(monkeypatch):
    """The allowlist is for files and bytes; a camera index opens the v4l2 device as before."""
    import types

    import av

    from fastvlm import video

    seen = []
    fake = types.SimpleNamespace(
        format=types.SimpleNamespace(name="video4linux2,v4l2"),
        streams=types.SimpleNamespace(video=["stream"]),
        close=lambda: None,
    )

    def fake_open(target, **kw):
        seen.append((target, kw))
        return fake

    monkeypatch.setattr(av, "open", fake_open)
    assert video._open("0")[1] == "stream"
    assert seen == [("/dev/video0", {"format": "v4l2"})]
