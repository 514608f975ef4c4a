"""Read safetensors tensors, or row ranges of them, with plain file reads (no mmap).

Why not `safe_open`: it maps the whole file, and every page a read touches stays in the
process's resident set until the file is closed, so loading a 1 GB shard costs 1 GB of RSS on
top of the tensors made from it (the streamed quantized load would peak at the float size
again). Plain `readinto` of just the bytes wanted leaves nothing behind but the tensor.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data (offsets relative to 8 + N).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    # MLX-quantized folders pack weights in U32; the rest is what safetensors can write
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
MAX_HEADER = 100 * 2**20


class SafetensorsRows:
    """One safetensors file: `keys()`, `shape(k)`, `dtype(k)`, `read(k, r0=None, r1=None)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115 (closed by close() / the context)
        size = self.path.stat().st_size
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(self._f.read(n))
            header.pop("__metadata__", None)
            self._base = 8 + n
            self._meta = {}
            for k, v in header.items():
                if v["dtype"] not in DTYPES:
                    raise ValueError(f"tensor {k!r} has unsupported dtype {v['dtype']!r}")
                dt, shape, (b, e) = DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"]
                if e - b != math.prod(shape) * dt.itemsize or not 0 <= b <= e <= size - 8 - n:
                    raise ValueError(f"tensor {k!r} has inconsistent offsets")
                self._meta[k] = (dt, shape, b)
        except (ValueError, KeyError, TypeError, struct.error) as e:
            self._f.close()
            raise CheckpointError(
                f"cannot read {self.path.name}: {e} (corrupt or truncated file?)"
            ) from e

    def __enter__(self) -> SafetensorsRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][0]

    def read(self, key: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """The tensor, or its rows r0:r1 (first dimension), as a fresh CPU tensor."""
        dt, shape, begin = self._meta[key]
        if r0 is None:
            r0, r1 = 0, shape[0] if shape else 1
        row = math.prod(shape[1:]) * dt.itemsize
        out = torch.empty((r1 - r0) * row, dtype=torch.uint8)
        self._f.seek(self._base + begin + r0 * row)
        if out.numel() and self._f.readinto(out.numpy()) != out.numel():
            raise CheckpointError(f"cannot read {self.path.name}: truncated tensor {key!r}")
        out = out.view(dt)
        return out.reshape(r1 - r0, *shape[1:]) if shape else out.reshape(())


def iter_entries(files: list[Path]) -> Iterator[tuple[str, tuple, Any]]:
    """(key, shape, read) per stored tensor, without reading it: `read()` returns the whole
    tensor, `read(r0, r1)` only rows r0:r1 (what streamed quantization reads)."""
    for f in files:
        if f.suffix != ".safetensors":
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            for k, t in sd.items():
                yield k, tuple(t.shape), rows_of(t)
            continue
        with SafetensorsRows(f) as h:
            for k in h.keys():
                yield k, h.shape(k), rows_of_file(h, k)


def rows_of(t: torch.Tensor):
    return lambda r0=None, r1=None: t if r0 is None else t[r0:r1]


def rows_of_file(h: SafetensorsRows, k: str):
    return lambda r0=None, r1=None: h.read(k, r0, r1)


def peek_keys_and_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in files:
        if f.suffix == ".safetensors":
            with SafetensorsRows(f) as h:
                out.update((k, h.shape(k)) for k in h.keys())
    return out
