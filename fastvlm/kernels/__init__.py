"""Bandwidth-bound decode kernels (small-M GEMV/GEMM) for AVX2 + FMA CPUs, and `FastLinear`.

Why: decode on a CPU is memory-bound, and torch's kernels waste bandwidth at M = 1..8 rows
(F.linear at small M reads weights far below a plain read's speed, and its int8 / int4
weight-only kernels only run fast in bf16; the numbers are in docs/kernels.md). `gemv.c` reads
every weight element once per call (all M ≤ 8 rows of x are multiplied while a weight tile sits
in registers) and splits output rows over OpenMP threads (the count comes from
`torch.get_num_threads()` at each call).

Design decisions:
* **Compiled on first use, no torch headers**: `gemv.c` is built with the system C compiler
  (`$CC`, default `cc`; `-O3 -mavx2 -mfma -fopenmp -shared -fPIC`) into
  `$FASTVLM_KERNELS_CACHE` or `~/.cache/fastvlm/kernels/<sha of source+flags>.so` (write to a
  temp file, then atomic rename: concurrent processes never see half a library), loaded with
  ctypes and called with `.data_ptr()`s. Without OpenMP support (e.g. Apple clang) it is built
  single-threaded. The OpenMP runtime is torch's own `libgomp.so.1` (same soname, already
  loaded), so there is one thread pool, not two fighting over the cores.
* **Clean fallback**: `available()` is False (and callers keep their torch path) when
  `FASTVLM_KERNELS=0`, the OS/arch is not Linux or macOS on x86-64, the CPU lacks AVX2/FMA, or
  the compile fails (the reason is in `unavailable_reason()`); nothing raises.
* **Layouts = the model's**: fp32 uses nn.Linear's (N, K) weight as is; int8 uses `Int8Linear`'s
  (N, K) int8 + (N,) scales; int4 uses `Int4Linear`'s portable nibble form (N, K/2) with
  (N, K/G) scales and `zb = zero - 8 * scale` (fp32, built once by the caller).
* **Integer dot products for the quantized layers (`act_quant`, what the modules use)**: fp32
  math on int8/int4 weights is bound by converts and FMAs (at M = 4 the FMA ports), not by
  memory. So x is quantized per call — for int8 weights to int16
  per 64 columns (`_mm256_madd_epi16`, ~1e-5 relative error: near-exact), for int4 to int8 per
  8-32 columns (`_mm256_maddubs_epi16`, or AVX-VNNI `vpdpbusd` where the CPU has it, picked at
  run time; the classic Q4 x Q8 scheme; error ~10x below the int4 weight rounding). The int4
  offset term uses exact fp32 sums of x. `act_quant=False` keeps the exact fp32 kernels (relative
  error vs float64 ~1e-7), also taken when K % 64 != 0. Error bounds: `linear_int8/int4`.
* **AVX-512 where the CPU has it** (F + BW + VNNI, probed at run time; the library is still
  built with `-mavx2 -mfma`, the AVX-512 functions carry their own target attribute): fp32 at
  M = 2..8 (16-lane tiles), int8 act_quant at M = 1 (`vpdpwssd`), int4 act_quant at M = 1 with
  G >= 64 (one `vpdpbusd` per 64 columns); gains in docs/kernels.md. `use_vnni(False)` forces
  the AVX2 code everywhere (tests run both).
* **Software prefetch** 12-16 KB ahead in the int8/int4 weight streams: behind a compute-light
  inner loop the hardware prefetcher alone leaves part of the bandwidth unused.
* **Where they are used**: `FastLinear` for M ≤ `MAX_M` (prefill keeps MKL, which wins there,
  or a bf16 GEMM with `prefill_dtype`); `Int8Linear` / `Int4Linear` below `prefill.MIN_ROWS`
  rows (rows go in blocks of 8, re-reading W per block). Prompt-sized calls take
  `kernels/prefill.py` (chunked dequantize + one GEMM): one parallel region per 8 rows made
  prefill fragile whenever a thread is descheduled (shared machines).
* **Per-call cost**: decode makes ~170 Linear calls per token, so modules validate their weights
  once per storage and call the unchecked `_run_*` helpers (one ctypes call + one torch.empty);
  the public `linear_*` functions check everything and raise ValueError on misuse.
* **Threads**: output rows are split over threads — contiguous static ranges where one weight
  stream per thread lets the prefetcher run ahead, dynamic chunks elsewhere (see gemv.c); no
  parallel region at 1 thread.

* **Fused decode** (`fvk_decode`, driven by `fastvlm/kernels/fused.py`): the Engine's CPU decode
  step runs every decoder layer — RMSNorm, the projections through the kernels above, RoPE, the
  KV-cache write, attention, SwiGLU, residuals — in one C call, instead of ~40 torch ops per
  layer between the GEMVs, whose dispatch costs as much as the GEMVs once those run at
  bandwidth. `Engine(fused_decode=False)` or `fastvlm bench --no-fused-decode` keeps the
  layer-by-layer torch path.

`use_fast_linears(model)` swaps the decoder's and lm_head's plain Linears for `FastLinear` in
place (same Parameter objects). Measure with scripts/bench_kernels.py (kernels alone, torch
interleaved) and scripts/bench_decode_kernels.py (Engine decode, 0.5B shape).

Measurements and their history: docs/kernels.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import prefill
from .capture import graph_capture

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC"]
OPENMP_FLAGS = ["-fopenmp"]
ABI_VERSION = 9
MAX_M = 8  # FastLinear uses the kernel up to this many rows (decode); larger M keeps MKL

_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""
_enabled = True


# ---------------------------------------------------------------------- build and load
def _cache_dir() -> Path:
    env = os.environ.get("FASTVLM_KERNELS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastvlm" / "kernels"


def _cpu_supported() -> str:
    """'' when this OS/CPU can run the kernels, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPU architecture {platform.machine()} is not x86-64"
    if sys.platform.startswith("linux"):
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError as e:
            return f"cannot read /proc/cpuinfo ({e})"
        flags = set()
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                capture_output=True, text=True, timeout=10,
            ).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError) as e:
            return f"cannot query CPU features ({e})"
        flags = set(out.lower().split())
    else:
        return f"OS {sys.platform} is not supported (Linux or macOS on x86-64)"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    return f"CPU lacks {', '.join(missing)}" if missing else ""


