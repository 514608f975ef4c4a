"""The MLX backend: mlx-vlm's FastVLM network (vision tower, projector, Qwen2) run by MLX, for
Apple silicon, behind the same `Backend` protocol as the torch engine.

The network is mlx-vlm's (`mlx_vlm.models.fastvlm`, loaded by mlx_load.py); this file adds what
fastvlm offers on top and mlx-vlm lacks: `tokens_per_image` (the feature grid is average-pooled
in MLX before the projector, the same adaptive pooling as the torch model), our expanded image
placeholders (K rows per image, merged by position), and the shared batch-1 decode loop of
engine/generate.py, so every `SamplingParams` field (temperature, top-p, top-k, repetition
penalty, seed, ignore_eos, max_tokens) means exactly what it means on torch: logits come back to
the host each step (one vocabulary row) and are sampled by the same code with the same seeded
generator. Requests are serialised (`batches_concurrently` False): one lock around MLX work.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..config import FastVLMConfig
from ..engine.generate import Stats, check_context, decode_loop
from ..engine.sampling import SamplingParams, make_generator
from ..errors import ConfigError
from ..mlx_format import MLX_INSTALL
from ..model.fastvlm import check_tokens_per_image
from ..tokenization import generation_limits
from .mlx_load import UNSUPPORTED, describe_dtype, load_mlx_model
from .step import StepGeneration

PREFILL_CHUNK = 2048  # prompt tokens per prefill forward (bounds the attention activations)


def pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging weights of `F.adaptive_avg_pool1d`: bin i covers
    [floor(i·size/out), ceil((i+1)·size/out))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        a, b = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, a:b] = 1.0 / (b - a)
    return m


class MlxBackend:
    """mlx-vlm FastVLM behind the `Backend` protocol (see base.py)."""

    name: ClassVar[str] = "mlx"

    def __init__(
        self,
        model,
        config: FastVLMConfig,
        *,
        eos_ids: list[int] | None = None,
        vocab_limit: int | None = None,
        source: str = "",
        device: str | None = None,
    ) -> None:
        import mlx.core as mx

        self.model = model
        self.config = config
        eos = config.text.eos_token_id if eos_ids is None else eos_ids
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or ()))
        self.vocab_limit = vocab_limit
        self.source = source
        self._lock = threading.Lock()
        self._mx = mx
        self._pools: dict[tuple[int, int], Any] = {}
        if device not in (None, "auto", "cpu", "gpu"):
            raise ConfigError(f"{UNSUPPORTED}device {device!r} (use auto, gpu or cpu)")
        self._device = (
            mx.default_device() if device in (None, "auto") else mx.Device(getattr(mx, device))
        )

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        dtype: str | None = None,
        device: str | None = None,
        eos_ids: list[int] | None = None,
        vocab_limit: int | None = None,
        image_size: int | None = None,
        trust_pickle: bool = False,
    ) -> MlxBackend:
        model, cfg = load_mlx_model(
            Path(folder), dtype, image_size=image_size, trust_pickle=trust_pickle
        )
        return cls(
            model, cfg, eos_ids=eos_ids, vocab_limit=vocab_limit, source=str(folder), device=device
        )

    # ------------------------------------------------------------------ protocol properties
    @property
    def batches_concurrently(self) -> bool:
        return False

    @property
    def device(self) -> str:
        return f"mlx:{self._device.type.name}"

    @property
    def dtype(self) -> str:
        return describe_dtype(self.model)

    @property
    def max_len(self) -> int:
        return self.config.text.max_position_embeddings

    def info(self) -> dict[str, Any]:
        import mlx_vlm

        return {
            "backend": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "batches_concurrently": False,
            "requests": "serialised (one at a time)",
            "mlx_version": self._mx.__version__,
            "mlx_vlm_version": getattr(mlx_vlm, "__version__", "unknown"),
        }

    def close(self) -> None:
        with self._lock:
            self.model = None
            self._pools.clear()
            self._mx.clear_cache()

    # ------------------------------------------------------------------ vision
    def _image_rows(self, pixels: torch.Tensor, tokens_per_image: int | None):
        """(N, 3, S, S) torch pixels → projected rows mx (N, K, D)."""
        mx = self._mx
        if self.model is None:
            raise RuntimeError("this mlx backend was closed")
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (N, 3, S, S), got {tuple(pixels.shape)}")
        m = self.model
        dt = m.vision_tower.vision_model.patch_embed.blocks[0].reparam_conv.weight.dtype
        # MLX convolutions are channels-last: (N, 3, S, S) -> (N, S, S, 3).
        x = mx.array(pixels.detach().to(torch.float32).cpu().numpy()).astype(dt)
        _, feats, _ = m.vision_tower(x.transpose(0, 2, 3, 1))  # (N, h, w, C)
        n, h, w, c = feats.shape
        k = check_tokens_per_image(tokens_per_image, h * w)
        if k != h * w:
            side = math.isqrt(k)
            ph, pw = self._pool(h, side), self._pool(w, side)
            feats = mx.einsum("ih,nhwc,jw->nijc", ph, feats.astype(mx.float32), pw).astype(dt)
        return m.mm_projector(feats.reshape(n, -1, c))  # (N, K, D)

    def _pool(self, size: int, out: int):
        key = (size, out)
        if key not in self._pools:
            self._pools[key] = self._mx.array(pool_matrix(size, out))
        return self._pools[key]

    def encode_images(
        self, pixels: torch.Tensor, tokens_per_image: int | None = None
    ) -> torch.Tensor:
        with self._lock, self._mx.stream(self._device):
            rows = self._image_rows(pixels, tokens_per_image)
            return torch.from_numpy(np.array(rows.astype(self._mx.float32)))

    # ------------------------------------------------------------------ generation
    def _embed(self, ids: list[int], rows):
        """Token embeddings (1, T, D) with the image placeholder rows replaced, in order."""
        mx = self._mx
        image_id = self.config.image_token_id
        ids_np = np.asarray(ids, dtype=np.int64)
        is_img = ids_np == image_id
        n_slots = int(is_img.sum())
        safe = mx.array(np.where(is_img, 0, ids_np).astype(np.int32))
        emb = self.model.language_model.model.embed_tokens(safe)  # (T, D)
        if rows is None:
            if n_slots:
                raise ValueError(f"{n_slots} image placeholder tokens but no image was given")
            return emb[None]
        flat = rows.reshape(-1, rows.shape[-1]).astype(emb.dtype)
        if flat.shape[0] != n_slots:
            raise ValueError(
                f"image features ({flat.shape[0]} rows) and image placeholder tokens "
                f"({n_slots}) do not match"
            )
        order = mx.array(np.clip(np.cumsum(is_img) - 1, 0, None).astype(np.int32))
        return mx.where(mx.array(is_img)[:, None], flat[order], emb)[None]

    def _logits_row(self, out) -> torch.Tensor:
        """Last position's logits → (1, V) float32 torch on the host (for the shared sampler)."""
        mx = self._mx
        last = out.logits[:, -1, :].astype(mx.float32)
        return torch.from_numpy(np.array(last))

    def _prefill(self, ids: list[int], pixels, tokens_per_image, stats: Stats, cache):
        mx = self._mx
        lm = self.model.language_model
        t0 = time.perf_counter()
        rows = None
        if pixels is not None:
            rows = self._image_rows(pixels, tokens_per_image)
            mx.eval(rows)
            stats.vision_s = time.perf_counter() - t0
        emb = self._embed(ids, rows)
        tokens = mx.array(np.asarray(ids, dtype=np.int32))[None]
        out = None
        for s in range(0, len(ids), PREFILL_CHUNK):
            e = s + PREFILL_CHUNK
            out = lm(tokens[:, s:e], cache=cache, inputs_embeds=emb[:, s:e])
            if e < len(ids):
                mx.eval([c.state for c in cache])
        return self._logits_row(out)

    def submit(
        self,
        ids: list[int],
        pixels: torch.Tensor | None,
        params: SamplingParams,
        *,
        tokens_per_image: int | None = None,
    ) -> StepGeneration:
        if self.model is None:
            raise RuntimeError("this mlx backend was closed")
        params.validate()
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("empty prompt")
        check_context(len(ids), params.max_tokens, self.max_len)
        n_slots = sum(1 for i in ids if i == self.config.image_token_id)
        n_images = 0 if pixels is None else int(pixels.shape[0])
        k = check_tokens_per_image(tokens_per_image, self.config.num_image_tokens)
        if n_slots != n_images * k:
            raise ValueError(
                f"{n_slots} image placeholder tokens but {n_images} image(s) x {k} tokens each"
            )
        eos = set() if params.ignore_eos else set(self.eos_ids)

        def start(stats: Stats) -> Iterator[int]:
            stats.prompt_tokens, stats.image_tokens = len(ids), n_slots
            return self._run(ids, pixels, params, tokens_per_image, stats, eos)

        return StepGeneration(start, eos)

    def _run(self, ids, pixels, params, tokens_per_image, stats, eos) -> Iterator[int]:
        from mlx_vlm.models.cache import make_prompt_cache

        mx = self._mx
        lm = self.model.language_model
        with self._lock, mx.stream(self._device):
            cache = make_prompt_cache(lm)
            t0 = time.perf_counter()
            logits = self._prefill(ids, pixels, tokens_per_image, stats, cache)
        seen = torch.tensor([ids], dtype=torch.long)
        gen = make_generator(params.seed, "cpu")

        def step(tok: torch.Tensor, i: int) -> torch.Tensor:
            with self._lock, mx.stream(self._device):
                out = lm(mx.array([[int(tok)]], dtype=mx.int32), cache=cache)
                return self._logits_row(out)

        yield from decode_loop(
            logits, step, seen, params, gen, eos, self.vocab_limit,
            self.config.image_token_id, stats, t0,
        )  # fmt: skip


