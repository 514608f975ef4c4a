"""`fastvlm` command line: describe | chat | download | convert (more tools plug in as modules
with `main(argv)`).

Flag names users already know are accepted as aliases: mlx-vlm's `--model --image --prompt
--max-tokens --temperature` and Apple predict.py's `--model-path --image-file --temp --top_p`.
User mistakes (bad image, unknown model, broken checkpoint) print one `error:` line and exit 1;
with several images, a bad one is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import FastVLMError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "--model-path",
        "-m",
        dest="model",
        default=None,
        help="Hugging Face repo id (e.g. apple/FastVLM-0.5B) or local folder; "
        "default: the embedded tiny demo model",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument(
        "--image-size", type=int, default=None, help="encoder resolution (multiple of 64)"
    )
    p.add_argument("--trust-pickle", action="store_true", help="allow .bin/.pt pickle weights")
    p.add_argument(
        "--engine",
        choices=["fast", "reference"],
        default="fast",
        help="fast: the batching engine (default); reference: the slow oracle decoder",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's decode step")
    for part, default in (("vision", "fp32"), ("prefill", None)):
        p.add_argument(
            f"--{part}-dtype", default=default, choices=["fp32", "bf16", "auto"],
            help=f"CPU compute dtype of the {part} (bf16: faster on CPUs with AVX512-BF16 / AMX; "
            "auto: bf16 where the CPU has it; default: "
            + ("fp32" if default else "fp32, bf16 for int8/int4 layers where native") + ")",
        )  # fmt: skip


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-tokens", "--max_tokens", "--max-new-tokens", dest="max_tokens", type=int, default=256
    )
    p.add_argument("--temperature", "--temp", dest="temperature", type=float, default=0.0)
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0)
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def _sampling(a: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        repetition_penalty=a.repetition_penalty,
        stop=a.stop,
        seed=a.seed,
    )


def _add_media_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokens-per-image",
        type=int,
        default=None,
        help="pool each image to K tokens (a perfect square ≤ the model's native count, e.g. "
        "256/144/64/16 for 1024 px models, 16/4/1 for the demo model)",
    )
    p.add_argument(
        "--max-images", type=int, default=None, help="per-request image limit (frames included)"
    )
    p.add_argument("--fps", type=float, default=None, help="video: sample this many frames/s")
    p.add_argument("--max-frames", type=int, default=16, help="video: at most this many frames")


def _media(a: argparse.Namespace) -> dict[str, Any]:
    return dict(tokens_per_image=a.tokens_per_image, max_images=a.max_images)


def _part(path: str, a: argparse.Namespace) -> dict:
    """A content part for an image or video path (videos sampled with --fps / --max-frames)."""
    from .video import is_video

    if is_video(path):
        return {"type": "video", "video": path, "fps": a.fps, "max_frames": a.max_frames}
    return {"type": "image", "image": path}


def _load(a: argparse.Namespace):
    """The model of `a`; media options (tokens per image, fps, max frames) are checked against
    it here, before any input is read, so a bad value fails once with the valid values."""
    from .api import load
    from .options import check_media

    vlm = load(
        a.model,
        device=a.device,
        dtype=a.dtype,
        trust_pickle=a.trust_pickle,
        image_size=a.image_size,
        engine=a.engine,
        engine_options={"compile": True} if a.compile else None,
        vision_dtype=a.vision_dtype,
        prefill_dtype=a.prefill_dtype,
    )
    check_media(
        vlm.config,
        tokens_per_image=getattr(a, "tokens_per_image", None),
        max_images=getattr(a, "max_images", None),
        fps=getattr(a, "fps", None),
        max_frames=getattr(a, "max_frames", None),
    )
    return vlm


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


# Third-party packages whose exceptions are about the user's input or environment (a bad repo
# id, no network, an unreadable video or Parquet file): shown as one line, not a traceback.
USER_ERROR_MODULES = ("huggingface_hub", "requests", "httpx", "urllib3", "av", "pyarrow")


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for what looks like a bug."""
    mod = type(e).__module__ or ""
    if isinstance(e, FastVLMError):
        return str(e)
    if mod.split(".")[0] in USER_ERROR_MODULES:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if isinstance(e, OSError):  # missing / unreadable files, full disk, permissions
        name = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return f"{name}{e.strerror or e}"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return "out of memory: use a smaller --image-size, fewer images or a smaller model"
    if isinstance(e, (ValueError, TypeError)):
        return str(e)
    return None