def _compile(cc: str, out: Path) -> str:
    """Build the library at `out` (atomically); '' on success, else the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (OPENMP_FLAGS, ["-Wno-unknown-pragmas"]):  # OpenMP first, then single-threaded
        fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=out.parent)
        os.close(fd)
        try:
            cmd = [cc, *FLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if r.returncode == 0 and os.path.getsize(tmp) > 0:
                os.replace(tmp, out)
                return ""
            errors.append(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{cc}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return "; ".join(errors)


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _reason
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("FASTVLM_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        _reason = "disabled by FASTVLM_KERNELS=0"
        return None
    _reason = _cpu_supported()
    if _reason:
        return None
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        _reason = f"no C compiler ({cc!r} not found; set CC)"
        return None
    try:
        src = SOURCE.read_bytes()
    except OSError as e:
        _reason = f"kernel source missing ({e})"
        return None
    key = hashlib.sha256(src + " ".join([cc, *FLAGS, *OPENMP_FLAGS]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"gemv-{key}.so"
    try:
        if not path.exists():
            err = _compile(cc, path)
            if err:
                _reason = f"compile failed: {err}"
                return None
        lib = ctypes.CDLL(str(path))
        if lib.fvk_abi_version() != ABI_VERSION:
            _reason = f"stale kernel library {path}"
            return None
    except OSError as e:
        _reason = f"cannot build or load {path}: {e}"
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fvk_linear_f32.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.fvk_linear_f32.restype = None
    lib.fvk_linear_i8.argtypes = [p, p, p, p, p, i64, i64, i64, i32, i32]
    lib.fvk_linear_i8.restype = ctypes.c_int
    lib.fvk_linear_i4.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i32, i32]
    lib.fvk_linear_i4.restype = ctypes.c_int
    lib.fvk_decode_scratch.argtypes = [i64] * 7
    lib.fvk_decode_scratch.restype = i64
    f32 = ctypes.c_float
    lib.fvk_decode.argtypes = [i32, p, p, *[i64] * 8, p, p, p, p, i32, p, p, i64, p, f32, p, i32]
    lib.fvk_decode.restype = ctypes.c_int
    lib.fvk_set_isa.argtypes = [i32]
    lib.fvk_set_isa.restype = ctypes.c_int
    lib.fvk_set_isa(1)  # AVX-VNNI for the int4 act_quant tiles where the CPU has it
    _lib = lib
    return lib


def available() -> bool:
    """True when the kernels are built and loaded (compiles on the first call) and enabled."""
    return _enabled and _load() is not None


def set_enabled(flag: bool) -> bool:
    """Switch the kernels off (callers take their torch paths) or back on, at runtime; returns
    the previous setting. For A/B measurements in one process. (An Int4Linear picks its weight
    layout at `repack()` time, so toggle before quantizing/loading for int4.)"""
    global _enabled
    prev, _enabled = _enabled, bool(flag)
    return prev


def _check_rc(rc: int, fn: str) -> None:
    """The C kernels return 0, -1 (shape the kernel cannot take) or -2 (out of memory for its
    scratch buffer); an error, not an assert, so it also holds under `python -O`."""
    if rc:
        why = {-1: "unsupported shape", -2: "out of memory"}.get(rc, "error")
        raise RuntimeError(f"{fn} failed with {rc} ({why})")


def use_vnni(flag: bool = True) -> bool:
    """Run the int4 act_quant tiles with AVX-VNNI (`vpdpbusd`), and int8 act_quant at M = 1 with
    AVX-512 VNNI (`vpdpwssd`), when the CPU (and the compiler that built the library) has them —
    the default — or force the AVX2 tiles (`flag=False`; tests and A/B runs). The same integer
    dot products either way (int8: float sums in another order, ~1e-7). Returns whether
    AVX-VNNI is now in use (the AVX-512 path follows the flag where the CPU has it)."""
    return bool(_lib_or_raise().fvk_set_isa(int(flag)))


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    _load()
    return _reason


def _reset() -> None:
    """Forget the loaded library so the next call re-checks (tests)."""
    global _lib, _tried, _reason
    _lib, _tried, _reason = None, False, ""


# ---------------------------------------------------------------------- checked entry points
def _check_x(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU float32 tensor, got {x.dtype} on {x.device}")
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be (M, {k}), got {tuple(x.shape)}")
    return x.contiguous()


def _check(t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or tuple(t.shape) != shape:
        raise ValueError(
            f"{name} must be a CPU {dtype} tensor of shape {shape}, got {t.dtype} "
            f"{tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"fastvlm kernels are not available: {_reason}")
    return lib


def _bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None:
        _check(bias, "bias", (n,), torch.float32)


def linear_fp32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = x (M, K) @ w (N, K)ᵀ + bias; all fp32 on CPU, w and bias contiguous."""
    lib = _lib_or_raise()
    n, k = w.shape
    _check(w, "w", (n, k), torch.float32)
    x = _check_x(x, k)
    _bias(bias, n)
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        lib.fvk_linear_f32(x.data_ptr(), w.data_ptr(), _ptr(bias), y.data_ptr(), m, n, k,
                           torch.get_num_threads())  # fmt: skip
    return y


