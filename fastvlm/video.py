"""Video input: decode with PyAV, sample frames, cut a stream into windows (a frame library:
no model here; `fastvlm watch` in cli/watch.py captions the windows).

Design decisions:
* Frames are chosen from the exact presentation times of the stream's packets, read in a cheap
  demux-only pass (no decoding), then only the chosen frames are decoded in a second pass. So
  "uniform" really means evenly spread over the frames that exist (first and last included), and
  `fps=r` picks the frame nearest each multiple of 1/r seconds. When `fps` asks for more frames
  than `max_frames`, the picks are thinned uniformly, so the whole clip stays covered.
* A video becomes ordinary images for the model: each frame is one image with its own placeholder
  run, introduced by its timestamp ("Frame 3 (1.0 s): <image>"), in time order (processing.py).
  Each frame is encoded once; identical frames share one encoder call through the engine's vision
  cache. Token reduction (`tokens_per_image`) is what makes many frames affordable.
* `windows` feeds the live-captioning loop: a reader thread cuts the stream into windows of
  `every` seconds; for a camera, a window that arrives while the model is still busy replaces
  the waiting one (captions stay current), while a file is captioned window by window, nothing
  dropped.
* **Only allowlisted containers are demuxed**, and the demuxer is forced, never probed: FFmpeg's
  probe would also pick concat / HLS / image-sequence "formats", which open other files or URLs
  named inside the bytes (a local-file read when the bytes come from a client). The container
  is sniffed from its magic bytes, opened with that demuxer only, with FFmpeg's protocols
  restricted to the file itself (none at all for bytes), and checked again after opening.
* PyAV is an optional extra (`pip install 'fastvlm[video]'`), imported only here.
"""

from __future__ import annotations

import io
import math
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VideoError

VIDEO_EXTENSIONS = {
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp",
}  # fmt: skip
MAX_VIDEO_BYTES = 2 << 30  # 2 GiB
MAX_FRAME_PIXELS = 7680 * 4320  # 8K UHD
MAX_DURATION_S = 4 * 3600.0
# FFmpeg demuxers a video may be read with (anything else is refused before FFmpeg sees it).
CONTAINERS = {
    "mov": "mp4/mov/m4v/3gp",
    "matroska": "mkv/webm",
    "avi": "avi",
    "gif": "gif",
    "mpegts": "mpeg-ts",
    "mpeg": "mpeg-ps",
    "flv": "flv",
    "asf": "wmv/asf",
}
CONTAINER_NAMES = ", ".join(CONTAINERS.values())
# mov can follow "data references" to other files: off (the default), and said so explicitly.
_DEMUXER_OPTIONS = {"mov": {"enable_drefs": "0", "use_absolute_path": "0"}}
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
_SNIFF_BYTES = 512


@dataclass(slots=True)
class Frame:
    index: int  # position among the stream's frames, presentation order
    time: float  # seconds since the first frame
    image: Any  # PIL.Image.Image (RGB)


def is_video(src: Any) -> bool:
    """True for a path with a video extension or a capture device (/dev/videoN)."""
    if not isinstance(src, (str, os.PathLike)):
        return False
    s = str(src)
    return s.startswith("/dev/video") or Path(s).suffix.lower() in VIDEO_EXTENSIONS


def _av():
    try:
        import av
    except ImportError as e:
        raise VideoError(
            "video input needs PyAV: pip install 'fastvlm[video]' (or pip install av)"
        ) from e
    return av


def _av_reason(e: BaseException) -> str:
    """PyAV's error without its errno / filename decoration: "Invalid data found when ..."."""
    return getattr(e, "strerror", None) or str(e).split(";")[0]


def sniff_container(head: bytes) -> str | None:
    """The allowlisted demuxer (a `CONTAINERS` key) for a file starting with `head`, else None."""
    if len(head) >= 8 and head[4:8] in _ISO_BOXES:
        return "mov"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:3] == b"FLV":
        return "flv"
    if head[:16] == _ASF_GUID:
        return "asf"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:  # 188-byte TS packets
        return "mpegts"
    return None