# ---------------------------------------------------------------------- describe
def cmd_describe(a: argparse.Namespace) -> int:
    # Each positional IMAGE/VIDEO is described on its own; all --image files go in one prompt.
    runs = [[p] for p in a.images] + ([list(a.image)] if a.image else [])
    if not runs:
        return _error("give at least one image: fastvlm describe IMAGE [IMAGE ...]")
    vlm = _load(a)
    failures = 0
    for paths in runs:
        path = paths[0] if len(paths) == 1 else ",".join(map(str, paths))
        content = [_part(p, a) for p in paths] + [{"type": "text", "text": a.prompt}]
        if len(runs) > 1 and not a.json:
            print(f"== {path}", flush=True)
        try:
            text, last = [], None
            messages = [{"role": "user", "content": content}]
            for chunk in vlm.stream_chunks(messages, **_media(a), **_sampling(a)):
                last = chunk
                text.append(chunk.text)
                if not a.json and chunk.text:
                    print(chunk.text, end="", flush=True)
        except (FastVLMError, ValueError) as e:
            failures += 1
            if a.json:
                print(json.dumps({"image": str(path), "error": str(e)}), flush=True)
            else:
                print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if a.json:
            s = last.stats
            print(
                json.dumps(
                    {
                        "image": str(path),
                        "text": "".join(text),
                        "finish_reason": last.finish_reason,
                        "prompt_tokens": s.prompt_tokens,
                        "image_tokens": s.image_tokens,
                        "generation_tokens": s.generation_tokens,
                        "ttft_s": round(s.ttft_s, 4),
                        "decode_tok_s": round(s.decode_tps, 2),
                    }
                ),
                flush=True,
            )
        else:
            print(flush=True)
        if a.verbose and last is not None:
            s = last.stats
            print(
                f"[{s.prompt_tokens} prompt tokens ({s.image_tokens} image), "
                f"{s.generation_tokens} generated, TTFT {s.ttft_s:.2f}s, "
                f"{s.decode_tps:.1f} tok/s]",
                file=sys.stderr,
            )
    return 1 if failures else 0


# ---------------------------------------------------------------------- chat
CHAT_HELP = "commands: /image PATH (attach to your next message), /reset, /exit"


