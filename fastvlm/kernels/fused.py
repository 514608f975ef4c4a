"""Fused CPU decode: every Qwen2 decoder layer of one decode step in a single C call.

Why: with the projections at memory bandwidth (gemv.c), what is left of a CPU decode step is the
framework work between them — RMSNorm, RoPE, the KV-cache write, SDPA, SiLU, residual adds:
~40 torch ops per layer, ~10 ms per token on the 0.5B shape (a quarter of the fp32 token, half
of the int8 / int4 one). `fvk_decode` (gemv.c) runs the whole layer stack over the engine's
static cache in C: the same math, the same GEMV kernels per projection (fp32 / int8 / int4 with
their `act_quant` setting), one ctypes call per step instead of ~1,000 torch ops.

Design decisions:
* **A plan, not a module swap.** `DecodePlan.build(lm, cache)` reads pointers out of the model
  as it is (FastLinear / nn.Linear fp32, Int8Linear, Int4Linear in their kernel layouts, RMSNorm
  weights, the cache tensors) into ctypes structs. The model keeps its modules and state dict;
  the torch path stays the oracle (tests compare the two).
* **Re-validated every step, cheaply.** The plan's key holds every source tensor's data_ptr and
  version counter and each module's identity, so a weight update in place, a re-quantization or
  a new cache rebuilds it (`DecodePlan.current`); a layer the plan cannot take (another dtype,
  device, layer type) makes it None and the engine keeps the torch path. No autograd: the engine
  calls it under `torch.inference_mode()`, and `__call__` refuses to run with grad enabled.
* **Same semantics as the engine's torch decode**: row m writes its K/V at `positions[m]` and
  attends cache positions 0..limits[m] (the engine's key mask); RoPE cos/sin come from the
  model's own `rope_cos_sin`, so the angles are bit-identical. Sums run in a different order
  than torch's (fp32 rounding level; the engine tests assert greedy token identity).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import FastLinear, _check_rc, _lib_or_raise, available

_c_i32, _c_i64, _p = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
_PROJ = ("q", "k", "v", "o", "gate", "up", "down")


class _Lin(ctypes.Structure):
    _fields_ = [
        ("kind", _c_i32), ("act_q", _c_i32), ("n", _c_i64), ("k", _c_i64), ("g", _c_i64),
        ("w", _p), ("scales", _p), ("zb", _p), ("bias", _p),
    ]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [*((name, _Lin) for name in _PROJ), ("ln1", _p), ("ln2", _p), ("kc", _p), ("vc", _p)]


def _fp32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype is torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    at, mlp = layer.self_attn, layer.mlp
    return (at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def _sources(mod: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """The tensors a projection's kernel arguments come from (the plan's validity key)."""
    if type(mod) in (nn.Linear, FastLinear):
        return mod.weight, mod.bias
    plan_tensors = getattr(mod, "_plan_tensors", None)
    return tuple(plan_tensors()) if plan_tensors is not None else (None,)


def _describe(mod: nn.Module) -> tuple[_Lin, tuple] | None:
    """The kernel arguments of one projection (and tensors to keep alive), or None."""
    from ..quant import Int4Linear, Int8Linear  # quant imports kernels: import late

    lin = _Lin()
    lin.n, lin.k = mod.out_features, mod.in_features
    if type(mod) in (nn.Linear, FastLinear):
        w, b = mod.weight, mod.bias
        if not (_fp32(w) and _fp32(b)) or w.shape != (lin.n, lin.k):
            return None
        lin.kind, lin.w, lin.bias = 0, w.data_ptr(), None if b is None else b.data_ptr()
        return lin, (w, b)
    if type(mod) in (Int8Linear, Int4Linear):
        plan = mod._plan()
        if plan is None:
            return None
        cached = mod.__dict__["_plan_cache"]  # (key, (ptrs, tensors), sources): keep alive
        lin.act_q = int(bool(mod.act_quant))
        if type(mod) is Int8Linear:
            lin.kind, (lin.w, lin.scales, lin.bias) = 1, plan
        else:
            lin.kind, lin.g = 2, mod.group_size
            lin.w, lin.scales, lin.zb, lin.bias = plan
        return lin, cached
    return None


class DecodePlan:
    """The C description of a decoder stack + cache; call it on one decode step's rows."""

    def __init__(self, key: tuple, layers, keep: list, dims: tuple, eps: float) -> None:
        self.key, self.layers, self._keep, self.dims, self.eps = key, layers, keep, dims, eps
        self._scratch = torch.empty(0)
        self.n_layers = len(layers)
        self.slots = 0

    @staticmethod
    def _key(lm: nn.Module, cache) -> tuple:
        parts: list = []
        for layer, kc, vc in zip(lm.layers, cache.k, cache.v, strict=True):
            for m in _projections(layer):
                parts.append(id(m))
                parts.extend(None if t is None else (t.data_ptr(), t._version) for t in _sources(m))
            for n in (layer.input_layernorm, layer.post_attention_layernorm):
                parts += (id(n), n.weight.data_ptr(), n.weight._version)
            parts += (kc.data_ptr(), vc.data_ptr())
        return tuple(parts)

    @classmethod
    def build(cls, lm: nn.Module, cache) -> DecodePlan | None:
        """A plan for `lm` (a `Qwen2Model`) over `cache` (a `SlotKVCache`), or None when some
        part cannot run in C (then callers keep the torch path)."""
        if not available():
            return None
        cfg = lm.config
        heads, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if heads % kvh or cfg.hidden_act != "silu" or len(cache.k) != len(lm.layers):
            return None
        if any(not (t.dtype is torch.float32 and t.device.type == "cpu" and t.is_contiguous())
               for t in (*cache.k, *cache.v)):  # fmt: skip
            return None
        layers = (_Layer * len(lm.layers))()
        keep: list = []
        for i, (layer, kc, vc) in enumerate(zip(lm.layers, cache.k, cache.v, strict=True)):
            for name, mod in zip(_PROJ, _projections(layer), strict=True):
                d = _describe(mod)
                if d is None:
                    return None
                setattr(layers[i], name, d[0])
                keep.append(d[1])
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(not _fp32(n.weight) or n.eps != cfg.rms_norm_eps for n in norms):
                return None
            layers[i].ln1, layers[i].ln2 = (n.weight.data_ptr() for n in norms)
            layers[i].kc, layers[i].vc = kc.data_ptr(), vc.data_ptr()
            keep.append((norms[0].weight, norms[1].weight, kc, vc))
        at0 = lm.layers[0].self_attn
        if (at0.q_proj.out_features, at0.k_proj.out_features) != (heads * hd, kvh * hd):
            return None
        dims = (cfg.hidden_size, heads, kvh, hd, cfg.intermediate_size, cache.max_len)
        plan = cls(cls._key(lm, cache), layers, keep, dims, cfg.rms_norm_eps)
        plan.slots = cache.k[0].shape[0]
        return plan

    @classmethod
    def current(cls, plan: DecodePlan | None, lm: nn.Module, cache) -> DecodePlan | None:
        """`plan` if it still describes `lm` and `cache` exactly, else a fresh one (or None)."""
        if plan is not None and plan.key == cls._key(lm, cache):
            return plan
        return cls.build(lm, cache)

    def __call__(
        self,
        x: torch.Tensor,  # (M, H) fp32, the embeddings of the rows' tokens; updated in place
        lo: int,  # the first row's cache slot (rows are slots lo .. lo + M - 1)
        positions: torch.Tensor,  # (M,) int64: where each row's new K/V goes
        limits: torch.Tensor,  # (M,) int64: each row attends cache positions 0..limit
        cos: torch.Tensor,  # (M, head_dim) fp32 RoPE tables for `positions`
        sin: torch.Tensor,
    ) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("DecodePlan is inference-only: call it under torch.no_grad()")
        lib = _lib_or_raise()
        h, heads, kvh, hd, inter, max_len = self.dims
        m = x.shape[0]
        if not 0 <= lo <= lo + m <= self.slots:
            raise ValueError(f"rows {lo}..{lo + m - 1} are not cache slots (0..{self.slots - 1})")
        if x.shape != (m, h) or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"x must be a contiguous float32 ({m}, {h}) tensor")
        i64, f32 = torch.int64, torch.float32
        checks = (
            (positions, (m,), i64),
            (limits, (m,), i64),
            (cos, (m, hd), f32),
            (sin, (m, hd), f32),
        )
        for t, shape, dt in checks:
            if tuple(t.shape) != shape or t.dtype != dt or not t.is_contiguous():
                raise ValueError(f"expected a contiguous {dt} tensor of shape {shape}")
        need = lib.fvk_decode_scratch(m, h, heads, kvh, hd, inter, max_len)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32)
        rc = lib.fvk_decode(
            self.n_layers, ctypes.addressof(self.layers), x.data_ptr(), m, h, heads, kvh, hd,
            inter, max_len, lo, positions.data_ptr(), limits.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), self.eps, self._scratch.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        _check_rc(rc, "fvk_decode")
        return x
