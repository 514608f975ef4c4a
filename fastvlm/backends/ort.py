"""The ONNX Runtime backend: generation on a `fastvlm export onnx` folder.

`OrtModel` holds the three exported graphs (vision encoder, embeddings, merged decoder; plus the
projector for token reduction) behind a small model-like interface (batch 1, numpy inside).
`ort_generate_step` is engine/generate.py's `generate_step` with ONNX Runtime prefill / step
functions plugged into the same `decode_loop` (sampling, timing, EOS), so text, stop strings and
finish reasons are the shared ones. `OrtBackend` serves them through the `Backend` protocol; it
has no batching engine, so callers serialise requests.

Threads: `intra_op_threads`, else $FASTVLM_ORT_THREADS, else $OMP_NUM_THREADS (as torch), else
ONNX Runtime's default (all cores).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.generate import Stats, check_context, decode_loop
from ..engine.sampling import SamplingParams, make_generator
from ..errors import CheckpointError, ConfigError
from ..export.onnx_community import VISION_FEATURES
from ..export.wrappers import kv_names
from ..model.fastvlm import check_tokens_per_image
from ..tokenization import generation_limits
from ..weights import load_config
from .step import StepGeneration, step_generation

MANIFEST = "fastvlm_export.json"
ONNX_FILES = {
    "vision": "onnx/vision_encoder.onnx",
    "embed": "onnx/embed_tokens.onnx",
    "decoder": "onnx/decoder_model_merged.onnx",
}
# Optional graphs: absent in exports made before token reduction was supported.
OPTIONAL_FILES = ("projector",)


def is_onnx_export(folder: Path) -> bool:
    p = Path(folder) / MANIFEST
    if not p.exists():
        return False
    try:
        return json.loads(p.read_text()).get("format") == "onnx"
    except ValueError:
        return False


class OrtModel:
    """The three exported graphs behind a small model-like interface (batch 1, numpy inside)."""

    def __init__(self, folder: Path, intra_op_threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ConfigError(
                "the ONNX Runtime backend needs onnxruntime: pip install 'fastvlm[export]'"
            ) from e
        self.folder = Path(folder)
        if not is_onnx_export(self.folder):
            raise CheckpointError(
                f"{folder} is not a fastvlm ONNX export (no {MANIFEST}); make one with "
                "`fastvlm export onnx MODEL OUT`"
            )
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        self.config = load_config(self.folder)
        opts = ort.SessionOptions()
        env = os.environ.get("FASTVLM_ORT_THREADS") or os.environ.get("OMP_NUM_THREADS")
        intra_op_threads = intra_op_threads or (int(env) if env and env.isdigit() else None)
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        files = self.manifest.get("files", ONNX_FILES)
        self.sessions = {}
        for key in ("vision", "embed", "decoder", *OPTIONAL_FILES):
            path = self.folder / files[key] if key in files else None
            if path is None or not path.exists():
                if key in OPTIONAL_FILES:
                    continue
                raise CheckpointError(f"{path} is missing: re-run the export")
            self.sessions[key] = ort.InferenceSession(
                str(path), opts, providers=["CPUExecutionProvider"]
            )
        self.vision_outputs = [o.name for o in self.sessions["vision"].get_outputs()]
        t = self.config.text
        self.past_names, self.present_names = kv_names(t.num_hidden_layers)
        self.kv_shape = (t.num_key_value_heads, t.head_dim)
        self.kv_dtype = np.float32

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def embed_images(
        self, pixel_values: torch.Tensor | np.ndarray, tokens_per_image: int | None = None
    ) -> np.ndarray:
        """(N, 3, S, S) → projected image embeddings (N, tokens, D), pooled as the torch model
        pools (`FastVLMModel.encode_images`): adaptive average pooling of the pre-projector
        feature grid, then the exported projector graph."""
        k = check_tokens_per_image(tokens_per_image, self.num_image_tokens)
        px = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        if k == self.num_image_tokens:  # first output: `image_features` (`image_embeds` before)
            return self.sessions["vision"].run(self.vision_outputs[:1], {"pixel_values": px})[0]
        if "projector" not in self.sessions or VISION_FEATURES not in self.vision_outputs:
            raise ConfigError(
                f"{self.folder} was exported without the pre-projector vision features, so "
                f"tokens_per_image={k} cannot be pooled exactly: re-export it with this fastvlm"
            )
        feats = self.sessions["vision"].run([VISION_FEATURES], {"pixel_values": px})[0]
        n, tok, c = feats.shape
        side = math.isqrt(tok)
        grid = torch.from_numpy(feats).transpose(1, 2).reshape(n, c, side, side)
        pooled = F.adaptive_avg_pool2d(grid, math.isqrt(k)).flatten(2).transpose(1, 2)
        pooled = np.ascontiguousarray(pooled.numpy(), dtype=np.float32)
        return self.sessions["projector"].run(None, {VISION_FEATURES: pooled})[0]

    def embed(self, ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        """ids (1, T) → embeddings (1, T, D) with image placeholder rows replaced."""
        is_image = ids == self.config.image_token_id
        safe = np.where(is_image, 0, ids).astype(np.int64)
        x = self.sessions["embed"].run(None, {"input_ids": safe})[0].astype(np.float32)
        n = int(is_image.sum())
        if n or image_embeds is not None:
            rows = (
                np.zeros((0, x.shape[-1]), np.float32)
                if image_embeds is None
                else image_embeds.reshape(-1, x.shape[-1])
            )
            if rows.shape[0] != n:
                raise ValueError(
                    f"image features ({rows.shape[0]} rows) and image placeholder tokens ({n}) "
                    "do not match"
                )
            x[is_image] = rows
        return x

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        kv, hd = self.kv_shape
        return [np.zeros((batch, kv, 0, hd), self.kv_dtype) for _ in self.past_names]

    def step(
        self, embeds: np.ndarray, start: int, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """embeds (1, T, D) at positions start..start+T-1 → logits (1, T, V), new past."""
        t = embeds.shape[1]
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "attention_mask": np.ones((1, start + t), np.int64),
            "position_ids": np.arange(start, start + t, dtype=np.int64)[None],
            **dict(zip(self.past_names, past, strict=True)),
        }
        out = self.sessions["decoder"].run(None, feeds)
        return out[0], out[1:]

    def logits(self, ids: list[int], image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Full-sequence logits (1, T, V) in one call (no cache): the parity check's view."""
        x = self.embed(np.asarray(ids, np.int64)[None], image_embeds)
        return self.step(x, 0, self.empty_past())[0]


