"""The micro-batches of `fastvlm train`, in training order, optionally decoded by worker
processes: same batches and order with or without workers, on every rank and after a resume."""

from __future__ import annotations

import torch

from .data import VLMDataset, collate, shuffled


class _StepSampler(torch.utils.data.Sampler):
    """Index lists of the micro-batches of steps `first..stop-1`, in training order: the epoch's
    seeded permutation, sharded by rank, cut into `--grad-accum` micro-batches per step."""

    def __init__(self, n, first, stop, steps_per_epoch, batch, accum, seed, rank, world):
        self.args = (n, first, stop, steps_per_epoch, batch, accum, seed, rank, world)

    def __iter__(self):
        n, first, stop, spe, batch, accum, seed, rank, world = self.args
        cached: tuple[int, list[int]] | None = None
        for step in range(first, stop):
            epoch, offset = divmod(step, spe)
            if cached is None or cached[0] != epoch:
                cached = (epoch, shuffled(n, seed, epoch)[rank::world])
            for micro in range(accum):
                start = (offset * accum + micro) * batch
                yield cached[1][start : start + batch]

    def __len__(self) -> int:
        n, first, stop, spe, batch, accum, *_ = self.args
        return max(0, stop - first) * accum


class _Reported(torch.utils.data.Dataset):
    """`VLMDataset` items plus why a row was skipped (a worker's `skipped` dict is its own)."""

    def __init__(self, ds: VLMDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]  # None when skipped; the reason is then in ds.skipped[line]
        if item is None:
            line = self.ds.records[i].line
            return None, {line: self.ds.skipped[line]}
        return item, {}


class _Collate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items):
        bad: dict[int, str] = {}
        for _, b in items:
            bad.update(b)
        return collate([x for x, _ in items], self.pad_id), bad


def micro_batches(ds, first, stop, steps_per_epoch, a, rank, world, pad_id):
    """(batch, skipped rows) for every micro-batch from step `first` to `stop`, in order.

    With `--workers` > 0 a DataLoader decodes / draws the images in that many processes ahead
    of the training step (same batches, same order as without: only where the work runs changes).
    """
    sampler = _StepSampler(
        len(ds), first, stop, steps_per_epoch, a.batch_size, a.grad_accum, a.seed, rank, world
    )
    return torch.utils.data.DataLoader(
        _Reported(ds),
        batch_sampler=sampler,
        collate_fn=_Collate(pad_id),
        num_workers=a.workers,
        prefetch_factor=4 if a.workers else None,
        persistent_workers=False,
    )
