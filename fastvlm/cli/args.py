"""The flags every model-loading command shares, defined once: model, device, dtype, engine,
backend, sampling and media. describe, chat, batch, eval, watch and serve all build their parsers
from these groups and turn the parsed Namespace into keyword arguments with the helpers below.

Flag names users already know are accepted as aliases: mlx-vlm's `--model --image --prompt
--max-tokens --temperature` and Apple predict.py's `--model-path --image-file --temp --top_p`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..api import load
from ..backends import BACKENDS as RUNTIMES
from ..errors import ConfigError
from ..options import check_media
from ..video import is_video

BACKENDS = ("auto", *RUNTIMES)  # the registry's runtimes: a new backend gets the flag too
BACKEND_ENV = "FASTVLM_BACKEND"


def default_backend() -> str:
    """$FASTVLM_BACKEND, or auto; checked when the model loads, so a typo is one error line."""
    return os.environ.get(BACKEND_ENV, "").strip() or "auto"


def add_model_args(
    p: argparse.ArgumentParser,
    *,
    engine: bool = True,
    compile: bool = True,
    model_help: str = "Hugging Face repo id (e.g. apple/FastVLM-0.5B) or local folder; "
    "default: the embedded tiny demo model",
) -> None:
    """--model (--model-path, -m), --device, --dtype, --image-size, --trust-pickle, --backend
    and, with `engine`, --engine (and --compile unless `compile` is False)."""
    p.add_argument("--model", "--model-path", "-m", dest="model", default=None, help=model_help)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument(
        "--image-size", type=int, default=None, help="encoder resolution (multiple of 64)"
    )
    p.add_argument("--trust-pickle", action="store_true", help="allow .bin/.pt pickle weights")
    add_backend_arg(p)
    add_compute_dtype_args(p)
    if engine:
        p.add_argument(
            "--engine",
            choices=["fast", "reference"],
            default="fast",
            help="fast: the batching engine (default); reference: the slow oracle decoder",
        )
    if engine and compile:
        p.add_argument(
            "--compile", action="store_true", help="torch.compile the engine's decode step"
        )


def add_compute_dtype_args(p: argparse.ArgumentParser) -> None:
    """--vision-dtype / --prefill-dtype: CPU compute dtypes (fastvlm/fast_cpu.py)."""
    for part, default in (("vision", "fp32"), ("prefill", None)):
        p.add_argument(
            f"--{part}-dtype", default=default, choices=["fp32", "bf16", "auto"],
            help=f"CPU compute dtype of the {part} (bf16: faster on CPUs with AVX512-BF16 / AMX; "
            "auto: bf16 where the CPU has it; default: "
            + ("fp32" if default else "fp32, bf16 for int8/int4 layers where native") + ")",
        )  # fmt: skip


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    # No argparse `choices` on the env default: a bad $FASTVLM_BACKEND is reported by check_backend.
    p.add_argument(
        "--backend",
        default=default_backend(),
        type=str.lower,
        help="auto (an ONNX export folder runs on ONNX Runtime, anything else on PyTorch) | "
        f"{' | '.join(RUNTIMES)} (default: ${BACKEND_ENV} or auto)",
    )


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(
            f"backend {name!r} is not valid (--backend or ${BACKEND_ENV}): use one of "
            + ", ".join(BACKENDS)
        )
    return name


def load_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """`fastvlm.load` keyword arguments (all but the model) from `add_model_args` flags."""
    kw: dict[str, Any] = dict(
        device=a.device,
        dtype=a.dtype,
        trust_pickle=a.trust_pickle,
        image_size=a.image_size,
        backend=check_backend(a.backend),
    )
    for k in ("vision_dtype", "prefill_dtype"):
        if getattr(a, k, None) is not None:
            kw[k] = getattr(a, k)
    if hasattr(a, "engine"):
        kw["engine"] = a.engine
    if hasattr(a, "compile"):
        kw["engine_options"] = {"compile": True} if a.compile else None
    return kw


def add_max_tokens_arg(p: argparse.ArgumentParser, default: int = 256) -> None:
    p.add_argument(
        "--max-tokens", "--max_tokens", "--max-new-tokens", dest="max_tokens", type=int,
        default=default, help=f"tokens to generate at most (default {default})",
    )  # fmt: skip


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    add_max_tokens_arg(p, max_tokens)
    p.add_argument("--temperature", "--temp", dest="temperature", type=float, default=0.0)
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0)
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def sampling_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        repetition_penalty=a.repetition_penalty,
        stop=a.stop,
        seed=a.seed,
    )


def add_tokens_per_image_arg(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument(
        "--tokens-per-image",
        type=int,
        default=None,
        help=help
        or "pool each image to K tokens (a perfect square ≤ the model's native count, e.g. "
        "256/144/64/16 for 1024 px models, 16/4/1 for the demo model)",
    )


def add_media_args(p: argparse.ArgumentParser) -> None:
    add_tokens_per_image_arg(p)
    p.add_argument(
        "--max-images", type=int, default=None, help="per-request image limit (frames included)"
    )
    p.add_argument("--fps", type=float, default=None, help="video: sample this many frames/s")
    p.add_argument("--max-frames", type=int, default=16, help="video: at most this many frames")


def media_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(tokens_per_image=a.tokens_per_image, max_images=a.max_images)


def content_part(path: str, a: argparse.Namespace) -> dict:
    """A content part for an image or video path (videos sampled with --fps / --max-frames)."""
    if is_video(path):
        return {"type": "video", "video": path, "fps": a.fps, "max_frames": a.max_frames}
    return {"type": "image", "image": path}


def load_model(a: argparse.Namespace):
    """The model of `a`; media options (tokens per image, fps, max frames) are checked against
    it here, before any input is read, so a bad value fails once with the valid values."""
    vlm = load(a.model, **load_kwargs(a))
    check_media(
        vlm.config,
        tokens_per_image=getattr(a, "tokens_per_image", None),
        max_images=getattr(a, "max_images", None),
        fps=getattr(a, "fps", None),
        max_frames=getattr(a, "max_frames", None),
    )
    return vlm
