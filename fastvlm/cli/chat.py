"""`fastvlm chat`: multi-turn chat about images on stdin (interactive or piped)."""

from __future__ import annotations

import argparse
import sys

from ..errors import FastVLMError
from ..images import load_image
from ..video import is_video
from .args import (
    add_media_args,
    add_model_args,
    add_sampling_args,
    content_part,
    load_model,
    media_kwargs,
    sampling_kwargs,
)

CHAT_HELP = "commands: /image PATH (attach to your next message), /reset, /exit"


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat about images")
    p.add_argument(
        "--image",
        "--image-file",
        dest="image",
        action="append",
        help="image or video for the first turn (repeatable)",
    )
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p)
    add_media_args(p)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    vlm = load_model(a)
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
        content = [content_part(p, a) for p in pending] + [{"type": "text", "text": line}]
        turn = history + [{"role": "user", "content": content}]
        try:
            reply = []
            for delta in vlm.stream_chat(turn, **media_kwargs(a), **sampling_kwargs(a)):
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
