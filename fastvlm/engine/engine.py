"""Engine: one model, many requests — continuous batching over a static, slotted KV cache.

`step()` is `scheduler` (admission, slots, prefix matching; scheduler.py) → `runner` (prefill,
batched decode, sampling; runner.py) → bookkeeping, with one host read of the sampled ids per
step. Per-request engine state is a `Sequence` (sequence.py); the client holds a
`RequestHandle` (request.py), which the engine only reports to.

* The engine owns the model. `submit` only validates, hashes images and enqueues (thread-safe);
  the model runs inside `step()` under a lock, driven by a background thread (`start()`), by
  `run_until_done()`, or by whoever iterates a handle.
* Stop strings live above the engine (request.py: `stream_text`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, replace

import torch

from ..kernels import available as kernels_available
from ..kernels import use_fast_linears
from ..model.fastvlm import check_tokens_per_image
from .kv_cache import SlotKVCache
from .request import RequestHandle
from .runner import ModelRunner, VisionCache, content_hash, decode_runner
from .sampling import SamplingParams
from .scheduler import Admission, Scheduler
from .sequence import Sequence, token_keys

__all__ = ["Engine", "EngineConfig"]

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    slots: int = 8
    max_len: int | None = None  # None: the model's context, at most 4096
    eos_ids: list[int] | set[int] | tuple[int, ...] | None = None  # None: the model config's
    vocab_limit: int | None = None  # sample only ids below this (the tokenizer's vocabulary)
    vision_cache_size: int = 32  # images whose embeddings are kept
    prefix_reuse: bool = True  # parked slots' KV reused by prompts sharing a prefix
    compile: bool = False  # torch.compile the decode forward
    span_bucket: int = 64  # decode key span rounded up to this (fewer shapes)
    cpu_kernels: bool = True  # fastvlm/kernels GEMVs for the CPU decoder's Linears
    cuda_graphs: bool | None = None  # None: on for CUDA
    fused_decode: bool = True  # CPU decode steps as one C call when the model allows it


class Engine:
    """Continuous-batching engine over one model (see the module docstring).

    eng = Engine(model, slots=8)           # or Engine(model, EngineConfig(slots=8))
    h = eng.submit(ids, pixel_values, SamplingParams(max_tokens=64))
    for tok in h: ...  # drives the engine itself unless `start()` was called
    """

    def __init__(self, model, config: EngineConfig | None = None, **options) -> None:
        if config is not None and options:
            raise TypeError("pass an EngineConfig or keyword options, not both")
        cfg = config or EngineConfig(**options)
        ctx = model.config.text.max_position_embeddings
        max_len = min(ctx, 4096) if cfg.max_len is None else cfg.max_len
        if not 1 <= max_len <= ctx:
            raise ValueError(f"max_len must be in [1, {ctx}] (the model's context), got {max_len}")
        if cfg.slots < 1:
            raise ValueError("slots must be ≥ 1")
        eos = cfg.eos_ids
        if eos is None:
            e = model.config.text.eos_token_id
            eos = e if isinstance(e, list) else [] if e is None else [e]
        self.config = cfg
        self.model = model
        self.slots, self.max_len = cfg.slots, max_len
        self.device = model.lm_head.weight.device
        self.eos_ids = set(eos)
        self.vocab_limit = cfg.vocab_limit
        self.prefix_reuse = cfg.prefix_reuse
        self.span_bucket = cfg.span_bucket
        self.image_token_id = model.config.image_token_id
        self.fast_linears = 0
        cpu_fast = cfg.cpu_kernels and self.device.type == "cpu" and not cfg.compile
        if cpu_fast and kernels_available():
            # decode GEMVs at memory bandwidth: swaps the decoder's fp32 Linears in place
            self.fast_linears = use_fast_linears(model)
        self.fused_decode = bool(cfg.fused_decode and cpu_fast)
        self.cache = SlotKVCache.for_model(model, cfg.slots, max_len)
        self.counters = dict.fromkeys(
            ("steps", "prefill_tokens", "cached_tokens", "vision_calls", "decode_rows", "holes"), 0
        )
        self.scheduler = Scheduler(cfg.slots, max_len, cfg.prefix_reuse)
        decoder = decode_runner(
            model, self.cache, self.device, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
            fused=self.fused_decode,
        )  # fmt: skip
        self.runner = ModelRunner(
            model, self.cache, decoder, vision_cache_size=cfg.vision_cache_size,
            span_bucket=cfg.span_bucket, vocab_limit=cfg.vocab_limit, counters=self.counters,
        )  # fmt: skip
        self._ids = itertools.count()
        self._live: dict[int, Sequence] = {}  # submitted, not finished: for `cancel(id)`
        self._step_lock = threading.Lock()  # one step (one model call sequence) at a time
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def from_vlm(cls, vlm, config: EngineConfig | None = None, **options) -> Engine:
        """An engine for a loaded `fastvlm.FastVLM` (its EOS ids and vocabulary limit)."""
        if config is None:
            options.setdefault("eos_ids", vlm.eos_ids)
            options.setdefault("vocab_limit", vlm.vocab_limit)
        else:
            config = replace(
                config,
                eos_ids=vlm.eos_ids if config.eos_ids is None else config.eos_ids,
                vocab_limit=vlm.vocab_limit if config.vocab_limit is None else config.vocab_limit,
            )
        return cls(vlm.model, config, **options)

    # ------------------------------------------------------------------ read-only views
    @property
    def vision_cache(self) -> VisionCache:
        return self.runner.vision_cache

    @property
    def graphs(self):
        """The `GraphedDecode` when decode steps replay CUDA graphs, else None."""
        return self.runner.decoder.graphs

    @property
    def _plan(self):
        """The fused CPU decode plan in use (None: torch path); read by bench and tests."""
        return self.runner.decoder.plan

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ public API
    def submit(
        self,
        input_ids: list[int] | torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        params: SamplingParams | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        tokens_per_image: int | None = None,
    ) -> RequestHandle:
        """Queue a request (thread-safe). Images as `pixel_values` (N, 3, S, S) — encoded once per
        distinct image thanks to the vision cache — or precomputed `image_embeds` (N, tokens, D).
        `tokens_per_image` pools each image's features to that many tokens (token reduction)."""
        params = params or SamplingParams()
        params.validate()
        ids = [int(i) for i in torch.as_tensor(input_ids).reshape(-1).tolist()]
        if not ids:
            raise ValueError("input_ids is empty")
        if len(ids) + params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"engine's max_len of {self.max_len} tokens"
            )
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("pass pixel_values or image_embeds, not both")
        hashes: list[str] = []
        tpi, px, em = 0, None, None
        if pixel_values is not None:
            px = pixel_values if pixel_values.ndim == 4 else pixel_values[None]
            native = self.model.config.num_image_tokens
            tpi = check_tokens_per_image(tokens_per_image, native)
            pool = "" if tpi == native else f"@{tpi}"  # pooled embeds: own cache key
            hashes = [content_hash(p) + pool for p in px]
        elif image_embeds is not None:
            em = image_embeds if image_embeds.ndim == 3 else image_embeds[None]
            tpi = em.shape[1]
            hashes = ["embeds:" + content_hash(e) for e in em]
        n_ph = ids.count(self.image_token_id)
        if n_ph != len(hashes) * tpi:
            raise ValueError(
                f"{n_ph} image placeholder tokens but {len(hashes)} image(s) of "
                f"{tpi} tokens were given"
            )
        rid = next(self._ids)
        handle = RequestHandle(self, rid, ids, params, image_tokens=n_ph)
        keys = token_keys(ids, self.image_token_id, hashes, tpi)
        seq = Sequence(rid, ids, params, handle, keys, hashes, tpi, pixels=px, embeds=em)
        self._live[rid] = seq
        self.scheduler.add(seq)
        return handle

    def cancel(self, rid: int) -> None:
        """Cancel request `rid` (thread-safe; acted on at the next step). No-op once finished."""
        seq = self._live.get(rid)
        if seq is not None:
            self.scheduler.cancel(seq)

    def reset_caches(self) -> None:
        """Forget cached image embeddings and the parked KV of idle slots (for benchmarks:
        the next request is computed in full). Active requests keep their slots."""
        with self._step_lock:
            self.runner.reset_vision_cache()
            self.scheduler.forget_idle()

    def run_until_done(self) -> None:
        """Serve everything submitted so far (and anything submitted meanwhile)."""
        while self.has_work():
            if self.running:
                time.sleep(0.005)
            else:
                self.step()

    def start(self) -> Engine:
        """Serve from a background thread until `stop()`."""
        if not self.running:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="fastvlm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background thread after its current step (queued requests stay queued)."""
        with self.scheduler.cond:
            self._stopping = True
            self.scheduler.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ the step
    def step(self) -> int:
        """Admit waiting requests, decode running ones, sample; return the number of tokens."""
        sched, runner = self.scheduler, self.runner
        with self._step_lock, torch.inference_mode():
            self.counters["steps"] += 1
            for seq in sched.reap_cancelled():
                self._finish(seq, "cancelled")
            try:
                seqs, logits = [], []
                if (batch := sched.decode_batch()) is not None:
                    logits.append(runner.decode(batch))
                    self.counters["decode_rows"] += batch.hi - batch.lo
                    self.counters["holes"] += batch.holes
                    sched.advance(batch)
                    seqs.extend(batch.seqs)
                while (adm := sched.admit_next()) is not None:
                    try:
                        logits.append(self._prefill(adm))
                        seqs.append(adm.seq)
                    except Exception as e:
                        sched.abort(adm.seq)
                        self._finish(adm.seq, "error", e)
                if not seqs:
                    return 0
                toks = runner.sample(seqs, torch.cat(logits))
                values = toks.tolist()  # the one host read per step
            except Exception as e:
                for seq in sched.all_running():
                    sched.forget(seq.slot)  # KV state unknown: forget it
                    self._finish(seq, "error", e)
                raise
            now = time.perf_counter()
            for i, (seq, tok) in enumerate(zip(seqs, values, strict=True)):
                self._emit(seq, tok, toks[i : i + 1], now)
            return len(values)

    def _prefill(self, adm: Admission) -> torch.Tensor:
        seq, slot, reuse = adm.seq, adm.slot, adm.reuse
        embeds, vision_s = self.runner.image_embeds(seq, adm.first_image)
        if adm.src is not None:
            self.scheduler.forget(slot)
            self.runner.copy_prefix(adm.src, slot, reuse)
        self.scheduler.hold(slot, seq.keys[:reuse])  # still true if the forward below fails
        logits = self.runner.prefill(seq, slot, reuse, embeds)
        self.scheduler.hold(slot, seq.keys)
        seq.handle.admitted(reuse, len(seq.ids) - reuse, vision_s)
        self.counters["prefill_tokens"] += len(seq.ids) - reuse
        self.counters["cached_tokens"] += reuse
        return logits

    def _finish(self, seq: Sequence, reason: str, exc: BaseException | None = None) -> None:
        self.scheduler.finish(seq)
        seq.release_tensors()
        self._live.pop(seq.id, None)
        seq.handle.close(reason, exc)

    def _emit(self, seq: Sequence, tok: int, tok_t: torch.Tensor, now: float) -> None:
        seq.handle.deliver(tok, now)
        seq.generated += 1
        p = seq.params
        if tok in self.eos_ids and not p.ignore_eos:
            self._finish(seq, "stop")
        elif seq.generated >= p.max_tokens:
            self._finish(seq, "length")
        else:
            seq.pending = tok
            self.runner.remember(seq, tok_t)

    def _loop(self) -> None:
        cond = self.scheduler.cond
        while True:
            with cond:
                while not self._stopping and not self.has_work():
                    cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:
                log.exception("engine step failed; its requests were failed")
