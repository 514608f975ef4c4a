"""Reference generation: slow, obviously correct, and the oracle for every fast path.

Three levels (as mlx-lm):
* `generate_step`   — ids in, token ids out (prefill once into a static KV cache, then one token
                      per step); the host reads each token because it yields it.
* `stream_generate` — adds incremental detokenization, stop strings, EOS, finish reason and
                      timing stats; yields `Chunk`s of text deltas. The text side is
                      `text_chunks`, which the engine's `stream_text` reuses.
* `generate`        — the whole string (used by `FastVLM.describe` / `chat`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..tokenization import IncrementalDetokenizer
from .kv_cache import KVCache
from .sampling import SamplingParams, make_generator, sample


@dataclass(slots=True)
class Stats:
    prompt_tokens: int = 0
    image_tokens: int = 0
    generation_tokens: int = 0
    vision_s: float = 0.0
    prefill_s: float = 0.0  # from submit to first token: queueing + vision encoder + prefill
    decode_s: float = 0.0
    preprocess_s: float = 0.0  # before submit (API): image loading/decoding, pixels, tokens

    @property
    def ttft_s(self) -> float:
        """Time to first token from the call: preprocessing + vision + prefill."""
        return self.preprocess_s + self.prefill_s

    @property
    def decode_tps(self) -> float:
        n = self.generation_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass(slots=True)
class Chunk:
    text: str
    token_id: int | None = None
    finish_reason: str | None = None  # "stop" | "length" once finished
    stats: Stats = field(default_factory=Stats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """Refuse a request whose prompt + max_tokens cannot fit the model's context."""
    if prompt_tokens + max_tokens > context:
        raise ValueError(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"context of {context} tokens"
        )


@torch.inference_mode()
def generate_step(
    model,
    input_ids: list[int] | torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    *,
    image_embeds: torch.Tensor | None = None,
    eos_ids: Iterable[int] = (),
    vocab_limit: int | None = None,
    stats: Stats | None = None,
    tokens_per_image: int | None = None,
) -> Iterator[int]:
    """Yield generated token ids (EOS included, then stop). Batch size 1. `tokens_per_image`
    pools each image's features to that many tokens (see `FastVLMModel.embed_images`)."""
    params = params or SamplingParams()
    params.validate()
    stats = stats if stats is not None else Stats()
    device = model.lm_head.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    t = ids.shape[1]
    check_context(t, params.max_tokens, model.config.text.max_position_embeddings)
    eos = set() if params.ignore_eos else set(eos_ids)
    gen = make_generator(params.seed, device)
    cache = KVCache.for_model(model, 1, t + params.max_tokens)
    t0 = time.perf_counter()
    if image_embeds is None and pixel_values is not None:
        px = pixel_values.to(device)
        pool = tokens_per_image not in (None, model.config.num_image_tokens)
        image_embeds = model.embed_images(px, tokens_per_image) if pool else model.embed_images(px)
        _sync(device)
        stats.vision_s = time.perf_counter() - t0
    stats.prompt_tokens = t
    stats.image_tokens = int((ids == model.config.image_token_id).sum())
    positions = torch.arange(t, device=device)[None]
    logits = model(ids, image_embeds=image_embeds, positions=positions, cache=cache, last_only=True)

    def step(tok: torch.Tensor, i: int) -> torch.Tensor:
        pos = torch.full((1, 1), t + i, device=device)
        return model(tok.view(1, 1), positions=pos, cache=cache, last_only=True)[:, -1]

    yield from decode_loop(
        logits[:, -1], step, ids, params, gen, eos, vocab_limit, model.config.image_token_id,
        stats, t0,
    )  # fmt: skip


