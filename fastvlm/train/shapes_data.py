"""Generated shapes scenes as training records, drawn on access (nothing written to disk): the
data of the shipped demo model, reproducible from (n, seed, image size, max shapes) alone.

`max_shapes` < 4 keeps only the scenes of at most that many shapes (a curriculum stage: with one
shape per image the caption's colour / kind / size words are properties of the whole image, so a
from-scratch vision tower learns them before it has to bind them to positions). Record `i` is
then the i-th qualifying index of the seed's scene sequence; the scene count is read from
`sample_scene` on the image's own generator (no rendering), so the selection is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

from .data import ROLES, Record
from .shapes import MAX_SHAPES, image_rng, make_example, sample_scene


class ShapesRecords(Sequence):
    def __init__(
        self, n: int, seed: int, size: int, max_shapes: int = MAX_SHAPES, layout: str = "mixed"
    ) -> None:
        if not 1 <= max_shapes <= MAX_SHAPES:
            raise ValueError(f"max_shapes must be in 1..{MAX_SHAPES}, got {max_shapes}")
        self.n, self.seed, self.size, self.max_shapes = n, seed, size, max_shapes
        self.layout = layout
        self.index: list[int] | None = None
        if max_shapes < MAX_SHAPES:
            self.index, j = [], 0
            while len(self.index) < n:
                if len(sample_scene(image_rng(seed, j), size).shapes) <= max_shapes:
                    self.index.append(j)
                j += 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        j = i if self.index is None else self.index[i]
        img, row, _ = make_example(self.seed, j, self.size, self.layout)
        msgs = [{"role": ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
        return Record([img], msgs, j + 1)


def shapes_records(
    n: int, seed: int, size: int, max_shapes: int = MAX_SHAPES, layout: str = "mixed"
) -> ShapesRecords:
    return ShapesRecords(n, seed, size, max_shapes, layout)
