"""Safe image and video loading for the server: data URLs, http(s) URLs and (opt-in) local files.

Every image or video a client names is untrusted. This module turns a URL into a verified RGB
PIL image (or a video's sampled frames) or raises `MediaError` (with the HTTP status the server
should answer: 400 bad input or refused source, 413 too large), and never lets a request make
the server talk to itself or its network neighbours (SSRF: fetch.py).

Design decisions:
* **Verify before decoding**: byte caps apply while reading (the body is never held beyond the
  cap), and the size is read from the header (`Image.open` is lazy) and checked before `load()`
  decompresses anything: the pixel count (decompression bombs) and what preprocessing will
  allocate for it, i.e. the aspect ratio and the square it is padded to (processing.py's
  `check_image_shape`), so a thin 1 x 25 M image is refused instead of becoming a 25 M x 25 M
  canvas.
* Only common raster formats are opened (PNG, JPEG, WebP, GIF, BMP, TIFF): no Ghostscript for
  EPS, no exotic decoders.
* **Videos take the same road as images** (same fetcher, SSRF guard, redirect limit, deadline and
  local-path rule) with their own, larger byte cap (`max_video_bytes`), and are decoded from the
  verified bytes in memory by `fastvlm.video.read_frames`, which only accepts allowlisted
  containers (sniffed, then forced) and lets FFmpeg open no other file or URL. Errors name no
  FFmpeg detail (which could echo a path). Frames are capped like images and count as images
  against the per-request limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError, VideoError
from ..images import check_image_shape, to_rgb
from ..video import CONTAINER_NAMES, read_frames
from .fetch import (  # noqa: F401 - re-exported: the server's media API lives here
    blocked_reason,
    fetch_url,
    host_allowed,
    parse_ip,
    resolve_checked,
)
from .mediapolicy import MediaError, MediaPolicy, byte_limit, too_big

# Formats PIL may open. Others (EPS would run Ghostscript, plus rarely used plugins) are refused
# as unreadable, which keeps hostile files away from code paths nobody audits.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO


# ---------------------------------------------------------------------- data URLs / files
def decode_data_url(url: str, policy: MediaPolicy, what: str = "image") -> bytes:
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise MediaError(f"data URL must look like data:{what}/<type>;base64,<data>")
    if not head[5:].startswith(f"{what}/"):
        raise MediaError(f"data URL media type {head[5:-7]!r} is not a {what}/* type")
    # Size check on the encoded length first: never allocate a decoded oversize payload.
    limit = byte_limit(policy, what)
    if len(data) * 3 // 4 > limit + 3:
        raise too_big(len(data) * 3 // 4, limit, what)
    try:
        out = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data URL has invalid base64: {e}") from e
    if len(out) > limit:  # the estimate above allows for padding
        raise too_big(len(out), limit, what)
    return out


def read_local(url: str, policy: MediaPolicy, what: str = "image") -> bytes:
    root = policy.allowed_local_media_path
    if not root:
        raise MediaError(
            "local files are not served unless the server runs with --allowed-local-media-path",
            status=400,
            code="media_url_refused",
        )
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError("file:// URLs must not name a host")
        raw = unquote(parts.path)
    else:
        raw = url
    base = Path(root).resolve()
    p = Path(raw) if os.path.isabs(raw) else base / raw
    p = p.resolve()  # symlinks resolved: a link inside the folder cannot point outside it
    if not p.is_relative_to(base):
        raise MediaError(
            f"local {what} {raw!r} is outside --allowed-local-media-path",
            status=400,
            code="media_url_refused",
        )
    if not p.is_file():
        raise MediaError(f"local {what} {raw!r} not found")
    limit = byte_limit(policy, what)
    if p.stat().st_size > limit:
        raise too_big(p.stat().st_size, limit, what)
    with open(p, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew since stat()
        raise too_big(len(data), limit, what)
    return data


# ---------------------------------------------------------------------- decoding
def check_shape(w: int, h: int, policy: MediaPolicy, what: str = "image") -> None:
    """Refuse (400) a size whose preprocessing would cost far more than its pixel count."""
    try:
        check_image_shape(
            w, h, max_ratio=policy.max_aspect_ratio, max_pixels=policy.padded_pixel_limit, what=what
        )
    except ImageError as e:
        raise MediaError(str(e), code=f"invalid_{what}") from e


def decode_image(data: bytes, policy: MediaPolicy) -> Image.Image:
    """Bytes → RGB PIL image, refusing oversize or unreadable input before the full decode."""
    if len(data) > policy.max_image_bytes:
        raise too_big(len(data), policy.max_image_bytes)
    if not data:
        raise MediaError("image is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # lazy: reads the header
        w, h = img.size
        if w * h > policy.max_image_pixels:
            raise MediaError(
                f"image is {w}x{h} = {w * h} pixels, more than the limit of "
                f"{policy.max_image_pixels} (decompression bomb guard)",
                status=413,
                code="image_too_large",
            )
        check_shape(w, h, policy)
        img.load()
        return to_rgb(img)
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(
            f"image refused as a decompression bomb: {e}", 413, "image_too_large"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"image bytes are not a readable image ({e})") from e
    except Exception as e:  # PIL plugins raise odd types on hostile files; still a user error
        raise MediaError(f"image could not be decoded ({type(e).__name__}: {e})") from e


def load_media_bytes(
    url: str, policy: MediaPolicy, what: str = "image", deadline: float | None = None
) -> bytes:
    """Any media URL a client may send → its bytes, size-capped (blocking; run in a thread).
    `deadline` (time.monotonic()) bounds a download; default now + fetch_timeout_s."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{what} URL must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, policy, what)
    if scheme in ("http", "https"):
        return fetch_url(url, policy, what, deadline)
    if scheme == "file" or not scheme or (len(scheme) == 1 and os.name == "nt"):
        return read_local(url, policy, what)
    raise MediaError(f"{what} URL scheme {scheme!r} is not supported (data:, http(s):, file:)")


