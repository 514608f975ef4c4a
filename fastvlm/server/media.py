"""Safe image and video loading for the server: data URLs, http(s) URLs and (opt-in) local files.

Every image or video a client names is untrusted. This module turns a URL into a verified RGB
PIL image (or a video's sampled frames) or raises `MediaError` (with the HTTP status the server
should answer: 400 bad input or refused source, 413 too large), and never lets a request make
the server talk to itself or its network neighbours (SSRF).

Design decisions:
* **Check the address, then connect to exactly that address.** A host name is resolved once,
  every resolved address must be public (`blocked_reason`), and the TCP connection goes to the
  checked IP (TLS still verifies the certificate for the host name). A DNS answer that changes
  between check and connect (DNS rebinding) therefore cannot reach a private address. Redirects
  are followed by hand, each hop re-checked the same way, up to `max_redirects`.
* **Numeric disguises are normalised before the check**: `127.1`, `2130706433`, `0x7f000001`,
  `[::1]`, IPv4-mapped / NAT64 / 6to4 IPv6 all reduce to the IPv4 address they reach.
* **Verify before decoding**: byte caps apply while reading (the body is never held beyond the
  cap), and the pixel count is read from the header (`Image.open` is lazy) and capped before
  `load()` decompresses anything, which refuses decompression bombs cheaply.
* Only common raster formats are opened (PNG, JPEG, WebP, GIF, BMP, TIFF): no Ghostscript for
  EPS, no exotic decoders.
* **Videos take the same road as images** (same fetcher, SSRF guard, redirect limit, deadline and
  local-path rule) with their own, larger byte cap (`max_video_bytes`). PyAV needs a seekable
  source it can open twice (a demux pass picks the frames, a decode pass decodes only those), so
  the verified bytes go to a private temporary file that is always deleted; frame sizes are
  capped by `max_image_pixels`, and frames count as images against the per-request limit.
* No third-party HTTP client: `http.client` with a pinned socket is small enough to audit and
  runs in a worker thread (the caller wraps it in `asyncio.to_thread`).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from ..processing import to_rgb

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Ranges Python's `is_global` does not flag but no image server lives in.
_EXTRA_BLOCKED = [ipaddress.ip_network(n) for n in ("100.64.0.0/10", "192.0.0.0/24", "0.0.0.0/8")]


# Formats PIL may open. Others (EPS would run Ghostscript, plus rarely used plugins) are refused
# as unreadable, which keeps hostile files away from code paths nobody audits.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO


class MediaError(ValueError):
    """An image source was refused or unreadable; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(slots=True)
class MediaPolicy:
    max_image_bytes: int = 20 * 1024 * 1024  # encoded bytes (data URL payload or download)
    max_video_bytes: int = 50 * 1024 * 1024  # encoded video bytes (data URL payload or download)
    max_image_pixels: int = 25_000_000  # width * height, checked before decoding
    fetch_timeout_s: float = 10.0  # whole fetch, all redirects included
    max_redirects: int = 3
    allowed_local_media_path: str | None = None  # file:// and paths only under this folder
    # Hosts that may be fetched even though they resolve to private/loopback addresses.
    allowed_media_domains: list[str] = field(default_factory=list)
    allow_remote: bool = True  # False: data URLs (and allowed local files) only


# ---------------------------------------------------------------------- SSRF decision
def parse_ip(host: str) -> IPAddress | None:
    """An IP literal in any spelling the OS resolver would accept → the address; else None.

    `inet_aton` accepts the legacy forms (`127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`)
    that `ipaddress` rejects but `getaddrinfo` happily connects to.
    """
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(h))
    except (OSError, ValueError):
        return None