def cmd_chat(a: argparse.Namespace) -> int:
    vlm = _load(a)
    pending = list(a.image or [])
    history: list[dict] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"fastvlm chat ({vlm.path}). {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if a.system else []
            pending = []
            print("(history cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                from .images import load_image
                from .video import is_video

                if not is_video(path):
                    load_image(path)  # validate now, not mid-conversation
                pending.append(path)
                print(f"(attached {path})", file=sys.stderr)
            except FastVLMError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        content = [_part(p, a) for p in pending] + [{"type": "text", "text": line}]
        turn = history + [{"role": "user", "content": content}]
        try:
            reply = []
            for delta in vlm.stream_chat(turn, **_media(a), **_sampling(a)):
                reply.append(delta)
                print(delta, end="", flush=True)
            print(flush=True)
        except (FastVLMError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        history = turn + [{"role": "assistant", "content": "".join(reply)}]
        pending = []


# ---------------------------------------------------------------------- download / convert
def cmd_download(a: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from . import hub

    ref = hub.ALIASES.get(a.model.lower(), a.model)
    if Path(ref).expanduser().is_dir():  # an embedded alias (tiny) or a local folder: no download
        path = hub.resolve(ref)
        if a.dir:
            path = Path(shutil.copytree(path, a.dir, dirs_exist_ok=True))
        print(path)
        return 0
    print(hub.snapshot(ref, local_dir=a.dir))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .hub import resolve
    from .weights import convert_checkpoint

    try:
        dst = convert_checkpoint(resolve(a.src), a.dst, a.to, trust_pickle=a.trust_pickle)
    except FileExistsError as e:
        return _error(str(e))
    print(f"wrote {a.to} checkpoint to {dst}")
    return 0


# ---------------------------------------------------------------------- main
# Subcommands that are modules with their own `main(argv)`, and their one-line help.
TOOLS = {
    "serve": "fastvlm.server.app",
    "bench": "fastvlm.bench",
    "batch": "fastvlm.batch",
    "watch": "fastvlm.video",
    "train": "fastvlm.train.loop",
    "eval": "fastvlm.train.evaluate",
    "lora": "fastvlm.train.merge",
    "quantize": "fastvlm.quant.cli",
    "export": "fastvlm.export",
}
TOOL_HELP = {
    "serve": "OpenAI-compatible HTTP server",
    "bench": "benchmark TTFT, vision, prefill and decode speed, memory, MBU",
    "batch": "caption a folder / manifest into JSONL, local workers or Ray",
    "watch": "live captions for a video file or camera, one per window",
    "train": "fine-tune or train a model",
    "eval": "score a model on image QA / captions",
    "lora": "LoRA adapter tools: merge",
    "quantize": "int8/int4 weight-only quantization",
    "export": "export to ONNX / web / Core ML / LiteRT-LM / TFLite with parity checks",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastvlm", description="Run FastVLM vision-language models."
    )
    parser.add_argument("--version", action="version", version=f"fastvlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("describe", help="describe images or videos")
    p.add_argument("images", nargs="*", help="image or video files, each described on its own")
    p.add_argument(
        "--image",
        "--image-file",
        dest="image",
        action="append",
        help="image (repeatable): all --image files go into ONE prompt",
    )
    p.add_argument("--prompt", "-p", default="Describe this image.")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per image instead of streaming"
    )
    p.add_argument("--verbose", "-v", action="store_true", help="print token counts and speed")
    _add_model_args(p)
    _add_sampling_args(p)
    _add_media_args(p)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("chat", help="interactive multi-turn chat about images")
    p.add_argument(
        "--image",
        "--image-file",
        dest="image",
        action="append",
        help="image or video for the first turn (repeatable)",
    )
    p.add_argument("--system", default=None, help="system prompt")
    _add_model_args(p)
    _add_sampling_args(p)
    _add_media_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("download", help="download a model from the Hugging Face Hub")
    p.add_argument("model", help="repo id, e.g. apple/FastVLM-0.5B")
    p.add_argument("--dir", default=None, help="download into this folder instead of the HF cache")
    p.set_defaults(func=cmd_download)

    for name in TOOLS:  # tools own their flags: `fastvlm NAME -h`
        text = TOOL_HELP.get(name, name)
        sub.add_parser(name, help=f"{text} (see `fastvlm {name} -h`)", add_help=False)
    p = sub.add_parser("convert", help="convert a checkpoint between formats (lossless)")
    p.add_argument("src", help="source folder or repo id")
    p.add_argument("dst", help="new output folder")
    p.add_argument("--to", required=True, choices=["hf", "apple", "fastvlm"])
    p.add_argument("--trust-pickle", action="store_true")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand. The one place any error becomes one `error:` line + exit 1
    (FASTVLM_TRACEBACK=1 re-raises it, for the traceback)."""
    import os

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in TOOLS:  # tools own their flags: delegate the rest of the line
            import importlib

            return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        parser = build_parser()
        a = parser.parse_args(argv)
        if not getattr(a, "func", None):
            parser.print_help()
            return 2
        return a.func(a)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("FASTVLM_TRACEBACK") == "1":
            raise
        msg = user_error(e)
        if msg is None:  # a bug: still one line, with the way to get the details
            name = type(e).__name__
            msg = f"unexpected {name}: {e} (FASTVLM_TRACEBACK=1 shows where; please report it)"
        return _error(msg)
