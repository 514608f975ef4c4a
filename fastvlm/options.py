"""Checks for the user options every command shares: tokens per image, video sampling.

(The image size is checked by `VisionConfig.validate`, so every loader gets that check.)

Each check runs up front against the *loaded* model's config (not a generic bound), so a bad value
fails once, before any work or worker starts, with a short message that lists the valid values.
A list of valid values is abbreviated past a few entries, so no message grows with the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError

MAX_FRAMES = 1024
MAX_LISTED = 8


def short_list(values: Sequence[Any]) -> str:
    """'a, b, c' — or 'a, b, c, …, y, z' when there are more than MAX_LISTED values."""
    vals = [str(v) for v in values]
    if len(vals) > MAX_LISTED:
        vals = vals[:3] + ["…"] + vals[-2:]
    return ", ".join(vals)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def tokens_per_image_choices(native: int) -> list[int]:
    """The token counts an image can be pooled to: perfect squares ≤ `native`, largest first."""
    return [i * i for i in range(math.isqrt(native), 0, -1)]


def valid_tokens_per_image(k: Any, native: int) -> bool:
    """The one rule: an int that is a perfect square ≤ the model's `native` image tokens."""
    return _is_int(k) and 0 < k <= native and math.isqrt(k) ** 2 == k


def check_tokens_per_image(k: Any, native: int) -> int | None:
    """`k` if it is a perfect square ≤ the model's `native` image tokens (None = native)."""
    if k is None:
        return None
    if valid_tokens_per_image(k, native):
        return k
    raise ConfigError(
        f"tokens per image {k!r} is not valid for this model ({native} image tokens): use one of "
        f"{short_list(tokens_per_image_choices(native))}"
    )


def check_video_sampling(fps: Any = None, max_frames: Any = None, name: str = "max frames") -> None:
    """fps > 0 (or None) and 1 ≤ max_frames ≤ MAX_FRAMES (or None)."""
    if fps is not None and not (isinstance(fps, (int, float)) and 0 < fps <= 1000):
        raise ConfigError(
            f"fps {fps!r} is not valid: use a number of frames per second in (0, 1000]"
        )
    if max_frames is not None and not (_is_int(max_frames) and 1 <= max_frames <= MAX_FRAMES):
        raise ConfigError(f"{name} {max_frames!r} is not valid: use 1 to {MAX_FRAMES}")


def check_media(
    config,
    *,
    tokens_per_image: Any = None,
    fps: Any = None,
    max_frames: Any = None,
    max_images: Any = None,
) -> None:
    """All media options of a command against the loaded model's `FastVLMConfig`."""
    check_tokens_per_image(tokens_per_image, config.num_image_tokens)
    check_video_sampling(fps, max_frames)
    if max_images is not None and not (_is_int(max_images) and max_images >= 1):
        raise ConfigError(f"max images {max_images!r} is not valid: use 1 or more")
