"""Fused CPU decode: every Qwen2 decoder layer of one decode step in a single C call.

Why: with the projections at memory bandwidth (gemv.c), what is left of a CPU decode step is the
framework work between them — RMSNorm, RoPE, the KV-cache write, SDPA, SiLU, residual adds:
~40 torch ops per layer, a large share of a decode token once the projections are fast
(docs/kernels.md). `fvk_decode` (gemv.c) runs the whole layer stack over the engine's
static cache in C: the same math, the same GEMV kernels per projection (fp32 / int8 / int4 with
their `act_quant` setting), one ctypes call per step instead of ~1,000 torch ops.

Design decisions:
* **A plan, not a module swap.** `DecodePlan.build(lm, cache)` reads pointers out of the model
  as it is (FastLinear / nn.Linear fp32, Int8Linear, Int4Linear in their kernel layouts, RMSNorm
  weights, the cache tensors) into ctypes structs. The model keeps its modules and state dict;
  the torch path stays the oracle (tests compare the two).
* **Re-validated when the work changes.** The plan's key holds the identity, data_ptr and
  version counter of every weight tensor it points into, each module's identity, the quantized
  layers' `act_quant` and the cache tensors' identity, read through the registries' dicts; the
  Engine checks it (`DecodePlan.current`) whenever it admits a request (the check is slow with
  the caches cold after a decode step, so not every step). A weight update in place, a
  re-quantization or a new cache therefore rebuilds it for the next request; requests already
  in flight keep the plan they started with (its tensors are held, so no pointer dangles). A
  layer the plan cannot take (another dtype, device, layer type) makes it None and the engine
  keeps the torch path. No autograd: the engine calls it under `torch.inference_mode()`, and
  `__call__` refuses to run with grad enabled.
* **Same semantics as the engine's torch decode**: row m writes its K/V at `positions[m]` and
  attends cache positions 0..limits[m] (the engine's key mask); RoPE cos/sin come from the
  model's own `rope_cos_sin`, so the angles are bit-identical (`step` looks them up in tables of
  every cache position built once with it: the same elementwise values). Sums run in a
  different order than torch's (fp32 rounding level; the engine tests assert greedy token
  identity).
* **`step(tokens, ...)`** is what the Engine calls: embedding rows, the layers and the final
  RMSNorm in the one C call; the caller only runs the LM head and sampling. `__call__` runs the
  layers alone on given embeddings (tests compare it layer for layer with the torch path).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..model.qwen2 import rope_cos_sin
from . import FastLinear, _check_rc, _fp32_param, _lib_or_raise, available

_c_i32, _c_i64, _p = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
_PROJ = ("q", "k", "v", "o", "gate", "up", "down")


class _Lin(ctypes.Structure):
    _fields_ = [
        ("kind", _c_i32), ("act_q", _c_i32), ("n", _c_i64), ("k", _c_i64), ("g", _c_i64),
        ("w", _p), ("scales", _p), ("zb", _p), ("bias", _p),
    ]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [*((name, _Lin) for name in _PROJ), ("ln1", _p), ("ln2", _p), ("kc", _p), ("vc", _p)]


def _projections(layer: nn.Module) -> tuple[nn.Module, ...]:
    at, mlp = layer.self_attn, layer.mlp
    return (at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def _describe(mod: nn.Module) -> tuple[_Lin, tuple] | None:
    """The kernel arguments of one projection (and tensors to keep alive), or None."""
    from ..quant import Int4Linear, Int8Linear  # quant imports kernels: import late

    lin = _Lin()
    lin.n, lin.k = mod.out_features, mod.in_features
    if type(mod) in (nn.Linear, FastLinear):
        w, b = mod.weight, mod.bias
        if not (_fp32_param(w) and _fp32_param(b)) or w.shape != (lin.n, lin.k):
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


class _Storage:
    """A list of tensors watched by identity and storage only (no version counter)."""

    __slots__ = ("items",)

    def __init__(self, items: list) -> None:
        self.items = items

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.items[i]


class _ActQuant:
    """`[0]` reads a quantized layer's `act_quant` (an instance or class attribute)."""

    __slots__ = ("m",)

    def __init__(self, m: nn.Module) -> None:
        self.m = m

    def __getitem__(self, _: int) -> bool:
        return self.m.act_quant


