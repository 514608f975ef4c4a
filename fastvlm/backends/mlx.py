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
from ..engine.generate import Stats, decode_loop
from ..engine.sampling import SamplingParams, make_generator
from ..errors import ConfigError
from ..model.fastvlm import check_tokens_per_image
from .mlx_load import describe_dtype, load_mlx_model

PREFILL_CHUNK = 2048  # prompt tokens per prefill forward (bounds the attention activations)


def pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging weights of `F.adaptive_avg_pool1d`: bin i covers
    [floor(i·size/out), ceil((i+1)·size/out))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        a, b = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, a:b] = 1.0 / (b - a)
    return m


class MlxGeneration:
    """One request; tokens are computed as the caller iterates (batch 1, serialised)."""

    def __init__(self, tokens: Iterator[int], stats: Stats, eos: set[int], max_tokens: int):
        self.stats = stats
        self.finish_reason: str | None = None
        self._tokens, self._eos, self._max = tokens, eos, max_tokens
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[int]:
        n = 0
        try:
            for tok in self._tokens:
                if self._cancel.is_set():
                    self.finish_reason = "cancelled"
                    return
                n += 1
                yield tok
                if tok in self._eos:
                    self.finish_reason = "stop"
                    return
                if self._cancel.is_set():
                    self.finish_reason = "cancelled"
                    return
            self.finish_reason = "length" if n >= self._max else "stop"
        except BaseException:
            self.finish_reason = "error"
            raise
        finally:
            self._tokens.close()


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
            raise ConfigError(f"the mlx backend runs on 'gpu' or 'cpu', not device {device!r}")
        self._device = mx.default_device() if device in (None, "auto") else getattr(mx, device)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        dtype: str | None = None,
        device: str | None = None,
        eos_ids: list[int] | None = None,
        vocab_limit: int | None = None,
    ) -> MlxBackend:
        model, cfg = load_mlx_model(Path(folder), dtype)
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
            "name": self.name,
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
    ) -> MlxGeneration:
        if self.model is None:
            raise RuntimeError("this mlx backend was closed")
        params.validate()
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) + params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_len} tokens"
            )
        n_slots = sum(1 for i in ids if i == self.config.image_token_id)
        n_images = 0 if pixels is None else int(pixels.shape[0])
        k = check_tokens_per_image(tokens_per_image, self.config.num_image_tokens)
        if n_slots != n_images * k:
            raise ValueError(
                f"{n_slots} image placeholder tokens but {n_images} image(s) x {k} tokens each"
            )
        stats = Stats(
            prompt_tokens=len(ids),
            image_tokens=n_slots,
        )
        eos = set() if params.ignore_eos else set(self.eos_ids)
        tokens = self._run(ids, pixels, params, tokens_per_image, stats, eos)
        return MlxGeneration(tokens, stats, eos, params.max_tokens)

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