def linear_int8(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act_quant: bool = False,
) -> torch.Tensor:
    """y = scales[n] · (x @ qᵀ) + bias: q int8 (N, K), scales and bias fp32 (N,).

    `act_quant=True` is the fast path `Int8Linear` uses: x is quantized per call to int16 in
    blocks of 64 columns (absmax / 32767) and multiplied with integer dot products; the error
    per output is at most scale_n · Σ_blocks d_b/2 · Σ_{k∈b} |q_k| (d_b = the block's
    absmax / 32767), ~1e-5 relative, see gemv.c. When K % 64 != 0 it takes the exact path."""
    lib = _lib_or_raise()
    n, k = q.shape
    _check(q, "q", (n, k), torch.int8)
    _check(scales, "scales", (n,), torch.float32)
    x = _check_x(x, k)
    _bias(bias, n)
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        rc = lib.fvk_linear_i8(x.data_ptr(), q.data_ptr(), scales.data_ptr(), _ptr(bias),
                               y.data_ptr(), m, n, k, torch.get_num_threads(),
                               int(act_quant))  # fmt: skip
        _check_rc(rc, "fvk_linear_i8")
    return y


def int4_zb(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The kernel's per-group offset `zero - 8 * scale` (fp32), so that w = q * scale + zb."""
    return (zeros.float() - 8 * scales.float()).contiguous()


def linear_int4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    zb: torch.Tensor | None = None,
    act_quant: bool = False,
) -> torch.Tensor:
    """Group-wise int4: packed uint8 (N, K/2) (low nibble = even column, values 0..15), scales
    and zeros (N, K/G) with w = (q - 8) · scale + zero. `scales` must be fp32; pass a cached
    `zb=int4_zb(scales, zeros)` to skip rebuilding it (then `zeros` is not read).

    `act_quant=True` is the fast path `Int4Linear` uses: x is quantized per call to int8 in
    blocks of 8 (G ≤ 64), 16 (G = 128) or 32 (G = 256) columns (absmax / 127; the block layout
    is in gemv.c) and multiplied with integer dot products; the error per output is at most
    Σ_k d_b(k)/2 · |q_k · scale_g(k)| (d_b = the block's absmax / 127). When K % 64 != 0 it
    takes the exact fp32 path."""
    lib = _lib_or_raise()
    n, k2 = packed.shape
    k = 2 * k2
    if group_size not in (32, 64, 128, 256) or k % group_size:
        raise ValueError(f"group_size must be 32/64/128/256 and divide K={k}, got {group_size}")
    ng = k // group_size
    _check(packed, "packed", (n, k2), torch.uint8)
    _check(scales, "scales", (n, ng), torch.float32)
    if zb is None:
        if tuple(zeros.shape) != (n, ng):
            raise ValueError(f"zeros must be ({n}, {ng}), got {tuple(zeros.shape)}")
        zb = int4_zb(scales, zeros)
    _check(zb, "zb", (n, ng), torch.float32)
    x = _check_x(x, k)
    _bias(bias, n)
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        rc = lib.fvk_linear_i4(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), zb.data_ptr(),
                               _ptr(bias), y.data_ptr(), m, n, k, group_size,
                               torch.get_num_threads(), int(act_quant))  # fmt: skip
        _check_rc(rc, "fvk_linear_i4")
    return y


