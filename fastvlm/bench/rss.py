"""Resident-set accounting that leaves the bench's own probe buffers out.

The bandwidth probes read a buffer bigger than the caches (256-512 MB). With `tune_malloc`
(heap never trimmed) that buffer would stay resident and be counted in every peak RSS figure.
So probe buffers are anonymous mmaps (returned to the OS when freed), and while one exists the
peak is frozen: `probe_buffer()` records the peak so far, and after the probe it resets the
kernel's high-water mark (/proc/self/clear_refs "5") to the current RSS. `peak_mb()` is then the
process's peak outside probes. Without /proc (not Linux) it is getrusage's peak, probes included.
"""

from __future__ import annotations

import mmap
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_peak_outside_probes = 0.0


def _status() -> tuple[float, float] | None:
    try:
        with open("/proc/self/status") as f:
            d = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith("Vm")}
        return d["VmRSS"] / 1024, d["VmHWM"] / 1024
    except (OSError, KeyError, ValueError):
        return None


def current_mb() -> float:
    s = _status()
    return s[0] if s else peak_mb()


def peak_mb() -> float:
    """Peak resident set in MB, bench probe buffers excluded where /proc allows."""
    s = _status()
    if s is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20
    return max(_peak_outside_probes, s[1])


@contextmanager
def probe_buffer(mb: int, device: torch.device) -> Iterator[torch.Tensor]:
    """A float32 tensor of `mb` MB of ones for a bandwidth probe, left out of `peak_mb()`."""
    global _peak_outside_probes
    _peak_outside_probes = peak_mb()
    if device.type != "cpu":
        yield torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=device)
        return
    mm = mmap.mmap(-1, mb * 2**20)
    try:
        x = torch.frombuffer(mm, dtype=torch.float32).fill_(1.0)
        yield x
        del x
    finally:
        try:
            mm.close()
        except BufferError:  # a caller kept a view: the mapping lives until it is freed
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current RSS
        except OSError:
            pass
