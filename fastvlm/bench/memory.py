"""The memory side of the bench: resident set now and at peak, where the weight bytes are (each
storage counted once, so a tied lm_head costs nothing), and a bandwidth probe interleaved with
the timed decode steps.

Why interleave: on a shared VM the memory bandwidth moves by 1.5x between phases of a run, so a
roofline from probes taken seconds before or after the decode can be off by that much. Probing
every few decode steps (probe time excluded from the decode time) samples the bandwidth the
decode actually had; `mbu_interleaved` = decode tok/s x bytes per token / median probe. A probe
evicts the caches, so this is only meaningful for weights far larger than the last-level cache
(every real shape; not the tiny test shape, which decodes from cache otherwise).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from . import rss
from .measure import measure_bandwidth, now


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set in MB; the peak leaves the bench's probe buffers out."""
    return rss.current_mb(), rss.peak_mb()


def weight_mb(model: torch.nn.Module) -> dict[str, float]:
    """MB of parameters + buffers per part of the model; a storage shared by two parts (tied
    lm_head) is counted for the first one only."""
    parts = {
        "vision": getattr(model, "vision_tower", None),
        "projector": getattr(model, "mm_projector", None),
        "embedding": model.language_model.embed_tokens,
        "decoder": model.language_model,
        "lm_head": model.lm_head,
    }
    seen: set[int] = set()
    out: dict[str, float] = {}
    for name, mod in parts.items():
        n = 0
        for t in [*mod.parameters(), *mod.buffers()] if mod is not None else []:
            if t.device.type == "meta" or not t.numel():
                continue
            s = t.untyped_storage()
            if s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            n += s.nbytes()
        out[name] = n / 2**20
    out["total"] = sum(out.values())
    return out


class BandwidthProbe:
    """Read bandwidth of a reduction over `mb` MB (a fresh probe buffer per call, so the decode
    in between runs with the memory it would have without the bench)."""

    def __init__(self, device: torch.device, mb: int = 256) -> None:
        self.device, self.mb = device, mb

    def __call__(self, repeats: int = 2) -> float:
        return measure_bandwidth(self.device, self.mb, repeats)


def interleaved_decode(
    eng, ids: list[int], px, params, probe: BandwidthProbe, bytes_per_token: int, every: int = 8
) -> dict[str, Any]:
    """One request stepped by hand: decode steps timed one by one, a bandwidth probe after every
    `every` steps (not timed); MBU against the median probe of this very decode."""
    dev = probe.device
    h = eng.submit(ids, px, params)
    while not h.output_ids and not h.done:
        eng.step()
    decode_s, tokens, steps, samples = 0.0, 0, 0, [probe()]
    while not h.done:
        n0, t0 = len(h.output_ids), now(dev)
        eng.step()
        decode_s += now(dev) - t0
        tokens += len(h.output_ids) - n0
        steps += 1
        if steps % every == 0:
            samples.append(probe())
    samples.append(probe())
    tps = tokens / decode_s if decode_s > 0 else 0.0
    bw = statistics.median(samples)
    return {
        "decode_tok_s_interleaved": tps,
        "bandwidth_interleaved_gb_s": bw,
        "bandwidth_interleaved_range_gb_s": [min(samples), max(samples)],
        "mbu_interleaved": tps * bytes_per_token / (bw * 1e9) if bw else 0.0,
    }
