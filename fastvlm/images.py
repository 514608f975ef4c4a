"""Image inputs → RGB PIL images → the pixel tensor the model sees.

Design decisions:
* Pixels follow each checkpoint format's reference exactly: Apple = pad to square with the mean
  colour (black), bicubic resize to S; transformers = shortest-edge bicubic resize + centre crop.
  Both rescale by 1/255 in float64 (as transformers' CLIP processor does) then normalise.
* No network here: URLs are the server's job (server/media.py). Data URLs are decoded locally.
* Preprocessing is bounded by what it allocates, not by the image's pixel count: a 1 x 25 M
  image is small, but padding it to a square makes a 25 M x 25 M canvas. `check_image_shape`
  refuses a longest/shortest side ratio over `MAX_ASPECT_RATIO` and a padded square (or, for
  resize + crop, a resized intermediate) over `MAX_PREPROCESS_PIXELS`, from the header, before
  anything is decoded or allocated. Nothing is resized before padding: bicubic resampling of the
  padded square is not the same as padding a resized image, and the reference pixels matter.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

# Beyond 1:20 the short side keeps under 1/20 of the model's input (51 of 1024 pixels) after
# padding: the model sees a sliver, while the padded square costs ratio x the image's pixels.
MAX_ASPECT_RATIO = 20.0
# Largest buffer (pixels) preprocessing may allocate: PIL's own decompression-bomb threshold
# (Image.MAX_IMAGE_PIXELS' default), so a padded square is held to what PIL allows a decoded image.
MAX_PREPROCESS_PIXELS = 89_478_485
ImageInput = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray | torch.Tensor


def load_image(src: ImageInput) -> Image.Image:
    """Any supported image input → an RGB PIL image (EXIF rotation applied)."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        img = _open(io.BytesIO(bytes(src)), "image bytes")
    elif isinstance(src, np.ndarray) or isinstance(src, torch.Tensor):
        img = _from_array(src)
    elif isinstance(src, (str, os.PathLike)):
        s = str(src)
        if s.startswith("data:"):
            img = _open(io.BytesIO(decode_data_url(s)), "data URL")
        elif s.startswith(("http://", "https://")):
            raise ImageError(
                f"{s[:80]}: URLs are not fetched by the library (no network access from here); "
                "download the image first, or send it to `fastvlm serve`, which fetches safely"
            )
        else:
            p = Path(s).expanduser()
            if not p.exists():
                raise ImageError(f"image not found: {p}")
            if p.is_dir():
                raise ImageError(f"{p} is a folder, not an image")
            with open(p, "rb") as f:
                img = _open(io.BytesIO(f.read()), str(p))
    else:
        raise ImageError(f"unsupported image input of type {type(src).__name__}")
    return to_rgb(img)


def preprocess_pixels(w: int, h: int, size: int | None = None, mode: str = "pad") -> int:
    """Pixels of the largest buffer `preprocess_image` allocates for a w x h image: the padded
    square ("pad"), or the shortest-edge resize and PIL's horizontal-pass intermediate (crop)."""
    if mode == "pad" or size is None:
        side = max(w, h)
        return side * max(side, size or 0)
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return max(nw * nh, nw * h)


def check_image_shape(
    w: int,
    h: int,
    size: int | None = None,
    mode: str = "pad",
    *,
    max_ratio: float = MAX_ASPECT_RATIO,
    max_pixels: int | None = MAX_PREPROCESS_PIXELS,
    what: str = "image",
) -> None:
    """Raise ImageError when preprocessing a w x h image would be absurd or too costly; cheap
    (sizes only), so callers run it on the header before decoding. `max_pixels` None checks
    only the shape (the cost depends on the model's mode and size)."""
    if w < 1 or h < 1:
        raise ImageError(f"{what}: {w}x{h} has no pixels")
    ratio = max(w, h) / min(w, h)
    if ratio > max_ratio:
        raise ImageError(
            f"{what}: {w}x{h} has an aspect ratio of 1:{ratio:.2f}; the limit is 1:{max_ratio:g} "
            "(preprocessing pads it to a square or crops a square out of it: the cost follows "
            "the longest side and the model would see a sliver or a fragment): crop or split it"
        )
    need = preprocess_pixels(w, h, size, mode)
    if max_pixels is not None and need > max_pixels:
        side = max(w, h)
        what_buf = f"a {side}x{side} padded square" if mode == "pad" else "a resized copy"
        raise ImageError(
            f"{what}: {w}x{h} needs {what_buf} of {need} pixels to preprocess, more than "
            f"the limit of {max_pixels}: downscale it first"
        )


def _open(fp: io.BytesIO, name: str) -> Image.Image:
    try:
        img = Image.open(fp)
        # shape from the header, before decoding; the mode-specific cost: preprocess_image
        check_image_shape(*img.size, max_pixels=None, what=name)
        img.load()  # decode now so truncation errors surface here
        return img
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused, too many pixels (decompression bomb guard): {e}") from e
    except UnidentifiedImageError as e:  # its message names a BytesIO object: not useful
        raise ImageError(f"{name}: not a readable image (unknown format or corrupt)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from e


def decode_data_url(url: str) -> bytes:
    head, _, data = url.partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        raise ImageError("data URL must look like data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(data, validate=True)
    except (ValueError, base64.binascii.Error) as e:
        raise ImageError(f"data URL has invalid base64: {e}") from e


def _from_array(a) -> Image.Image:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW → HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(f"array image must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion for every PIL mode: 16-bit/float greys are rescaled (PIL would clip), alpha
    is composited onto black (the pad colour), palette transparency honoured."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and hi > 255):
            scale = 255.0 / 65535.0
        elif mode == "F" and hi <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
        arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Apple's pad-to-square: centre with floor offsets on a background-coloured canvas."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess_image(
    img: Image.Image,
    size: int,
    mode: str = "pad",
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """RGB PIL image → float32 (3, size, size)."""
    check_image_shape(*img.size, size, mode)  # before the padded square / resize is allocated
    if mode == "pad":
        img = expand2square(img, tuple(int(m * 255) for m in mean))
        img = img.resize((size, size), Image.BICUBIC)
    else:  # shortest edge → size, then centre crop (transformers' CLIPImageProcessor)
        w, h = img.size
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        img = img.resize((nw, nh), Image.BICUBIC)
        top, left = (nh - size) // 2, (nw - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float64) * (1 / 255)
    arr = ((arr - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
