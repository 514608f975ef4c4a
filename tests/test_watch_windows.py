"""`fastvlm watch` windows of a video file: the last window ends at the clip's end (never past
it), each window holds the frames asked for spread over it (all of them when it has fewer), and
video bytes / file objects are read like paths. Clips are written with PyAV in the test."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import has_module

from fastvlm.cli import main
from fastvlm.errors import VideoError

pytestmark = pytest.mark.skipif(not has_module("av"), reason="PyAV not installed")


def make_clip(path, seconds: float, fps: int = 10, size: int = 32):
    """A clip of round(seconds * fps) frames whose brightness encodes the frame index."""
    import av

    n = max(1, round(seconds * fps))
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            a = np.full((size, size, 3), (i * 37) % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def windows_of(path, every: float, frames: int):
    from fastvlm.video import windows

    return [(s, e, [f.time for f in fr]) for s, e, fr in windows(str(path), every, frames)]


CASES = [
    # seconds, every, frames, expected (start, end) windows, expected frames per window
    (5.0, 10.0, 4, [(0.0, 5.0)], [4]),  # clip shorter than one window
    (5.0, 2.0, 4, [(0.0, 2.0), (2.0, 4.0), (4.0, 5.0)], [4, 4, 4]),  # 2.5 windows
    (1.0, 0.5, 8, [(0.0, 0.5), (0.5, 1.0)], [5, 5]),  # more frames asked than exist
    (0.1, 2.0, 4, [(0.0, 0.1)], [1]),  # a one-frame clip
    (3.0, 1.0, 2, [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)], [2, 2, 2]),  # whole windows
    (2.3, 1.0, 3, [(0.0, 1.0), (1.0, 2.0), (2.0, 2.3)], [3, 3, 3]),
]


@pytest.mark.parametrize("seconds,every,frames,spans,counts", CASES)
def test_windows_stop_at_the_clip_end_and_hold_the_frames_asked_for(
    tmp_path, seconds, every, frames, counts, spans
):
    clip = make_clip(tmp_path / "c.mp4", seconds)
    got = windows_of(clip, every, frames)
    assert [(s, e) for s, e, _ in got] == [pytest.approx(x, abs=1e-6) for x in spans]
    assert [len(t) for _, _, t in got] == counts
    for s, e, times in got:
        assert all(s - 1e-6 <= t < e for t in times), (s, e, times)
        assert times == sorted(set(times))
    # frames are spread over the whole window: first and last frame of the window included
    if counts[0] > 1:
        s, e, times = got[0]
        assert times[0] == pytest.approx(s, abs=1e-6)
        assert times[-1] == pytest.approx(min(e, seconds) - 0.1, abs=1e-6)


def test_window_plan_directly():
    from fastvlm.video import window_plan

    times = [i / 10 for i in range(50)]
    plan = window_plan(times, 5.0, 10.0, 4)
    assert plan == [(0.0, 5.0, [0, 16, 33, 49])]
    assert window_plan(times, 5.0, 2.0, 100)[-1] == (4.0, 5.0, list(range(40, 50)))
    gap = [0.0, 0.1, 3.0, 3.1]  # no frames between 0.2 s and 3 s: no empty windows
    assert [(s, e) for s, e, _ in window_plan(gap, 3.2, 1.0, 2)] == [(0.0, 1.0), (3.0, 3.2)]


def test_watch_json_rows_never_end_past_the_clip(tmp_path, capsys):
    clip = make_clip(tmp_path / "c.mp4", 5.0)
    argv = ["watch", str(clip), "--every", "10s", "--frames", "4", "--json", "--max-tokens", "2"]
    assert main(argv + ["--tokens-per-image", "1"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(rows) == 1 and rows[0]["start"] == 0.0 and rows[0]["end"] == 5.0
    assert len(rows[0]["frames"]) == 4


def test_video_bytes_and_file_objects_are_read_like_paths(tmp_path):
    from fastvlm.video import read_frames

    clip = make_clip(tmp_path / "c.mp4", 1.0)
    data = clip.read_bytes()
    ref = [f.time for f in read_frames(clip, max_frames=4)]
    assert [f.time for f in read_frames(data, max_frames=4)] == ref
    assert [f.time for f in read_frames(bytearray(data), max_frames=4)] == ref
    assert [f.time for f in read_frames(io.BytesIO(data), max_frames=4)] == ref


@pytest.mark.parametrize(
    "src,needle",
    [
        (b"", "empty"),
        (b"this is not a video at all" * 10, "video bytes: not an accepted video container"),
        (bytearray(200), "video bytes: not an accepted video container"),
        (io.BytesIO(b"junk" * 50), "not an accepted video container"),
        (12345, "must be a path, bytes or a binary file object"),
        (None, "must be a path, bytes or a binary file object"),
    ],
)
def test_bad_video_bytes_give_a_clear_error(src, needle):
    from fastvlm.video import read_frames

    with pytest.raises(VideoError) as e:
        read_frames(src)
    msg = str(e.value)
    assert needle in msg and "Errno" not in msg and "readable() returned" not in msg, msg


def test_a_video_part_with_bytes_goes_through_the_api(tmp_path):
    import fastvlm

    clip = make_clip(tmp_path / "c.mp4", 1.0)
    vlm = fastvlm.load(device="cpu")
    part = {"type": "video", "video": clip.read_bytes(), "max_frames": 2}
    msgs = [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}]
    assert isinstance(vlm.chat(msgs, tokens_per_image=1, max_tokens=2), str)
    assert vlm.last_stats.image_tokens == 2
    bad = [{"role": "user", "content": [{"type": "video", "video": b"junk"}]}]
    with pytest.raises(VideoError, match="video bytes: not an accepted video container"):
        vlm.chat(bad, max_tokens=2)
