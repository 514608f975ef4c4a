"""`fastvlm watch VIDEO|DEVICE --every 2s`: one streamed caption per window of a video file or a
camera, as a live-captioning app would (the windows come from video.windows)."""

from __future__ import annotations

import argparse
import json
import sys

from ..options import check_video_sampling
from ..video import parse_seconds, video_part, windows
from .args import (
    add_model_args,
    add_sampling_args,
    add_tokens_per_image_arg,
    load_model,
    sampling_kwargs,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvlm watch",
        description="Caption a video file or a camera (/dev/videoN, or its index) window by "
        "window, as a live-captioning app would.",
    )
    p.add_argument("source", help="video file, /dev/videoN, or a camera index such as 0")
    p.add_argument("--every", default="2s", help="window length: 2s, 500ms, 1m (default 2s)")
    p.add_argument("--frames", type=int, default=4, help="frames per window (default 4)")
    p.add_argument("--prompt", "-p", default="Describe what happens in these frames.")
    add_tokens_per_image_arg(p, help="pool each frame to K tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per window")
    add_model_args(p)
    add_sampling_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        every = parse_seconds(a.every)
        check_video_sampling(max_frames=a.frames, name="--frames")
        vlm = load_model(a)
        for start, end, frames in windows(a.source, every, a.frames):
            content = [video_part(frames), {"type": "text", "text": a.prompt}]
            chunks = vlm.stream_chunks(
                [{"role": "user", "content": content}],
                tokens_per_image=a.tokens_per_image,
                max_images=max(a.frames, 1),
                **sampling_kwargs(a),
            )
            if a.json:
                text = "".join(c.text for c in chunks)
                row = {"start": start, "end": end, "frames": [f.time for f in frames]}
                print(json.dumps({**row, "text": text}), flush=True)
                continue
            print(f"[{start:.1f}-{end:.1f} s] ", end="", flush=True)
            for c in chunks:
                print(c.text, end="", flush=True)
            print(flush=True)
    except (ValueError, TypeError) as e:  # FastVLMError (a ValueError) included
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