def ort_generate_step(
    model: OrtModel,
    input_ids: list[int] | torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    *,
    image_embeds: np.ndarray | None = None,
    eos_ids: Iterable[int] = (),
    vocab_limit: int | None = None,
    stats: Stats | None = None,
    tokens_per_image: int | None = None,
) -> Iterator[int]:
    """`generate_step` on ONNX Runtime: same arguments, same sampling, same stats."""
    params = params or SamplingParams()
    params.validate()
    stats = stats if stats is not None else Stats()
    ids = np.asarray(torch.as_tensor(input_ids).reshape(-1).tolist(), np.int64)[None]
    t = ids.shape[1]
    check_context(t, params.max_tokens, model.config.text.max_position_embeddings)
    eos = set() if params.ignore_eos else set(eos_ids)
    gen = make_generator(params.seed, "cpu")
    t0 = time.perf_counter()
    if image_embeds is None and pixel_values is not None:
        image_embeds = model.embed_images(pixel_values, tokens_per_image)
        stats.vision_s = time.perf_counter() - t0
    stats.prompt_tokens = t
    stats.image_tokens = int((ids == model.image_token_id).sum())
    logits, past = model.step(model.embed(ids, image_embeds), 0, model.empty_past())

    def last(lg: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(lg[:, -1].astype(np.float32))  # (1, V)

    def step(tok: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal past
        x = model.embed(np.array([[int(tok)]], np.int64))
        lg, past = model.step(x, t + i, past)
        return last(lg)

    yield from decode_loop(
        last(logits), step, torch.from_numpy(ids), params, gen, eos, vocab_limit,
        model.image_token_id, stats, t0,
    )  # fmt: skip


class OrtBackend:
    """`Backend` over an `OrtModel`: CPU, fp32 at the boundary, one request at a time."""

    name: ClassVar[str] = "onnxruntime"
    batches_concurrently = False
    device = "cpu"

    def __init__(
        self, model: OrtModel, *, eos_ids: list[int], vocab_limit: int | None = None
    ) -> None:
        self.model = model
        self.config = model.config
        self.eos_ids = list(eos_ids)
        self.vocab_limit = vocab_limit

    @property
    def precision(self) -> dict[str, str]:
        return dict(self.model.manifest.get("precision", {}))

    @property
    def dtype(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.precision.items()) or "float32"

    @property
    def max_len(self) -> int:
        return self.config.text.max_position_embeddings

    def encode_images(
        self, pixels: torch.Tensor, tokens_per_image: int | None = None
    ) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.model.embed_images(pixels, tokens_per_image)))

    def submit(
        self,
        ids: list[int],
        pixels: torch.Tensor | None,
        params: SamplingParams,
        *,
        tokens_per_image: int | None = None,
    ) -> StepGeneration:
        params.validate()
        tpi = check_tokens_per_image(tokens_per_image, self.config.num_image_tokens)
        return step_generation(
            ort_generate_step, self.model, ids, pixels, params,
            eos_ids=self.eos_ids, vocab_limit=self.vocab_limit, tokens_per_image=tpi,
        )  # fmt: skip

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "batches_concurrently": self.batches_concurrently,
            "precision": self.precision,
        }

    def close(self) -> None:
        self.model.sessions.clear()

    def __repr__(self) -> str:
        return f"OrtBackend(folder={str(self.model.folder)!r}, precision={self.dtype!r})"


def open_onnx(
    folder: str | Path,
    *,
    tokenizer=None,
    device: str = "auto",
    dtype: str = "auto",
    image_size: int | None = None,
    intra_op_threads: int | None = None,
    **_torch_only: Any,
) -> OrtBackend:
    """An exported ONNX folder on ONNX Runtime (CPU, the export's precision). Torch-only
    options (engine, trust_pickle) have no meaning here and are ignored."""
    if str(device) not in ("auto", "cpu"):
        raise ConfigError(
            f"device={device!r} is not supported on the onnxruntime backend: it runs on the CPU "
            "(use --device auto or cpu)"
        )
    if str(dtype).removeprefix("torch.") not in ("auto", "float32", "fp32", "float"):
        raise ConfigError(
            f"dtype={dtype!r} is not supported on the onnxruntime backend: the export's "
            "precision is fixed at export time (fastvlm export onnx --precision ...)"
        )
    folder = Path(folder)
    model = OrtModel(folder, intra_op_threads)
    size = model.config.vision.image_size
    if image_size not in (None, size):
        raise ConfigError(
            f"{folder} is an ONNX export fixed at {size} px: image_size={image_size} needs a "
            f"new export (fastvlm export onnx MODEL OUT --image-size {image_size})"
        )
    eos_ids, vocab_limit = generation_limits(model.config.text.eos_token_id, tokenizer)
    return OrtBackend(model, eos_ids=eos_ids, vocab_limit=vocab_limit)
