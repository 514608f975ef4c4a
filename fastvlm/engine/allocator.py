"""Keep freed activation memory in the process instead of returning it to the OS (glibc only).

Why: glibc serves every allocation above 32 MB with a fresh `mmap` and unmaps it on free, so each
big activation of the vision tower (a 1024² image makes 100-400 MB feature maps) costs page
faults and kernel page zeroing on every forward, several times the compute on a small CPU. The
price is that the resident set stays at its peak, which is what a model server or a batch job
wants anyway (jemalloc/tcmalloc users get the same effect).

`tune_malloc()` is called by `fastvlm.device.prepare_for_device` (CPU) and `fastvlm bench`; it is
a no-op off glibc, and `FASTVLM_MALLOC_TUNE=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done: bool | None = None


def tune_malloc() -> bool:
    """Serve large blocks from the heap and never trim it (idempotent). True if applied."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("FASTVLM_MALLOC_TUNE", "1") == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    _done = ok
    return ok
