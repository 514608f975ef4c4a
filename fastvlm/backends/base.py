"""The Backend boundary: what `FastVLM`, the server, the CLI, batch, bench and eval may ask of a
runtime. A backend turns prompt ids + pixels into generated ids; everything above it (chat
template, image loading, detokenizing, stop strings, OpenAI protocol) is shared.

A new runtime is one file in `fastvlm/backends/` implementing `Backend` (torch.py, ort.py, mlx.py)
plus one line in the registry of `fastvlm/backends/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ..config import FastVLMConfig
from ..engine.generate import Stats
from ..engine.sampling import SamplingParams


@runtime_checkable
class Generation(Protocol):
    """One submitted request. Iterating yields generated token ids (EOS included, as the
    reference `generate_step`); `stats` fills in as it runs; afterwards `finish_reason` is
    "stop" | "length" | "cancelled" | "error". `cancel()` may be called from any thread."""

    stats: Stats
    finish_reason: str | None

    def __iter__(self) -> Iterator[int]: ...

    def cancel(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A runtime for one loaded model. Inputs are the processor's outputs: prompt ids (image
    placeholders already expanded to `tokens_per_image` each) and pixels (N, 3, S, S) float32."""

    name: ClassVar[str]  # "torch" | "onnxruntime" | "mlx": the value of `load(backend=...)`
    config: FastVLMConfig
    eos_ids: list[int]  # generation stops on these unless params.ignore_eos

    @property
    def batches_concurrently(self) -> bool:
        """True: concurrent `submit` calls from several threads are batched together (the
        server runs requests in parallel); False: callers must serialise requests."""
        ...

    @property
    def device(self) -> str:
        """Where it runs, for logs and metadata: "cpu", "cuda:0", "mps", "mlx:gpu", ..."""
        ...

    @property
    def dtype(self) -> str:
        """Weight precision for humans: "float32", "bfloat16", "int4", "vision=fp32,decoder=int8"."""
        ...

    @property
    def max_len(self) -> int:
        """Longest prompt + max_tokens one request may have."""
        ...

    def encode_images(
        self, pixels: torch.Tensor, tokens_per_image: int | None = None
    ) -> torch.Tensor:
        """Projected image embeddings (N, tokens_per_image or num_image_tokens, hidden) as a
        float32 CPU tensor (for parity checks and tools; generation encodes on its own)."""
        ...

    def submit(
        self,
        ids: list[int],
        pixels: torch.Tensor | None,
        params: SamplingParams,
        *,
        tokens_per_image: int | None = None,
    ) -> Generation:
        """Start generating for one prompt; raises `ValueError` / `fastvlm.errors` types for
        requests it cannot run (too long, unsupported argument: "not supported on the X
        backend: ...")."""
        ...

    def info(self) -> dict[str, Any]:
        """Metadata for `/v1/models`, `fastvlm describe -v` and bench tables (name, device,
        dtype, batches_concurrently, plus backend-specific keys)."""
        ...

    def close(self) -> None:
        """Release threads, sessions and memory; the backend is unusable afterwards."""
        ...
