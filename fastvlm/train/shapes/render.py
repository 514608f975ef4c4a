"""Drawing a scene: the background, 4x supersampled shapes and pixel noise."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from .scene import _SUPERSAMPLE, Background, Scene, _as_rng, _outline, sample_scene

# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _background_array(bg: Background, size: int) -> np.ndarray:
    start = np.asarray(bg.start, dtype=np.float32)
    end = np.asarray(bg.end, dtype=np.float32)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    if bg.mode == "solid":
        t = np.zeros((size, size), dtype=np.float32)
    elif bg.mode == "horizontal":
        t = np.broadcast_to(coords[None, :], (size, size))
    elif bg.mode == "vertical":
        t = np.broadcast_to(coords[:, None], (size, size))
    elif bg.mode == "diagonal":
        t = 0.5 * (coords[None, :] + coords[:, None])
    else:
        raise ValueError(f"unknown background mode {bg.mode!r}")
    return start + (end - start) * t[..., None]


def render_scene(scene: Scene, rng: random.Random | int) -> Image.Image:
    """Draw ``scene`` as an RGB image; ``rng`` only seeds the pixel noise."""
    rng = _as_rng(rng)
    size, ss = scene.size, _SUPERSAMPLE
    img = _background_array(scene.background, size)
    for s in scene.shapes:
        x0, y0 = max(0, math.floor(s.bbox[0]) - 1), max(0, math.floor(s.bbox[1]) - 1)
        x1, y1 = min(size, math.ceil(s.bbox[2]) + 1), min(size, math.ceil(s.bbox[3]) + 1)
        w, h = x1 - x0, y1 - y0
        mask = Image.new("L", (w * ss, h * ss), 0)
        draw = ImageDraw.Draw(mask)
        ox, oy = (s.cx - x0) * ss, (s.cy - y0) * ss
        if s.kind == "circle":
            r = s.radius * ss
            draw.ellipse((ox - r, oy - r, ox + r, oy + r), fill=255)
        else:
            pts = _outline(s.kind, s.radius, s.rotation)
            draw.polygon([(ox + x * ss, oy + y * ss) for x, y in pts], fill=255)
        alpha = np.asarray(mask.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
        region = img[y0:y1, x0:x1]
        color = np.asarray(s.rgb, dtype=np.float32)
        img[y0:y1, x0:x1] = region + (color - region) * alpha[..., None]
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    img = img + noise_rng.normal(0.0, scene.background.noise_sigma, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def draw_scene(rng: random.Random | int, size: int = 256) -> tuple[Image.Image, Scene]:
    """Sample a scene of 1-4 shapes and render it at ``size`` x ``size`` pixels."""
    rng = _as_rng(rng)
    scene = sample_scene(rng, size)
    return render_scene(scene, rng), scene
