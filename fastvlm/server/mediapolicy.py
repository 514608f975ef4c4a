"""The media policy (limits an operator sets) and `MediaError`, shared by fetch.py and media.py.

Kept apart so the network side (fetch.py) and the decoding side (media.py) both depend on it
without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..images import MAX_ASPECT_RATIO


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
    # Longest side / shortest side; beyond it an image is refused before decoding (processing.py).
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    # Pixels of the square an image is padded to (max side squared); None = 2 x max_image_pixels.
    max_padded_pixels: int | None = None
    fetch_timeout_s: float = 10.0  # total wall clock per fetch: DNS, connect, headers, body, hops
    max_redirects: int = 3
    media_workers: int = 8  # threads that fetch / decode media, apart from text work
    max_queued_media: int = 64  # media jobs admitted (running + waiting); more → 429
    allowed_local_media_path: str | None = None  # file:// and paths only under this folder
    # Hosts that may be fetched even though they resolve to private/loopback addresses.
    allowed_media_domains: list[str] = field(default_factory=list)
    allow_remote: bool = True  # False: data URLs (and allowed local files) only

    @property
    def padded_pixel_limit(self) -> int:
        if self.max_padded_pixels is not None:
            return self.max_padded_pixels
        return 2 * self.max_image_pixels


def byte_limit(policy: MediaPolicy, what: str) -> int:
    return policy.max_video_bytes if what == "video" else policy.max_image_bytes


def too_big(n: int, limit: int, what: str = "image") -> MediaError:
    return MediaError(
        f"{what} is {n} bytes, more than the limit of {limit}",
        status=413,
        code=f"{what}_too_large",
    )