def _source(src: Any, max_bytes: int) -> tuple[Any, str]:
    """A video source as (bytes | Path | "/dev/videoN" str, name for messages).
    File-like objects are read (capped) into bytes, so every open starts from their start."""
    if isinstance(src, str) and src.isdigit():  # "0" → first camera
        src = f"/dev/video{src}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), "video bytes"
    elif hasattr(src, "read"):
        data, name = src.read(max_bytes + 1), "video file object"
        if not isinstance(data, bytes):
            raise VideoError(
                f"{type(src).__name__}: a file-like video must be opened in binary mode"
            )
    elif isinstance(src, (str, os.PathLike)):
        s = str(src)
        if s.startswith(("http://", "https://")):
            raise VideoError(f"{s[:80]}: URLs are not fetched by the library; download it first")
        if s.startswith("/dev/video"):
            return s, s
        p = Path(s).expanduser()
        if not p.exists():
            raise VideoError(f"video not found: {p}")
        if not p.is_file():
            raise VideoError(f"{p} is a folder or a device, not a video file")
        if p.stat().st_size > max_bytes:
            raise VideoError(
                f"{p}: {p.stat().st_size / 2**20:.0f} MiB is over the {max_bytes / 2**20:.0f} MiB "
                "video limit; cut or re-encode it (e.g. ffmpeg -t 60) or raise max_bytes"
            )
        return p.resolve(), str(p)
    else:
        raise VideoError(
            f"a video must be a path, bytes or a binary file object, got {type(src).__name__}"
        )
    if not data:
        raise VideoError(f"{name} are empty" if name == "video bytes" else f"{name} is empty")
    if len(data) > max_bytes:
        raise VideoError(f"{name}: over the {max_bytes} byte video limit")
    return data, name


def _open(src: Any, max_bytes: int = MAX_VIDEO_BYTES):
    """(container, video stream, name) for a path, bytes or a capture device (see `_source`)."""
    av = _av()
    src, name = _source(src, max_bytes)
    demuxer = None
    if isinstance(src, str):  # a capture device: the operator's own hardware, not client data
        target, kw = src, {"format": "v4l2"}
    else:
        if isinstance(src, Path):
            with open(src, "rb") as f:
                head = f.read(_SNIFF_BYTES)
            # "file:" makes FFmpeg read the name literally (no other protocol, no pattern)
            target, protocols = f"file:{src}", "file"
        else:
            head, target, protocols = src[:_SNIFF_BYTES], io.BytesIO(src), "none"
        demuxer = sniff_container(head)
        if demuxer is None:
            raise VideoError(
                f"{name}: not an accepted video container (accepted: {CONTAINER_NAMES})",
                kind="container",
            )
        opts = {"protocol_whitelist": protocols, **_DEMUXER_OPTIONS.get(demuxer, {})}
        kw = {"format": demuxer, "container_options": opts}
    try:
        container = av.open(target, **kw)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{name}: not a readable video ({_av_reason(e)})") from e
    if demuxer and not CONTAINERS.keys() & set(container.format.name.split(",")):
        container.close()  # defence in depth: whatever was opened must be allowlisted
        raise VideoError(f"{name}: opened as {container.format.name!r}", kind="container")
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: has no video stream")
    return container, container.streams.video[0], name


def _check_frame_size(stream, max_pixels: int, name: str) -> None:
    """The stream header's frame size: refused before the decoder allocates a frame buffer."""
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > max_pixels:
        raise VideoError(
            f"{name}: {w}x{h} frames are over the {max_pixels} pixel limit", kind="pixels"
        )


def frame_times(src: Any, max_bytes: int = MAX_VIDEO_BYTES) -> list[float]:
    """Presentation times (s, from the first frame) of every frame, from a demux-only pass."""
    return probe(src, max_bytes)[0]


def probe(src: Any, max_bytes: int = MAX_VIDEO_BYTES) -> tuple[list[float], float]:
    """(frame times, clip duration) from a demux-only pass. The duration runs to the end of the
    last frame: its time + the typical frame interval (1 / the stream's rate for one frame)."""
    av = _av()
    container, stream, name = _open(src, max_bytes)
    try:
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
    except av.FFmpegError as e:
        raise VideoError(f"{name}: corrupt video ({_av_reason(e)})") from e
    finally:
        container.close()
    if not pts:
        raise VideoError(f"{name}: no decodable video frames")
    tb = float(stream.time_base)
    times = [(p - pts[0]) * tb for p in pts]
    if times[-1] > MAX_DURATION_S:
        raise VideoError(f"{name}: {times[-1]:.0f} s is over the {MAX_DURATION_S:.0f} s limit")
    if len(times) > 1:
        step = float(np.median(np.diff(times)))
    else:
        step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
    return times, round(times[-1] + step, 6)


