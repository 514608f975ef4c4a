"""Streamed quantized loading: a float checkpoint read tensor by tensor straight into int8 /
int4, a few thousand rows at a time, so the full-precision model never exists in memory.

`weights.load_model(folder, quant="int4")` builds the model on the meta device, calls
`plan_streamed` (which Linear weights become which scheme; empty quantized modules swapped in so
the strict key check holds), and for each planned weight calls `StreamPlan.quantize` with a
row reader instead of reading the tensor whole. The rows are quantized exactly as
`quantize_model` would quantize the loaded float layer (both schemes are row-wise), so the two
paths give bit-identical state dicts. A tied `lm_head` becomes its own quantized copy of the
embedding rows (the embedding stays float), as `quantize_model` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .apply import ComponentStats, QuantSummary, _eligible, component_linears, prepare_for_load
from .int4 import pack_nibbles, quantize_int4
from .int8 import quantize_int8
from .scheme import Scheme, parse_spec, spec_to_config

# Rows per chunk: the fp32 copy of one chunk stays under this many bytes.
CHUNK_BYTES = 32 * 2**20
FLOAT_NAMES = ("fp32", "float32", "float", "none", "fp16", "bf16", "bfloat16", "float16")
RowReader = Callable[[int, int], torch.Tensor]  # (first row, end row) -> float rows


def normalize_quant(quant: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """None for "no quantization" (None, "", "fp32", "none", ...), else the spec unchanged."""
    if quant is None or (isinstance(quant, str) and quant.strip().lower() in ("", *FLOAT_NAMES)):
        return None
    return quant


@dataclass
class StreamPlan:
    """Which checkpoint weights are quantized on the fly, and to what."""

    # weight key -> (component, scheme, (N, K), has a bias)
    targets: dict[str, tuple[str, Scheme, tuple[int, int], bool]]
    head_from_embedding: bool  # the tied lm_head is quantized from the embedding rows
    summary: QuantSummary = field(default_factory=QuantSummary)

    def wants(self, key: str) -> bool:
        return key in self.targets

    def quantize(
        self,
        key: str,
        shape: tuple[int, ...],
        read: RowReader,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """The quantized tensors (portable form) of weight `key`, read `read(r0, r1)` rows at a
        time; `dtype` is the float dtype of the scales (the model's load dtype)."""
        comp, scheme, nk, bias = self.targets[key]
        if tuple(shape) != nk:
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(shape)} != model shape {nk} "
                "(config.json does not match the weights)"
            )
        prefix = key[: -len("weight")]
        out = {prefix + k: v.to(device) for k, v in quantize_rows(read, nk, scheme, dtype).items()}
        stats = self.summary.components[comp]
        stats.layers += 1
        tied_head = key == "lm_head.weight" and self.head_from_embedding
        itemsize = torch.empty(0, dtype=dtype).element_size()
        bias_bytes = nk[0] * itemsize if bias else 0  # counted as quantize_model counts it
        stats.bytes_before += 0 if tied_head else nk[0] * nk[1] * itemsize + bias_bytes
        stats.bytes_after += sum(t.numel() * t.element_size() for t in out.values()) + bias_bytes
        return out


def quantize_rows(
    read: RowReader, nk: tuple[int, int], scheme: Scheme, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Quantize an (N, K) weight chunk by chunk: `qweight`, `scales` (and `zeros` for int4)."""
    n, k = nk
    step = max(1, CHUNK_BYTES // (4 * k))
    if scheme.bits == 8:
        q, s = torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=dtype)
        z = None
    else:
        ng = k // scheme.group_size
        q = torch.empty(n, k // 2, dtype=torch.uint8)
        s, z = torch.empty(n, ng, dtype=dtype), torch.empty(n, ng, dtype=dtype)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        w = read(r0, r1).float()
        if scheme.bits == 8:
            q[r0:r1], s[r0:r1] = quantize_int8(w)
        else:
            qq, ss, zz = quantize_int4(w, scheme.group_size, scheme.symmetric)
            q[r0:r1], s[r0:r1], z[r0:r1] = pack_nibbles(qq), ss, zz
        del w
    out = {"qweight": q, "scales": s}
    if z is not None:
        out["zeros"] = z
    return out


def plan_streamed(
    model: nn.Module, spec: str | dict[str, Any], group_size: int | None = None
) -> StreamPlan:
    """On a meta-device float model: decide the swaps of `quantize_model(model, spec)`, record
    them in the config and swap in empty quantized modules (see `prepare_for_load`)."""
    cfg = model.config
    if cfg.quantization:
        raise ConfigError(
            "this checkpoint is already quantized; quant= applies to float checkpoints only"
        )
    schemes = parse_spec(spec, group_size)
    if not any(s.bits for s in schemes.values()):
        raise ConfigError(f"quantization spec {spec!r} quantizes nothing")
    targets: dict[str, tuple[str, Scheme, tuple[int, int], bool]] = {}
    summary = QuantSummary({c: ComponentStats(str(s)) for c, s in schemes.items() if s.bits})
    for comp, scheme in schemes.items():
        if not scheme.bits:
            continue
        for name, lin in component_linears(model, comp):
            if not _eligible(lin, scheme):
                summary.skipped.append(name)
                continue
            nk = (lin.out_features, lin.in_features)
            targets[name + ".weight"] = (comp, scheme, nk, lin.bias is not None)
    head = "lm_head.weight" in targets and cfg.text.tie_word_embeddings
    if head:  # lm_head becomes its own module: the config says so, as quantize_model's does
        cfg.text.tie_word_embeddings = False
        summary.untied_lm_head = True
    cfg.quantization = spec_to_config(schemes)
    prepare_for_load(model, cfg.quantization)
    return StreamPlan(targets, head, summary)
