"""The Python API: `fastvlm.load()` → `FastVLM` with describe / chat / stream.

`FastVLM` glues the three parts that must agree on a checkpoint — model, processor (pixels +
chat template + image placeholders) and tokenizer — and picks device and dtype sensibly:
CUDA > MPS > CPU, bf16 on CUDA, fp16 on MPS, fp32 on CPU (bf16 matmuls on AVX2 CPUs run about
150x slower than fp32).

Generation goes through one lazily built `Engine` per `FastVLM` (`vlm.engine`): calls from several
threads are batched together (continuous batching), a repeated image is encoded once (vision
cache) and a follow-up chat turn reuses the KV of its history (prefix reuse). `engine="reference"`
keeps the slow, obviously-correct decoder of `engine/generate.py` (the oracle the engine is tested
against); a request longer than the engine's `max_len` also falls back to it.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import fast_cpu, hub
from .engine.allocator import tune_malloc
from .engine.engine import Engine
from .engine.generate import Chunk, Stats, generate_step, stream_generate
from .engine.request import stream_text
from .engine.sampling import SamplingParams
from .errors import ConfigError
from .images import ImageInput
from .processing import Processor
from .tokenization import STOP_TOKENS, load_tokenizer
from .weights import load_config, load_model

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    if dev.type == "mps" and not (torch.backends.mps.is_available()):
        raise ValueError("device='mps' was asked for but MPS is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif dtype in (None, "auto"):
        out = {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    elif str(dtype).lower() in DTYPES:
        out = DTYPES[str(dtype).lower()]
    else:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if device.type == "cpu" and out != torch.float32:
        warnings.warn(
            f"{out} on CPU is very slow on most CPUs (no native bf16/fp16 matmul); "
            "float32 is recommended",
            stacklevel=3,
        )
    return out


SAMPLING_KEYS = {f for f in SamplingParams.__slots__}
ENGINES = ("fast", "reference")


class FastVLM:
    """A loaded FastVLM: `describe(image)`, `chat(messages)`, `stream(...)`."""

    # batch-1 token generator over `self.model` (the ONNX Runtime backend plugs in its own)
    step_fn = staticmethod(generate_step)

    def __init__(
        self,
        model,
        processor: Processor,
        tokenizer,
        path: Path | None = None,
        *,
        engine: str = "fast",
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine_kind = engine
        self.engine_options = dict(engine_options or {})
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.path = path
        self.config = model.config
        self.last_stats: Stats | None = None
        eos = self.config.text.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer is not None:
            ids |= {i for t in STOP_TOKENS if (i := tokenizer.token_to_id(t)) is not None}
        self.eos_ids = sorted(ids)
        # Ids past the tokenizer's vocabulary are padding rows: never sample them.
        self.vocab_limit = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer else None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

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

    def _use_engine(self, n_ids: int, params: SamplingParams) -> bool:
        if self.engine_kind == "reference":
            return False
        return n_ids + params.max_tokens <= self.engine.max_len

    def __repr__(self) -> str:
        return (
            f"FastVLM(path={str(self.path)!r}, format={self.config.format!r}, "
            f"device={self.device}, dtype={self.dtype}, image_size={self.image_size})"
        )

    # ------------------------------------------------------------------ inputs
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """The pixel tensor (1, 3, S, S) the model sees for `image`."""
        return self.processor.pixels([image])

    def encode(
        self,
        messages: list[dict],
        *,
        tokens_per_image: int | None = None,
        max_images: int | None = None,
        allow_special_tokens: bool = False,
    ) -> tuple[list[int], torch.Tensor | None]:
        """Messages → (input ids, pixels); `tokens_per_image` sets the placeholder run length,
        `max_images` overrides `processor.max_images` (video frames count as images). Message
        text is tokenized as text unless `allow_special_tokens` (trusted callers only)."""
        ids, pixels, _ = self.processor(
            messages,
            tokens_per_image=tokens_per_image,
            max_images=max_images,
            allow_special_tokens=allow_special_tokens,
        )
        return ids, pixels

    @staticmethod
    def _params(sampling: dict[str, Any]) -> SamplingParams:
        unknown = set(sampling) - SAMPLING_KEYS
        if unknown:
            raise TypeError(f"unknown sampling arguments: {sorted(unknown)}")
        stop = sampling.get("stop")
        if isinstance(stop, str):
            sampling = {**sampling, "stop": [stop]}
        p = SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
        p.validate()
        return p

    @staticmethod
    def describe_messages(images: list[ImageInput], prompt: str) -> list[dict]:
        from .video import is_video  # video paths become video parts (sampled frames)

        content: list[dict] = [
            {"type": "video", "video": im} if is_video(im) else {"type": "image", "image": im}
            for im in images
        ]
        content.append({"type": "text", "text": prompt})
        return [{"role": "user", "content": content}]

    # ------------------------------------------------------------------ generation
    def stream_chunks(
        self,
        messages: list[dict],
        *,
        tokens_per_image: int | None = None,
        max_images: int | None = None,
        allow_special_tokens: bool = False,
        **sampling,
    ) -> Iterator[Chunk]:
        """Text chunks for `messages`; `tokens_per_image` pools each image to that many tokens
        (a perfect square ≤ `num_image_tokens`), `max_images` caps images + video frames."""
        t_call = time.perf_counter()  # TTFT counts from here: decoding a big image is user wait
        params = self._params(sampling)
        tpi = tokens_per_image
        ids, pixels = self.encode(
            messages,
            tokens_per_image=tpi,
            max_images=max_images,
            allow_special_tokens=allow_special_tokens,
        )
        if self._use_engine(len(ids), params):
            handle = self.engine.submit(ids, pixels, params, tokens_per_image=tpi)
            pre = handle._submitted - t_call  # the engine's prefill_s counts from submit on
            for chunk in stream_text(handle, self.tokenizer):
                chunk.stats.preprocess_s = pre
                self.last_stats = chunk.stats
                yield chunk
            return
        if pixels is not None:
            pixels = pixels.to(self.device)
        pre = time.perf_counter() - t_call
        for chunk in stream_generate(
            self.model,
            self.tokenizer,
            ids,
            pixels,
            params,
            eos_ids=self.eos_ids,
            vocab_limit=self.vocab_limit,
            tokens_per_image=tpi,
        ):
            chunk.stats.preprocess_s = pre
            self.last_stats = chunk.stats
            yield chunk

    def stream_chat(self, messages: list[dict], **sampling) -> Iterator[str]:
        for chunk in self.stream_chunks(messages, **sampling):
            if chunk.text:
                yield chunk.text

    def chat(self, messages: list[dict], **sampling) -> str:
        return "".join(self.stream_chat(messages, **sampling))

    def stream(
        self,
        image: ImageInput | list[ImageInput] | None = None,
        prompt: str = "Describe this image.",
        *,
        messages: list[dict] | None = None,
        **sampling,
    ) -> Iterator[str]:
        """Stream text deltas for one image + prompt (or for `messages`)."""
        if messages is None:
            images = [] if image is None else image if isinstance(image, list) else [image]
            messages = self.describe_messages(images, prompt)
        return self.stream_chat(messages, **sampling)

    def describe(
        self,
        image: ImageInput | list[ImageInput] | None = None,
        prompt: str = "Describe this image.",
        max_tokens: int = 256,
        temperature: float = 0.0,
        *,
        images: list[ImageInput] | None = None,
        **sampling,
    ) -> str:
        imgs = list(images or []) + (
            [] if image is None else image if isinstance(image, list) else [image]
        )
        msgs = self.describe_messages(imgs, prompt)
        return self.chat(msgs, max_tokens=max_tokens, temperature=temperature, **sampling)

    def generate_ids(
        self, input_ids: list[int], pixel_values: torch.Tensor | None = None, **sampling
    ) -> list[int]:
        """Token ids in, generated ids out (EOS included; stops at EOS unless ignore_eos)."""
        params = self._params(sampling)
        if self._use_engine(len(input_ids), params):
            handle = self.engine.submit(input_ids, pixel_values, params)
            out = handle.result()
            self.last_stats = handle.stats
            if handle.finish_reason == "error":
                raise RuntimeError(f"generation failed for request {handle.id}")
            return out
        px = None if pixel_values is None else pixel_values.to(self.device)
        return list(
            generate_step(
                self.model,
                input_ids,
                px,
                params,
                eos_ids=self.eos_ids,
                vocab_limit=self.vocab_limit,
            )
        )


def _refuse_foreign_export(folder: Path) -> None:
    """A Core ML export has a fastvlm_export.json too, but no runtime here runs it: say so,
    instead of failing later as a broken ONNX folder."""
    try:
        fmt = json.loads((folder / "fastvlm_export.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return  # no manifest (a checkpoint), or one the ONNX backend will report on
    if fmt not in ("onnx", "tflite"):
        raise ConfigError(
            f"{folder} is a {fmt} export (see its fastvlm_export.json): fastvlm runs checkpoints "
            "and ONNX exports; run Core ML packages with Core ML on macOS (see its README.md)"
        )


def load(
    model: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_pickle: bool = False,
    image_size: int | None = None,
    download: bool = True,
    engine: str = "fast",
    engine_options: dict[str, Any] | None = None,
    backend: str = "auto",
    vision_dtype: str = "fp32",
    prefill_dtype: str | None = None,
) -> FastVLM:
    """Load a FastVLM from a Hugging Face repo id or a local folder (None → embedded tiny model).

    Both checkpoint formats load: Apple's `llava_qwen2` repos and transformers' `fast_vlm`.
    `image_size` overrides the encoder resolution (a multiple of 64; fewer image tokens).
    `engine="reference"` uses the slow reference decoder; `engine_options` go to `Engine`
    (slots, max_len, vision_cache_size, prefix_reuse, compile).
    `backend`: "auto" (an ONNX export folder from `fastvlm export onnx` runs on ONNX Runtime,
    anything else on PyTorch), "torch" or "onnxruntime".
    `vision_dtype` / `prefill_dtype` ("fp32", "bf16" or "auto" = bf16 where the CPU has native
    bf16): the compute dtype of the vision tower / the prefill GEMMs of an fp32 model on CPU
    (`fastvlm.fast_cpu.prepare_cpu`); fp32 keeps exact outputs. `prefill_dtype=None`: fp32 for
    float layers, bf16 (where native) for int8 / int4 layers.
    """
    fast_cpu.resolve(vision_dtype, "vision_dtype")  # a bad name fails on every backend
    if prefill_dtype is not None:
        fast_cpu.resolve(prefill_dtype, "prefill_dtype")
    folder = hub.resolve(model, download=download)
    _refuse_foreign_export(folder)
    if backend not in ("auto", "torch", "onnxruntime"):
        raise ValueError(f"unknown backend {backend!r}: use auto, torch or onnxruntime")
    exported = (folder / "fastvlm_export.json").exists()
    if backend == "onnxruntime" or (backend == "auto" and exported):
        from .export.ort_backend import load_onnx

        vlm = load_onnx(folder)
        if image_size not in (None, vlm.image_size):
            raise ConfigError(
                f"{folder} is an ONNX export fixed at {vlm.image_size} px: image_size="
                f"{image_size} needs a new export (fastvlm export onnx MODEL OUT --image-size "
                f"{image_size})"
            )
        return vlm
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cpu":
        tune_malloc()  # big activations: reuse heap memory instead of mmap + page faults
    cfg = load_config(folder, image_size)
    net = load_model(folder, device=dev, dtype=dt, trust_pickle=trust_pickle, config=cfg)
    if dev.type == "cpu":
        net.vision_tower.use_channels_last()
        fast_cpu.prepare_cpu(net, vision_dtype, prefill_dtype)
    tok = load_tokenizer(folder)
    proc = Processor(net.config, tok)
    return FastVLM(net, proc, tok, folder, engine=engine, engine_options=engine_options)