def _unwrap(ip: IPAddress) -> IPAddress:
    """IPv6 forms that carry an IPv4 destination → that IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return ip


def blocked_reason(ip: IPAddress) -> str | None:
    """Why a connection to `ip` is refused (None = public, allowed)."""
    ip = _unwrap(ip)
    for name in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if isinstance(ip, ipaddress.IPv4Address) and any(ip in n for n in _EXTRA_BLOCKED):
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


def host_allowed(host: str, allowed: list[str]) -> bool:
    """`host` is named by --allowed-media-domains (exactly, or as a subdomain of an entry)."""
    h = host.strip("[]").lower().rstrip(".")
    for d in allowed:
        d = d.strip("[]").lower().rstrip(".")
        if d and (h == d or h.endswith("." + d)):
            return True
    return False


def resolve_checked(
    host: str, port: int, policy: MediaPolicy, what: str = "image"
) -> list[IPAddress]:
    """Resolve `host` and return the addresses it is safe to connect to, or raise MediaError.

    Every address the name resolves to must be public (one private answer refuses the whole
    name: a resolver round-robin could otherwise pick it later), unless the host is allowed.
    """
    if not host:
        raise MediaError(f"{what} URL has no host")
    ip = parse_ip(host)
    if ip is not None:
        addrs = [ip]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError) as e:
            raise MediaError(f"{what} URL host {host!r} could not be resolved ({e})") from e
        addrs = []
        for info in infos:
            a = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if a not in addrs:
                addrs.append(a)
        if not addrs:
            raise MediaError(f"{what} URL host {host!r} has no addresses")
    if host_allowed(host, policy.allowed_media_domains):
        return addrs
    for a in addrs:
        reason = blocked_reason(a)
        if reason:
            raise MediaError(
                f"{what} URL host {host!r} resolves to a {reason} address ({a}); the server only "
                "fetches from public addresses (an operator can allow a host with "
                "--allowed-media-domains)",
                status=400,
                code="media_url_refused",
            )
    return addrs


# ---------------------------------------------------------------------- fetching
def _connect(ip: IPAddress, port: int, timeout: float) -> socket.socket:
    """The one place a socket is opened (tests patch it to prove nothing else connects)."""
    return socket.create_connection((str(ip), port), timeout=timeout)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, ip: IPAddress, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = _connect(self._ip, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, ip: IPAddress, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = _connect(self._ip, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, policy: MediaPolicy, what: str = "image") -> bytes:
    """GET an http(s) URL safely (SSRF guard, redirects re-checked, byte cap, deadline).
    `what` ("image" or "video") picks the byte cap and names the media in errors."""
    limit = _limit(policy, what)
    if not policy.allow_remote:
        raise MediaError(f"this server does not fetch {what} URLs; send the {what} as a data URL")
    deadline = time.monotonic() + policy.fetch_timeout_s
    for _hop in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise MediaError(f"{what} URL scheme {parts.scheme!r} is not allowed (http/https)")
        if parts.username or parts.password:
            raise MediaError(f"{what} URLs with credentials are not allowed")
        host = parts.hostname or ""
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise MediaError(f"{what} URL has an invalid port: {e}") from e
        ip = resolve_checked(host, port, policy, what)[0]
        left = deadline - time.monotonic()
        if left <= 0:
            raise MediaError(f"{what} download timed out", status=400, code="media_timeout")
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, ip, port, timeout=left)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": "fastvlm-server", "Accept": f"{what}/*"}
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.getheader("Location")
                if not loc:
                    raise MediaError(f"{what} URL redirected ({resp.status}) without a Location")
                url = urljoin(url, loc)
                continue
            if resp.status != 200:
                raise MediaError(
                    f"{what} URL answered HTTP {resp.status}", code="media_fetch_failed"
                )
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise _too_big(int(length), limit, what)
            buf = bytearray()
            while chunk := resp.read(64 * 1024):
                buf += chunk
                if len(buf) > limit:
                    raise _too_big(len(buf), limit, what)
                if time.monotonic() > deadline:
                    raise MediaError(f"{what} download timed out", code="media_timeout")
            return bytes(buf)
        except (OSError, http.client.HTTPException) as e:
            raise MediaError(
                f"{what} URL could not be fetched: {e}", code="media_fetch_failed"
            ) from e
        finally:
            conn.close()
    raise MediaError(f"{what} URL redirected more than {policy.max_redirects} times")


def _limit(policy: MediaPolicy, what: str) -> int:
    return policy.max_video_bytes if what == "video" else policy.max_image_bytes


def _too_big(n: int, limit: int, what: str = "image") -> MediaError:
    return MediaError(
        f"{what} is {n} bytes, more than the limit of {limit}",
        status=413,
        code=f"{what}_too_large",
    )


# ---------------------------------------------------------------------- data URLs / files
def decode_data_url(url: str, policy: MediaPolicy, what: str = "image") -> bytes:
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise MediaError(f"data URL must look like data:{what}/<type>;base64,<data>")
    if not head[5:].startswith(f"{what}/"):
        raise MediaError(f"data URL media type {head[5:-7]!r} is not a {what}/* type")
    # Size check on the encoded length first: never allocate a decoded oversize payload.
    limit = _limit(policy, what)
    if len(data) * 3 // 4 > limit + 3:
        raise _too_big(len(data) * 3 // 4, limit, what)
    try:
        out = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data URL has invalid base64: {e}") from e
    if len(out) > limit:  # the estimate above allows for padding
        raise _too_big(len(out), limit, what)
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
    limit = _limit(policy, what)
    if p.stat().st_size > limit:
        raise _too_big(p.stat().st_size, limit, what)
    with open(p, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew since stat()
        raise _too_big(len(data), limit, what)
    return data


# ---------------------------------------------------------------------- decoding
def decode_image(data: bytes, policy: MediaPolicy) -> Image.Image:
    """Bytes → RGB PIL image, refusing oversize or unreadable input before the full decode."""
    if len(data) > policy.max_image_bytes:
        raise _too_big(len(data), policy.max_image_bytes)
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
        img.load()
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
    return to_rgb(img)


def load_media_bytes(url: str, policy: MediaPolicy, what: str = "image") -> bytes:
    """Any media URL a client may send → its bytes, size-capped (blocking; run in a thread)."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{what} URL must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, policy, what)
    if scheme in ("http", "https"):
        return fetch_url(url, policy, what)
    if scheme == "file" or not scheme or (len(scheme) == 1 and os.name == "nt"):
        return read_local(url, policy, what)
    raise MediaError(f"{what} URL scheme {scheme!r} is not supported (data:, http(s):, file:)")


