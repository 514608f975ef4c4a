"""The Python API: `fastvlm.load()` → `FastVLM` with describe / chat / stream.

`FastVLM` glues what must agree on a checkpoint — processor (pixels + chat template + image
placeholders) and tokenizer — to a runtime behind the `Backend` protocol (fastvlm/backends/):
PyTorch (the continuous-batching engine, or the reference decoder) or ONNX Runtime for an
exported folder. Everything above token ids (templates, images, detokenizing, stop strings) is
shared by every backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import fast_cpu, hub
from .backends import choose_backend, open_backend
from .backends.base import Backend, Generation
from .backends.torch import ENGINES
from .device import DTYPES, resolve_device, resolve_dtype
from .engine.generate import Chunk, Stats, text_chunks
from .engine.sampling import SamplingParams
from .errors import ConfigError
from .images import ImageInput
from .processing import Processor
from .tokenization import load_tokenizer
from .video import is_video  # video paths become video parts (sampled frames)

__all__ = ["DTYPES", "ENGINES", "FastVLM", "load", "resolve_device", "resolve_dtype"]

SAMPLING_KEYS = {f for f in SamplingParams.__slots__}


class FastVLM:
    """A loaded FastVLM: `describe(image)`, `chat(messages)`, `stream(...)`."""

    def __init__(
        self, backend: Backend, processor: Processor, tokenizer, path: Path | None = None
    ) -> None:
        self.backend = backend
        self.processor = processor
        self.tokenizer = tokenizer
        self.path = path
        self.config = backend.config
        self.last_stats: Stats | None = None

    # ------------------------------------------------------------------ properties
    @property
    def eos_ids(self) -> list[int]:
        return self.backend.eos_ids

    @property
    def vocab_limit(self) -> int | None:
        return getattr(self.backend, "vocab_limit", None)

    @property
    def model(self):
        """The backend's model object (a torch `FastVLMModel`, or an ONNX Runtime `OrtModel`)."""
        try:
            return self.backend.model
        except AttributeError:
            raise AttributeError(
                f"the {self.backend.name} backend has no model object (vlm.model)"
            ) from None

    @property
    def engine(self):
        """The torch backend's shared continuous-batching engine (built on first use)."""
        try:
            return self.backend.engine
        except AttributeError:
            raise AttributeError(
                f"the {self.backend.name} backend has no continuous-batching engine (vlm.engine);"
                " requests run one at a time"
            ) from None

    @property
    def engine_kind(self) -> str:
        return getattr(self.backend, "engine_kind", "reference")

    @property
    def device(self) -> torch.device:
        dev = getattr(self.backend, "torch_device", None)
        return dev if dev is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the weights, or float32 (the dtype at the backend's boundary)."""
        dt = getattr(self.backend, "torch_dtype", None)
        return dt if dt is not None else torch.float32

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def __repr__(self) -> str:
        return (
            f"FastVLM(path={str(self.path)!r}, format={self.config.format!r}, "
            f"backend={self.backend.name!r}, device={self.backend.device}, "
            f"dtype={self.backend.dtype}, image_size={self.image_size})"
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
        content: list[dict] = [
            {"type": "video", "video": im} if is_video(im) else {"type": "image", "image": im}
            for im in images
        ]
        content.append({"type": "text", "text": prompt})
        return [{"role": "user", "content": content}]

    # ------------------------------------------------------------------ generation
    def submit(
        self,
        ids: list[int],
        pixels: torch.Tensor | None = None,
        *,
        tokens_per_image: int | None = None,
        **sampling,
    ) -> Generation:
        """Start generating for already-encoded ids (see `encode`); read it with `text_chunks`.
        On a backend that batches, several submitted generations decode together."""
        params = self._params(sampling)
        return self.backend.submit(ids, pixels, params, tokens_per_image=tokens_per_image)

    def text_chunks(
        self, gen: Generation, params: SamplingParams | None = None, preprocess_s: float = 0.0
    ) -> Iterator[Chunk]:
        """Text-delta chunks of a generation: EOS and stop strings as the reference decoder;
        stopping early (a stop string, the consumer going away) cancels it."""
        params = params or getattr(gen, "params", None) or SamplingParams()
        eos = set() if params.ignore_eos else set(self.backend.eos_ids)
        try:
            for chunk in text_chunks(
                gen,
                self.tokenizer,
                params.stop,
                eos,
                gen.stats,
                end_reason=lambda: gen.finish_reason or "length",
            ):
                chunk.stats.preprocess_s = preprocess_s
                self.last_stats = chunk.stats
                yield chunk
        finally:
            gen.cancel()

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
        ids, pixels = self.encode(
            messages,
            tokens_per_image=tokens_per_image,
            max_images=max_images,
            allow_special_tokens=allow_special_tokens,
        )
        pre = time.perf_counter() - t_call  # the backend's prefill_s counts from submit on
        gen = self.backend.submit(ids, pixels, params, tokens_per_image=tokens_per_image)
        yield from self.text_chunks(gen, params, pre)

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
        gen = self.backend.submit(input_ids, pixel_values, self._params(sampling))
        out = list(gen)
        self.last_stats = gen.stats
        if gen.finish_reason == "error":
            raise RuntimeError(f"generation failed on the {self.backend.name} backend")
        return out


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
    backend: str | None = None,
    backend_options: dict[str, Any] | None = None,
    vision_dtype: str = "fp32",
    prefill_dtype: str | None = None,
    quant: str | dict[str, Any] | None = None,
) -> FastVLM:
    """Load a FastVLM from a Hugging Face repo id or a local folder (None → embedded tiny model).

    Both checkpoint formats load: Apple's `llava_qwen2` repos and transformers' `fast_vlm`.
    `image_size` overrides the encoder resolution (a multiple of 64; fewer image tokens).
    `engine="reference"` uses the slow reference decoder; `engine_options` go to `Engine`
    (slots, max_len, vision_cache_size, prefix_reuse, compile).
    `backend`: "auto" (an ONNX export folder from `fastvlm export onnx` runs on ONNX Runtime,
    Apple silicon with mlx + mlx-vlm installed runs on MLX, anything else on PyTorch), or a name
    of `fastvlm.backends.BACKENDS` ("torch", "onnxruntime", "mlx"); None (default) reads
    $FASTVLM_BACKEND, else auto. `backend_options` go to that backend's opener.
    `vision_dtype` / `prefill_dtype` ("fp32", "bf16" or "auto" = bf16 where the CPU has native
    bf16): compute dtype of the vision tower / the prompt's GEMMs for an fp32 model on CPU
    (`fastvlm.fast_cpu`); fp32 keeps exact outputs. `prefill_dtype=None`: fp32 for float
    layers, bf16 (where native) for int8 / int4 layers.
    `quant` ("int8", "int4", "llm=int4-g64,projector=int8", ...; torch backend) quantizes a
    float checkpoint while loading it, tensor by tensor (the float model is never in memory).
    """
    fast_cpu.resolve(vision_dtype, "vision_dtype")  # a bad name fails on every backend
    if prefill_dtype is not None:
        fast_cpu.resolve(prefill_dtype, "prefill_dtype")
    if quant is not None:
        backend_options = {**(backend_options or {}), "quant": quant}
    folder = hub.resolve(model, download=download)
    if quant is not None and choose_backend(Path(folder), backend) != "torch":
        raise ConfigError(
            "quant= quantizes a PyTorch checkpoint while loading it; an ONNX export is "
            "quantized when exported (fastvlm export onnx --precision llm=int4)"
        )
    tok = load_tokenizer(folder)
    be = open_backend(
        folder,
        backend,
        tokenizer=tok,
        device=device,
        dtype=dtype,
        trust_pickle=trust_pickle,
        image_size=image_size,
        engine=engine,
        engine_options=engine_options,
        vision_dtype=vision_dtype,
        prefill_dtype=prefill_dtype,
        **(backend_options or {}),
    )
    return FastVLM(be, Processor(be.config, tok), tok, folder)