def load_media_image(url: str, policy: MediaPolicy, deadline: float | None = None) -> Image.Image:
    """Any image URL a client may send → a verified RGB image (blocking; run in a thread)."""
    return decode_image(load_media_bytes(url, policy, "image", deadline), policy)


# ---------------------------------------------------------------------- video
def check_video_support() -> None:
    """Raise a 400 naming the extra to install when PyAV is missing (before any download)."""
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise MediaError(
            "video input needs PyAV, which this server does not have: install it with "
            "pip install 'fastvlm[video]' (or pip install av) and restart the server",
            code="video_unsupported",
        ) from e


def decode_video(
    data: bytes, policy: MediaPolicy, fps: float | None = None, max_frames: int = 16
) -> list:
    """Video bytes → sampled frames (`fastvlm.video.Frame`: index, time, RGB image), time order.

    Decoded from memory: no temporary file, no path FFmpeg could be pointed away from."""
    check_video_support()
    if len(data) > policy.max_video_bytes:
        raise too_big(len(data), policy.max_video_bytes, "video")
    if not data:
        raise MediaError("video is empty", code="invalid_video")
    try:
        frames = read_frames(
            data,
            fps=fps,
            max_frames=max_frames,
            max_bytes=policy.max_video_bytes,
            max_pixels=policy.max_image_pixels,
        )
    except VideoError as e:
        if e.kind == "pixels":
            raise MediaError(str(e), status=413, code="video_too_large") from e
        if e.kind == "container":
            raise MediaError(
                f"video bytes are not an accepted container (accepted: {CONTAINER_NAMES})",
                code="invalid_video",
            ) from e
        # FFmpeg's own words are not repeated: they could name a file it was pointed at
        raise MediaError(
            "video bytes could not be decoded (corrupt, truncated, no video stream or an "
            "unsupported codec)",
            code="invalid_video",
        ) from e
    except Exception as e:  # demuxers raise odd types on hostile files; still a user error
        raise MediaError(
            f"video could not be decoded ({type(e).__name__})", code="invalid_video"
        ) from e
    w, h = frames[0].image.size
    check_shape(w, h, policy, "video")
    return frames


def load_media_video(
    url: str,
    policy: MediaPolicy,
    fps: float | None = None,
    max_frames: int = 16,
    deadline: float | None = None,
) -> list:
    """Any video URL a client may send → its sampled frames (blocking; run in a thread)."""
    check_video_support()  # before fetching up to max_video_bytes for nothing
    data = load_media_bytes(url, policy, "video", deadline)
    return decode_video(data, policy, fps, max_frames)