def load_media_image(url: str, policy: MediaPolicy) -> Image.Image:
    """Any image URL a client may send → a verified RGB image (blocking; run in a thread)."""
    return decode_image(load_media_bytes(url, policy, "image"), policy)


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

    The bytes go to a private temporary file (PyAV opens it twice), deleted afterwards."""
    from ..errors import VideoError
    from ..video import read_frames

    check_video_support()
    if len(data) > policy.max_video_bytes:
        raise _too_big(len(data), policy.max_video_bytes, "video")
    if not data:
        raise MediaError("video is empty", code="invalid_video")
    fd, path = tempfile.mkstemp(prefix="fastvlm-video-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return read_frames(
            path,
            fps=fps,
            max_frames=max_frames,
            max_bytes=policy.max_video_bytes,
            max_pixels=policy.max_image_pixels,
        )
    except VideoError as e:
        msg = str(e).replace(path, "video")  # never show the temporary path
        if "pixel limit" in msg:
            raise MediaError(msg, status=413, code="video_too_large") from e
        raise MediaError(f"video bytes could not be decoded: {msg}", code="invalid_video") from e
    except Exception as e:  # demuxers raise odd types on hostile files; still a user error
        raise MediaError(
            f"video could not be decoded ({type(e).__name__})", code="invalid_video"
        ) from e
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def load_media_video(
    url: str, policy: MediaPolicy, fps: float | None = None, max_frames: int = 16
) -> list:
    """Any video URL a client may send → its sampled frames (blocking; run in a thread)."""
    check_video_support()  # before fetching up to max_video_bytes for nothing
    return decode_video(load_media_bytes(url, policy, "video"), policy, fps, max_frames)
