"""Data parallelism for `fastvlm train` under torchrun (gloo on CPU, nccl on CUDA).

One bucketed all-reduce (sum) of the gradients per optimizer step, not the DDP wrapper: a rank
whose micro-batch was skipped (bad image) just contributes nothing instead of hanging DDP's
backward hooks, and accumulation needs no `no_sync`. The price is no overlap of communication
with the backward pass. With WORLD_SIZE unset every function is for one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (0, 1 for a plain process)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device) -> torch.device:
    """Join the process group (when there is one); returns this rank's device."""
    if world()[1] <= 1:
        return device
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def close() -> None:
    """Wait for every rank, then leave the process group (no-op for one process)."""
    if world()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a small picklable value)."""
    if world()[1] <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def broadcast_params(params: list[torch.Tensor]) -> None:
    """Start every rank from rank 0's trainable weights (as DDP does)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)


def all_reduce_grads(params: list[nn.Parameter], bucket_numel: int = 1 << 24) -> None:
    """Sum gradients over ranks in flat buckets; a parameter no rank touched keeps grad None."""
    if not params:
        return
    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(used)
    live = [p for p, u in zip(params, used.tolist(), strict=True) if u > 0]
    bucket: list[nn.Parameter] = []

    def flush() -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        bucket.clear()

    size = 0
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p)
        size += p.numel()
        if size >= bucket_numel:
            flush()
            size = 0
    if bucket:
        flush()


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum a number over ranks (via the device for nccl)."""
    on = torch.tensor([value]).to(device)
    dist.all_reduce(on)
    return on.cpu().item()
