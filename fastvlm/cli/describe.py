"""`fastvlm describe IMAGE|VIDEO ...`: one streamed description per input (or --json rows)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError, FastVLMError
from .args import (
    add_media_args,
    add_model_args,
    add_sampling_args,
    content_part,
    load_model,
    media_kwargs,
    sampling_kwargs,
)


def add_parser(sub) -> None:
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
    add_model_args(p)
    add_sampling_args(p)
    add_media_args(p)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    # Each positional IMAGE/VIDEO is described on its own; all --image files go in one prompt.
    runs = [[p] for p in a.images] + ([list(a.image)] if a.image else [])
    if not runs:
        raise ConfigError("give at least one image: fastvlm describe IMAGE [IMAGE ...]")
    vlm = load_model(a)
    failures = 0
    for paths in runs:
        path = paths[0] if len(paths) == 1 else ",".join(map(str, paths))
        content = [content_part(p, a) for p in paths] + [{"type": "text", "text": a.prompt}]
        if len(runs) > 1 and not a.json:
            print(f"== {path}", flush=True)
        try:
            text, last = [], None
            messages = [{"role": "user", "content": content}]
            for chunk in vlm.stream_chunks(messages, **media_kwargs(a), **sampling_kwargs(a)):
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