def sample_indices(times: list[float], fps: float | None, max_frames: int) -> list[int]:
    """Which frames to keep: `max_frames` spread evenly (fps None) or one per 1/fps seconds
    (nearest frame, thinned evenly to `max_frames`). Sorted, unique."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be ≥ 1, got {max_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not times:
        return []
    n = len(times)
    if fps is None:
        idx = np.linspace(0, n - 1, min(max_frames, n)).round().astype(int)
    else:
        t = np.asarray(times)
        targets = np.arange(0.0, t[-1] + 1e-6, 1.0 / fps)
        right = np.clip(np.searchsorted(t, targets), 0, n - 1)
        left = np.clip(right - 1, 0, n - 1)
        idx = np.where(np.abs(t[left] - targets) <= np.abs(t[right] - targets), left, right)
        idx = np.unique(idx)
        if len(idx) > max_frames:
            idx = idx[np.linspace(0, len(idx) - 1, max_frames).round().astype(int)]
    return sorted({int(i) for i in idx})


def read_frames(
    src: Any,
    fps: float | None = None,
    max_frames: int = 16,
    *,
    max_bytes: int = MAX_VIDEO_BYTES,
    max_pixels: int = MAX_FRAME_PIXELS,
) -> list[Frame]:
    """Decode the sampled frames of a video file, in time order (see `sample_indices`)."""
    av = _av()
    if hasattr(src, "read"):  # read once: the file is opened twice below
        src = _source(src, max_bytes)[0]
    times = frame_times(src, max_bytes)
    want = sample_indices(times, fps, max_frames)
    container, stream, name = _open(src, max_bytes)
    tb, first, out = float(stream.time_base), None, []
    wanted = set(want)
    try:
        _check_frame_size(stream, max_pixels, name)
        for i, frame in enumerate(container.decode(stream)):
            if first is None:
                first = frame.pts or 0
            if i in wanted:
                if frame.width * frame.height > max_pixels:
                    raise VideoError(
                        f"{name}: {frame.width}x{frame.height} frames are over the "
                        f"{max_pixels} pixel limit",
                        kind="pixels",
                    )
                t = (frame.pts - first) * tb if frame.pts is not None else times[i]
                out.append(Frame(i, round(t, 3), frame.to_image()))
                if len(out) == len(want):
                    break
    except av.FFmpegError as e:
        raise VideoError(f"{name}: corrupt video ({_av_reason(e)})") from e
    finally:
        container.close()
    if not out:
        raise VideoError(f"{name}: no decodable video frames")
    return out


def iter_frames(src: Any, fps: float | None = None) -> Iterator[Frame]:
    """Stream frames (file or camera) in decode order, at most `fps` per second of video."""
    av = _av()
    container, stream, name = _open(src)
    tb = float(stream.time_base) if stream.time_base else 0.0
    first, next_t = None, 0.0
    try:
        _check_frame_size(stream, MAX_FRAME_PIXELS, name)
        for i, frame in enumerate(container.decode(stream)):
            if frame.pts is None or not tb:
                t = i / float(stream.average_rate or 30)
            else:
                first = frame.pts if first is None else first
                t = (frame.pts - first) * tb
            if fps is not None:
                if t + 1e-6 < next_t:
                    continue
                next_t += 1.0 / fps * max(1, int((t - next_t) * fps) + 1)
            if frame.width * frame.height > MAX_FRAME_PIXELS:
                raise VideoError(f"{name}: {frame.width}x{frame.height} frames are too large")
            yield Frame(i, round(t, 3), frame.to_image())
    except av.FFmpegError as e:
        raise VideoError(f"{name}: corrupt video ({_av_reason(e)})") from e
    finally:
        container.close()


def windows(
    src: Any, every: float = 2.0, frames_per_window: int = 4
) -> Iterator[tuple[float, float, list[Frame]]]:
    """(start s, end s, frames) per window of `every` seconds; `frames_per_window` evenly spaced.
    A file's last window ends at the clip's end (`window_plan`). Live sources (cameras) drop
    windows the consumer is too slow for; files drop nothing."""
    if not every > 0:
        raise ValueError(f"every must be > 0 seconds, got {every}")
    live = isinstance(src, str) and (src.isdigit() or src.startswith("/dev/video"))
    q: queue.Queue = queue.Queue(maxsize=1 if live else 4)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if live:  # replace the stale waiting window
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass

    def reader() -> None:
        try:
            make = _live_windows if live else _file_windows
            for item in make(src, every, frames_per_window):
                if stop.is_set():
                    return
                put(item)
        except BaseException as e:  # surfaces in the consumer
            put(e)
        put(None)

    t = threading.Thread(target=reader, name="fastvlm-video-reader", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def window_plan(
    times: list[float], duration: float, every: float, n: int
) -> list[tuple[float, float, list[int]]]:
    """(start, end, frame indices) per window of a clip: the last window ends at the clip's end,
    and each window takes `n` frames spread evenly over the frames inside it (all, if fewer)."""
    t = np.asarray(times)
    out = []
    for k in range(max(1, math.ceil(duration / every - 1e-9))):
        start, end = k * every, min((k + 1) * every, duration)
        inside = np.flatnonzero((t >= start - 1e-9) & (t < end - 1e-9))
        if len(inside):  # a gap in the stream gives no window
            pick = inside[np.linspace(0, len(inside) - 1, min(n, len(inside))).round().astype(int)]
            out.append(
                (float(round(start, 6)), float(round(end, 6)), sorted({int(i) for i in pick}))
            )
    return out


def _file_windows(src: Any, every: float, n: int) -> Iterator[tuple[float, float, list[Frame]]]:
    """Windows of a file, planned from its frame times, then decoded in one pass."""
    av = _av()
    times, duration = probe(src)
    plan = window_plan(times, duration, every, n)
    container, stream, name = _open(src)
    w, buf = 0, []
    try:
        for i, frame in enumerate(container.decode(stream)):
            if w == len(plan):
                break
            if i in plan[w][2]:
                if frame.width * frame.height > MAX_FRAME_PIXELS:
                    raise VideoError(f"{name}: {frame.width}x{frame.height} frames are too large")
                buf.append(Frame(i, round(times[i], 3), frame.to_image()))
            if i == plan[w][2][-1]:
                yield plan[w][0], plan[w][1], buf
                w, buf = w + 1, []
        if buf:  # the decoder gave fewer frames than the demuxer counted
            yield plan[w][0], plan[w][1], buf
    except av.FFmpegError as e:
        raise VideoError(f"{name}: corrupt video ({_av_reason(e)})") from e
    finally:
        container.close()


def _live_windows(src: Any, every: float, n: int) -> Iterator[tuple[float, float, list[Frame]]]:
    """Windows of a camera: no end known, so frames are sampled at n / every per second."""
    k, buf = 0, []
    for f in iter_frames(src, fps=n / every):
        while f.time >= (k + 1) * every:
            if buf:
                yield k * every, (k + 1) * every, buf
            k, buf = k + 1, []
        if len(buf) < n:
            buf.append(f)
    if buf:
        yield k * every, (k + 1) * every, buf


def parse_seconds(s: str) -> float:
    """'2s' / '500ms' / '1.5' / '1m' → seconds."""
    v = s.strip().lower()
    for suffix, mult in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if v.endswith(suffix):
            v, scale = v[: -len(suffix)], mult
            break
    else:
        scale = 1.0
    try:
        out = float(v) * scale
    except ValueError:
        raise ValueError(f"not a duration: {s!r} (use e.g. 2s, 500ms, 1m)") from None
    if not out > 0:
        raise ValueError(f"duration must be > 0, got {s!r}")
    return out


def video_part(frames: list[Frame]) -> dict:
    """A pre-decoded video content part for `FastVLM.chat` messages."""
    return {
        "type": "video",
        "frames": [f.image for f in frames],
        "timestamps": [f.time for f in frames],
    }