# ---------------------------------------------------------------------- module fast paths
# Decode calls these ~170 times per token, so the per-call Python cost matters (ctypes converts
# every argument on each call): modules validate their weights once per storage (keyed
# on data_ptr) and then call the unchecked `_run_*` helpers.
def rows_for_kernel(x: torch.Tensor, k: int, max_m: int | None = MAX_M) -> int:
    """M when x (..., K) can go to the kernels as is — contiguous CPU fp32, 0 < M ≤ max_m (None:
    any M), no autograd, not being traced by torch.compile, kernels on — else 0."""
    if not (x.dtype is torch.float32 and x.is_cpu and x.shape[-1] == k and x.is_contiguous()):
        return 0
    m = x.numel() // k
    if m == 0 or (max_m is not None and m > max_m) or not _enabled:
        return 0
    if torch.is_grad_enabled() and x.requires_grad:
        return 0
    if graph_capture() or (_lib if _tried else _load()) is None:
        return 0
    return m


def _out(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], n), dtype=torch.float32)


def _run_f32(x: torch.Tensor, m: int, wp: int, bp: int | None, n: int, k: int) -> torch.Tensor:
    y = _out(x, n)
    _lib.fvk_linear_f32(x.data_ptr(), wp, bp, y.data_ptr(), m, n, k, torch.get_num_threads())
    return y


