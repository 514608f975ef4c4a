"""Sampling parameters and a batched, host-sync-free sampler.

`sample()` works on (B, V) logits entirely with tensor ops (repetition penalty by gather/scatter,
top-k by kth value, top-p by sorted cumulative mass, multinomial with an optional seeded
generator), so a caller that keeps tokens on the device never waits for the host. Greedy
(`temperature == 0`) is a plain argmax, which the parity tests rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be ≥ 1")
        if self.temperature < 0:
            raise ValueError("temperature must be ≥ 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be ≥ 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """HF semantics: divide positive scores of seen tokens by `penalty`, multiply negative ones."""
    seen = seen.clamp(0, logits.shape[-1] - 1)
    s = logits.gather(-1, seen)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return logits.scatter(-1, seen, s)


def sample(
    logits: torch.Tensor,  # (B, V)
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,  # (B, L) ids for the repetition penalty
    vocab_limit: int | None = None,  # ids ≥ this are padding rows and never sampled
) -> torch.Tensor:
    """Return next tokens (B,) as a device tensor."""
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        if logits.device.type == "cpu" and not logits.requires_grad:
            # numpy's SIMD argmax beats torch's on CPU over a large vocabulary. Same answer: the
            # first maximal index, a NaN counting as maximal.
            return torch.from_numpy(np.argmax(logits.contiguous().numpy(), -1))
        return logits.argmax(-1)
    # Shift by the max and floor the temperature (1e-300 is 0 in float32): a tiny temperature
    # then makes a one-hot softmax instead of inf - inf = nan.
    t = max(params.temperature, 1e-6)
    logits = (logits - logits.amax(-1, keepdim=True)) / t
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass *before* it already reaches top_p (always keep the first)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    if seed is None:
        return None
    dev = torch.device(device)
    g = torch.Generator(device=dev if dev.type in ("cuda", "cpu") else "cpu")
    g.manual_seed(int(seed))
    return g
