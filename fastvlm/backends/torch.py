"""The PyTorch backend: a `FastVLMModel` run by the continuous-batching `Engine` (engine="fast")
or by the reference decoder `generate_step` (engine="reference", the oracle the engine is
tested against). A request longer than the engine's `max_len` falls back to the reference.

Device and dtype are picked sensibly: CUDA > MPS > CPU, bf16 on CUDA, fp16 on MPS, fp32 on
CPU (most CPUs have no native bf16/fp16 matmul).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..device import prepare_for_device, resolve_device, resolve_dtype
from ..engine.engine import Engine
from ..engine.generate import generate_step
from ..engine.sampling import SamplingParams
from ..tokenization import generation_limits
from ..weights import load_config, load_model
from .step import step_generation

ENGINES = ("fast", "reference")


class TorchBackend:
    """`Backend` over a torch `FastVLMModel`; `.model` and `.engine` stay reachable for tools
    (train, export, bench) that need the module itself."""

    name: ClassVar[str] = "torch"

    def __init__(
        self,
        model,
        *,
        eos_ids: list[int],
        vocab_limit: int | None = None,
        engine: str = "fast",
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.model = model
        self.config = model.config
        self.eos_ids = list(eos_ids)
        self.vocab_limit = vocab_limit
        self.engine_kind = engine
        self.engine_options = dict(engine_options or {})
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    # ------------------------------------------------------------------ protocol properties
    @property
    def batches_concurrently(self) -> bool:
        return self.engine_kind == "fast"

    @property
    def torch_device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def dtype(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")

    @property
    def max_len(self) -> int:
        # longer requests fall back to the reference decoder, bounded by the model's context
        return self.config.text.max_position_embeddings

    @property
    def engine(self) -> Engine:
        """The shared continuous-batching engine (built on first use; thread-safe)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    opts = {
                        "slots": 8,
                        "max_len": min(self.config.text.max_position_embeddings, 4096),
                    }
                    opts.update(self.engine_options)
                    self._engine = Engine.from_vlm(self, **opts)
        return self._engine

    # ------------------------------------------------------------------ protocol methods
    @torch.inference_mode()
    def encode_images(
        self, pixels: torch.Tensor, tokens_per_image: int | None = None
    ) -> torch.Tensor:
        px = pixels.to(self.torch_device, self.torch_dtype)
        return self.model.embed_images(px, tokens_per_image).float().cpu()

    def _use_engine(self, n_ids: int, params: SamplingParams) -> bool:
        if self.engine_kind == "reference":
            return False
        return n_ids + params.max_tokens <= self.engine.max_len

    def submit(
        self,
        ids: list[int],
        pixels: torch.Tensor | None,
        params: SamplingParams,
        *,
        tokens_per_image: int | None = None,
    ):
        if self._use_engine(len(ids), params):
            return self.engine.submit(ids, pixels, params, tokens_per_image=tokens_per_image)
        px = None if pixels is None else pixels.to(self.torch_device)
        return step_generation(
            generate_step, self.model, ids, px, params,
            eos_ids=self.eos_ids, vocab_limit=self.vocab_limit, tokens_per_image=tokens_per_image,
        )  # fmt: skip

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "batches_concurrently": self.batches_concurrently,
            "engine": self.engine_kind,
        }

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()

    def __repr__(self) -> str:
        return f"TorchBackend(device={self.device}, dtype={self.dtype}, engine={self.engine_kind})"


def open_torch(
    folder: Path,
    *,
    tokenizer=None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_pickle: bool = False,
    image_size: int | None = None,
    engine: str = "fast",
    engine_options: dict[str, Any] | None = None,
    vision_dtype: str = "fp32",
    prefill_dtype: str | None = None,
    quant: str | dict[str, Any] | None = None,
) -> TorchBackend:
    """A checkpoint folder (either format) on PyTorch. `vision_dtype` / `prefill_dtype`: CPU
    compute dtypes (`fastvlm.fast_cpu`); `quant` quantizes while loading."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = load_config(folder, image_size)
    net = load_model(
        folder, device=dev, dtype=dt, trust_pickle=trust_pickle, config=cfg, quant=quant
    )
    prepare_for_device(net, dev, vision_dtype=vision_dtype, prefill_dtype=prefill_dtype)
    eos_ids, vocab_limit = generation_limits(cfg.text.eos_token_id, tokenizer)
    return TorchBackend(
        net, eos_ids=eos_ids, vocab_limit=vocab_limit, engine=engine, engine_options=engine_options
    )
