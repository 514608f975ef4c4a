"""Generated shapes scenes as training records, drawn on access (nothing written to disk): the
data of the shipped demo model, reproducible from (n, seed, image size) alone."""

from __future__ import annotations

from collections.abc import Sequence

from .data import ROLES, Record
from .shapes import make_example


class ShapesRecords(Sequence):
    def __init__(self, n: int, seed: int, size: int) -> None:
        self.n, self.seed, self.size = n, seed, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        img, row, _ = make_example(self.seed, i, self.size)
        msgs = [{"role": ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
        return Record([img], msgs, i + 1)


def shapes_records(n: int, seed: int, size: int) -> ShapesRecords:
    return ShapesRecords(n, seed, size)