def open_mlx(
    folder: Path,
    *,
    tokenizer=None,
    device: str = "auto",
    dtype: str = "auto",
    trust_pickle: bool = False,
    image_size: int | None = None,
    engine: str = "fast",
    engine_options: dict[str, Any] | None = None,
    vision_dtype: str = "fp32",
    prefill_dtype: str | None = None,
) -> MlxBackend:
    """A checkpoint folder (any format) on MLX. `dtype="auto"` keeps the stored precision on
    the GPU and computes float32 on MLX's CPU build (low-precision CPU matmuls are slow), as the
    torch backend does on CPU. The engine options and the torch CPU compute dtypes
    (vision_dtype / prefill_dtype) have no MLX counterpart: anything but their defaults is
    refused rather than ignored."""
    try:
        import mlx.core as mx
    except ImportError as e:
        raise ConfigError(f"the mlx backend needs mlx and mlx-vlm ({e}): {MLX_INSTALL}") from e

    dev = str(device)
    if dev not in ("auto", "gpu", "cpu"):
        raise ConfigError(f"{UNSUPPORTED}device {dev!r} (use auto, gpu or cpu)")
    if engine not in ("fast", "reference"):
        raise ValueError(f"engine must be fast or reference, got {engine!r}")
    if engine_options:
        raise ConfigError(
            f"{UNSUPPORTED}engine options {sorted(engine_options)} (it runs one request at a "
            "time: no slots, compile, vision cache or prefix reuse)"
        )
    if str(vision_dtype) not in ("fp32", "float32") or prefill_dtype is not None:
        raise ConfigError(
            f"{UNSUPPORTED}vision_dtype={vision_dtype!r} / prefill_dtype={prefill_dtype!r} "
            "(torch CPU compute dtypes; use --dtype for the mlx weights' precision)"
        )
    on = "cpu" if dev == "cpu" or mx.default_device().type.name == "cpu" else "gpu"
    dt = str(dtype).removeprefix("torch.")
    if dt == "auto" and on == "cpu":
        dt = "float32"
    model, cfg = load_mlx_model(
        Path(folder), None if dt == "auto" else dt, image_size=image_size,
        trust_pickle=trust_pickle,
    )  # fmt: skip
    eos_ids, vocab_limit = generation_limits(cfg.text.eos_token_id, tokenizer)
    return MlxBackend(
        model, cfg, eos_ids=eos_ids, vocab_limit=vocab_limit, source=str(folder), device=on
    )