def _run_i8(x: torch.Tensor, m: int, qp: int, sp: int, bp: int | None, n: int, k: int,
            act_quant: bool = False):  # fmt: skip
    y = _out(x, n)
    rc = _lib.fvk_linear_i8(x.data_ptr(), qp, sp, bp, y.data_ptr(), m, n, k,
                            torch.get_num_threads(), act_quant)  # fmt: skip
    _check_rc(rc, "fvk_linear_i8")
    return y


def _run_i4(x, m: int, qp: int, sp: int, zp: int, bp: int | None, n: int, k: int, g: int,
            act_quant: bool = False):  # fmt: skip
    y = _out(x, n)
    rc = _lib.fvk_linear_i4(x.data_ptr(), qp, sp, zp, bp, y.data_ptr(), m, n, k, g,
                            torch.get_num_threads(), act_quant)  # fmt: skip
    _check_rc(rc, "fvk_linear_i4")
    return y


def _prefill_rows(x: torch.Tensor, k: int) -> bool:
    """A prefill-shaped CPU call (≥ prefill.MIN_ROWS rows) outside autograd and graph capture."""
    if not x.is_cpu or x.numel() < prefill.MIN_ROWS * k:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad) and not graph_capture()


def _fp32_param(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype is torch.float32 and t.is_cpu and t.is_contiguous())


class FastLinear(nn.Linear):
    """`nn.Linear` that runs `linear_fp32` for small CPU fp32 batches (decode, ≤ MAX_M rows;
    (B, 1, K) inputs are fine) and F.linear otherwise (prefill, autograd, other dtypes/devices).
    State dict, parameters and repr are nn.Linear's."""

    _fvk_key: tuple = ()
    _fvk_ok = False
    prefill_dtype = torch.float32  # bf16: prefill-shaped calls as a bf16 GEMM (fast_cpu.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        grad_w = w.requires_grad and torch.is_grad_enabled()
        if self.prefill_dtype is not torch.float32 and not grad_w and _prefill_rows(x, w.shape[1]):
            return prefill.dense_matmul(x, w, b, self.prefill_dtype)
        m = rows_for_kernel(x, self.in_features)
        if m and not (w.requires_grad and torch.is_grad_enabled()):
            wp, bp = w.data_ptr(), None if b is None else b.data_ptr()
            if self._fvk_key != (wp, bp):  # new storage: validate once
                self._fvk_key, self._fvk_ok = (wp, bp), _fp32_param(w) and _fp32_param(b)
                if self._fvk_ok:
                    assert w.shape == (self.out_features, self.in_features)
            if self._fvk_ok:
                return _run_f32(x, m, wp, bp, self.out_features, self.in_features)
        return F.linear(x, w, b)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FastLinear:
        """A FastLinear sharing `linear`'s Parameter objects (tied weights stay tied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias  # a Parameter or None, registered either way
        new.train(linear.training)
        if "prefill_dtype" in linear.__dict__:
            new.prefill_dtype = linear.prefill_dtype
        return new


def use_fast_linears(model: nn.Module) -> int:
    """Swap the plain nn.Linears under `language_model.layers.*` and `lm_head` for FastLinear
    (same Parameter objects, so weight tying and optimizers are unaffected); returns how many."""
    count = 0
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear:
            continue
        if not (name.startswith("language_model.layers.") or name == "lm_head"):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, FastLinear.from_linear(m))
        count += 1
    return count