def decode_loop(
    logits: torch.Tensor,  # (1, V) after prefill
    step: Callable[[torch.Tensor, int], torch.Tensor],  # (token (1,), i) -> next (1, V) logits
    seen: torch.Tensor,  # (1, T) prompt ids, for the repetition penalty
    params: SamplingParams,
    gen: torch.Generator | None,
    eos: Container[int],
    vocab_limit: int | None,
    image_id: int,
    stats: Stats,
    t0: float,
) -> Iterator[int]:
    """The sampling loop of every batch-1 backend (torch reference, ONNX Runtime): mask the image
    placeholder, sample, time, yield, stop at EOS or `max_tokens`, feed the token back."""
    for i in range(params.max_tokens):
        if image_id < logits.shape[-1]:  # a sampled placeholder would demand an image next step
            logits[..., image_id] = float("-inf")
        tok = sample(
            logits,
            params,
            gen,
            seen if params.repetition_penalty != 1 else None,
            vocab_limit,
        )
        token = int(tok)  # the one host sync per step: we yield it
        if i == 0:
            stats.prefill_s = time.perf_counter() - t0
            t1 = time.perf_counter()
        stats.generation_tokens = i + 1
        stats.decode_s = time.perf_counter() - t1
        yield token
        if token in eos or i == params.max_tokens - 1:
            return
        if params.repetition_penalty != 1:
            seen = torch.cat([seen, tok.view(1, 1)], dim=1)
        logits = step(tok, i)


def text_chunks(
    tokens: Iterable[int],
    tokenizer,
    stop: Sequence[str],
    eos: Container[int],
    stats: Stats,
    end_reason: Callable[[], str] = lambda: "length",
) -> Iterator[Chunk]:
    """Token ids → text-delta `Chunk`s: incremental detokenization, EOS and stop strings.

    Shared by `stream_generate` and the engine's `stream_text`. Text that could still be the start
    of a stop string is held back; the last chunk carries the finish reason ("stop" on EOS or a
    stop string, else `end_reason()` once `tokens` runs out) and `stats`.
    """
    detok = IncrementalDetokenizer(tokenizer)
    stops = [s for s in stop if s]
    hold = max((len(s) for s in stops), default=1) - 1
    text, emitted, finish, hit_stop = "", 0, None, False
    for token in tokens:
        if token in eos:
            finish = "stop"
            break
        text += detok.add(token)
        if stops:
            cut = min(
                (i for i in (text.find(s, max(0, emitted - hold)) for s in stops) if i >= 0),
                default=-1,
            )
            if cut >= 0:
                if cut > emitted:
                    yield Chunk(text[emitted:cut], token, stats=stats)
                text, emitted, finish, hit_stop = text[:cut], cut, "stop", True
                break
            safe = max(emitted, len(text) - hold)
        else:
            safe = len(text)
        if safe > emitted:
            yield Chunk(text[emitted:safe], token, stats=stats)
            emitted = safe
    if finish is None:
        finish = end_reason()
    if not hit_stop:
        text += detok.flush()
        cut = min(
            (i for i in (text.find(s, max(0, emitted - hold)) for s in stops) if i >= 0), default=-1
        )
        if cut >= 0:
            text, finish = text[:cut], "stop"
    yield Chunk(text[emitted:], None, finish, stats)


def stream_generate(
    model,
    tokenizer,
    input_ids: list[int],
    pixel_values: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    *,
    image_embeds: torch.Tensor | None = None,
    eos_ids: Iterable[int] = (),
    vocab_limit: int | None = None,
    step_fn=None,
    tokens_per_image: int | None = None,
) -> Iterator[Chunk]:
    """Text deltas with stop-string handling; the last chunk carries `finish_reason` and stats."""
    params = params or SamplingParams()
    params.validate()
    stats = Stats()
    step = step_fn or generate_step
    eos = set(eos_ids)
    pool = {} if tokens_per_image is None else {"tokens_per_image": tokens_per_image}
    tokens = step(
        model,
        input_ids,
        pixel_values,
        params,
        image_embeds=image_embeds,
        eos_ids=eos,
        vocab_limit=vocab_limit,
        stats=stats,
        **pool,
    )
    yield from text_chunks(
        tokens, tokenizer, params.stop, set() if params.ignore_eos else eos, stats
    )


def generate(*args, **kwargs) -> tuple[str, Chunk]:
    """Full text and the final chunk (finish reason + stats)."""
    parts, last = [], None
    for last in stream_generate(*args, **kwargs):
        parts.append(last.text)
    return "".join(parts), last