class DecodePlan:
    """The C description of a decoder stack + cache; call it on one decode step's rows."""

    def __init__(self, lm: nn.Module, cache, layers, keep: list, dims: tuple, eps: float) -> None:
        self.layers, self._keep, self.dims, self.eps = layers, keep, dims, eps
        cfg, hd = lm.config, dims[3]
        self._emb, self._fnorm = lm.embed_tokens.weight, lm.norm.weight  # for step()
        # RoPE cos / sin of every cache position, from the model's own function (the same
        # elementwise fp32 formula as per-step tables), looked up by position in C by step().
        cos, sin = rope_cos_sin(
            torch.arange(cache.max_len)[None], hd, cfg.rope_theta, torch.float32
        )
        self._rope = (cos.reshape(-1, hd).contiguous(), sin.reshape(-1, hd).contiguous())
        self.n_layers, self.slots = len(layers), cache.k[0].shape[0]
        self._scratch = torch.empty(0)
        self._owner = (id(lm), id(cache))
        self._watch_list = self._watch(lm, cache)
        self.key = self._key(self._watch_list)

    @staticmethod
    def _watch(lm: nn.Module, cache) -> list[tuple[object, object]]:
        """Every (container, key) the plan's pointers come from: the module registries down to
        each projection and norm, their parameter / buffer dicts, the cache's tensor lists.
        Dict lookups, not module attribute access (nn.Module.__getattr__ is slow per lookup)."""
        watch: list[tuple[object, object]] = [(lm._modules, "layers")]
        for k in ("embed_tokens", "norm"):  # the token rows and the final norm (step())
            watch += [(lm._modules, k), (lm._modules[k]._parameters, "weight")]
        for i, layer in enumerate(lm.layers):
            watch.append((lm.layers._modules, str(i)))
            mods = layer._modules
            watch += [(mods, k) for k in ("self_attn", "mlp", "input_layernorm",
                                          "post_attention_layernorm")]  # fmt: skip
            attn = (mods["self_attn"], ("q_proj", "k_proj", "v_proj", "o_proj"))
            for parent, names in (attn, (mods["mlp"], ("gate_proj", "up_proj", "down_proj"))):
                for n in names:
                    watch.append((parent._modules, n))
                    m = parent._modules[n]
                    watch += [(m._parameters, k) for k in m._parameters]
                    watch += [(m._buffers, k) for k in m._buffers]
                    if hasattr(m, "act_quant"):  # instance or class attribute: read it
                        watch.append((_ActQuant(m), 0))
            for k in ("input_layernorm", "post_attention_layernorm"):
                watch.append((mods[k]._parameters, "weight"))
        # the cache: identity and storage only (its contents change every step by design)
        watch += [(_Storage(lst), i) for lst in (cache.k, cache.v) for i in range(len(lst))]
        return watch

    @staticmethod
    def _key(watch: list[tuple[object, object]]) -> list[int]:
        """A flat list of ints: per tensor (id, data_ptr, version), per other object its id (a
        bool as itself); per cache tensor (id, data_ptr)."""
        out: list[int] = []
        for c, k in watch:
            v = c[k]  # dicts, _Storage, _ActQuant
            if isinstance(c, _Storage):
                out += (id(v), v.data_ptr())
            elif isinstance(v, torch.Tensor):
                out += (id(v), v.data_ptr(), v._version)
            else:
                out.append(int(v) if type(v) is bool else id(v))
        return out

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
        if not all(_fp32_param(t) for t in (*cache.k, *cache.v)):
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
            if any(not _fp32_param(n.weight) or n.eps != cfg.rms_norm_eps for n in norms):
                return None
            layers[i].ln1, layers[i].ln2 = (n.weight.data_ptr() for n in norms)
            layers[i].kc, layers[i].vc = kc.data_ptr(), vc.data_ptr()
            keep.append((norms[0].weight, norms[1].weight, kc, vc))
        at0 = lm.layers[0].self_attn
        if (at0.q_proj.out_features, at0.k_proj.out_features) != (heads * hd, kvh * hd):
            return None
        emb, fnorm = lm.embed_tokens.weight, lm.norm.weight
        if not (_fp32_param(emb) and _fp32_param(fnorm)) or emb.shape[1] != cfg.hidden_size:
            return None
        if lm.norm.eps != cfg.rms_norm_eps:
            return None
        dims = (cfg.hidden_size, heads, kvh, hd, cfg.intermediate_size, cache.max_len)
        return cls(lm, cache, layers, keep, dims, cfg.rms_norm_eps)

    @classmethod
    def current(cls, plan: DecodePlan | None, lm: nn.Module, cache) -> DecodePlan | None:
        """`plan` if it still describes `lm` and `cache` exactly, else a fresh one (or None)."""
        if (
            plan is not None
            and plan._owner == (id(lm), id(cache))
            and plan.key == plan._key(plan._watch_list)
        ):
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
        """The decoder layers over x (no final norm): the layer stack as the torch path runs it."""
        m, hd = x.shape[0], self.dims[3]
        for t in (cos, sin):
            if tuple(t.shape) != (m, hd) or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"expected a contiguous torch.float32 tensor of shape {(m, hd)}")
        return self._run(x, lo, positions, limits, cos, sin)

    def step(
        self, tokens: torch.Tensor, lo: int, positions: torch.Tensor, limits: torch.Tensor
    ) -> torch.Tensor:
        """One decode step from token ids (M,) int64 to the final-normed hidden states (M, H):
        embedding lookup, every layer, the final RMSNorm, with RoPE from the plan's per-position
        tables, all in the one C call (as torch ops each pays dispatch with the caches cold after
        the weights streamed through)."""
        m = tokens.shape[0]
        if tuple(tokens.shape) != (m,) or tokens.dtype != torch.int64 or not tokens.is_contiguous():
            raise ValueError(f"tokens must be a contiguous int64 tensor of shape ({m},)")
        x = torch.empty(m, self.dims[0], dtype=torch.float32)
        cos, sin = self._rope
        return self._run(x, lo, positions, limits, cos, sin, tokens)

    def _run(self, x, lo, positions, limits, cos, sin, tokens=None):
        """The C call. With `tokens` (step): x is filled from the embedding, cos / sin are the
        per-position tables and the final norm is applied; without, x and per-row cos / sin are
        given and the layers alone run."""
        if torch.is_grad_enabled():
            raise RuntimeError("DecodePlan is inference-only: call it under torch.no_grad()")
        lib = _lib_or_raise()
        h, heads, kvh, hd, inter, max_len = self.dims
        m = x.shape[0]
        if not 0 <= lo <= lo + m <= self.slots:
            raise ValueError(f"rows {lo}..{lo + m - 1} are not cache slots (0..{self.slots - 1})")
        if x.shape != (m, h) or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"x must be a contiguous float32 ({m}, {h}) tensor")
        i64 = torch.int64
        for t in (positions, limits):
            if tuple(t.shape) != (m,) or t.dtype != i64 or not t.is_contiguous():
                raise ValueError(f"expected a contiguous {i64} tensor of shape {(m,)}")
        need = lib.fvk_decode_scratch(m, h, heads, kvh, hd, inter, max_len)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32)
        emb, step = self._emb, tokens is not None
        rc = lib.fvk_decode(
            self.n_layers, ctypes.addressof(self.layers), x.data_ptr(), m, h, heads, kvh, hd,
            inter, max_len, lo, positions.data_ptr(), limits.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), int(step), tokens.data_ptr() if step else None, emb.data_ptr(),
            emb.shape[0], self._fnorm.data_ptr() if step else None, self.eps,
            self._scratch.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        _check_rc(rc, "fvk_decode")
        return x
