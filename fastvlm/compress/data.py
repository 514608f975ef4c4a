"""Batches for calibration, healing and distillation: a data file `train` reads, or generated
shapes scenes (the demo model's own task), through the training data pipeline.

Design decision: the same `VLMDataset` / `collate` as `fastvlm train`, so the answer-token
labels (-100 elsewhere) that the losses select are the ones training uses.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from ..errors import FastVLMError
from ..train.data import VLMDataset, collate, load_records


def load_rows(
    data: str | None, image_dir: str | None, shapes: int, data_seed: int, image_size: int
) -> Sequence:
    """Training records from `--data FILE` or `--shapes N --data-seed S`."""
    if data:
        records, report = load_records(data, image_dir)
        if not records:
            raise FastVLMError(f"{data}: no usable rows ({report.summary()})")
        return records
    if shapes <= 0:
        raise FastVLMError("give --data FILE or --shapes N (N > 0)")
    from ..train.shapes_data import shapes_records

    return shapes_records(shapes, data_seed, image_size)


def pad_id_of(tok) -> int:
    pid = tok.token_to_id("<|endoftext|>") if tok is not None else None
    return 0 if pid is None else pid


def batches(
    records: Sequence,
    processor,
    batch_size: int,
    *,
    seed: int = 0,
    pad_id: int = 0,
    max_length: int | None = None,
    rank: int = 0,
    world: int = 1,
    start_step: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded stream of collated batches (epoch after epoch); with `world` > 1 each
    rank takes its own slice of every step's rows. Rows that fail to encode are skipped."""
    ds = VLMDataset(records, processor, max_length)
    n = len(ds)
    if n < batch_size * world:
        raise FastVLMError(f"{n} rows are fewer than one step's {batch_size * world}")
    per_epoch = n // (batch_size * world)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        lo = (k * world + rank) * batch_size
        batch = collate([ds[i] for i in order[lo : lo + batch_size]], pad_id)
        step += 1
        if batch is not None:
            yield batch
