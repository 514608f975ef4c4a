"""`fastvlm` command line: the dispatcher and its one error path.

describe | chat | download | convert are parsed here (their code is in cli/describe.py,
cli/chat.py, cli/convert.py); the tools in TOOLS are modules with their own `main(argv)`.
Every model-loading command takes the shared flags of cli/args.py (incl. --backend).
User mistakes (bad image, unknown model, broken checkpoint) print one `error:` line and exit 1;
with several images, a bad one is reported and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import FastVLMError
from . import chat, convert, describe

# Subcommands that are modules with their own `main(argv)`, and their one-line help.
TOOLS = {
    "serve": "fastvlm.server.app",
    "bench": "fastvlm.bench",
    "batch": "fastvlm.batch",
    "watch": "fastvlm.cli.watch",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastvlm", description="Run FastVLM vision-language models."
    )
    parser.add_argument("--version", action="version", version=f"fastvlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    describe.add_parser(sub)
    chat.add_parser(sub)
    for name in TOOLS:  # tools own their flags: `fastvlm NAME -h`
        text = TOOL_HELP.get(name, name)
        sub.add_parser(name, help=f"{text} (see `fastvlm {name} -h`)", add_help=False)
    convert.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand. The one place any error becomes one `error:` line + exit 1
    (FASTVLM_TRACEBACK=1 re-raises it, for the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in TOOLS:  # tools own their flags: delegate the rest of the line
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
        print(f"error: {msg}", file=sys.stderr)
        return 1
