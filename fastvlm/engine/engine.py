"""Engine: one model, many requests — continuous batching over a static, slotted KV cache.

Design decisions:
* Slots, not pages. `SlotKVCache` holds (slots, kv_heads, max_len, head_dim) per layer, allocated
  once. A request owns one slot from prefill to finish. A finished slot keeps its KV ("parked")
  until LRU eviction, so a follow-up chat turn whose ids extend that history prefills only the new
  tokens: the slot is picked by the longest common prefix of *token keys*, where an image
  placeholder's key is (image content hash, row), so two different images never alias.
* One `step()` = admit + decode + sample + one host read. Waiting requests are prefilled alone
  (batch 1) into their slot; every request holding a sampled-but-unfed token is decoded in one
  forward over the contiguous slot window [lo, hi) with per-row positions and a (B, 1, 1, S) key
  mask. Window rows that are not decoding ("holes") compute garbage that is dropped; they write at
  a position past their valid length, so the cache is never gathered or copied. Prefill and decode
  logits are sampled together and read back with a single `.tolist()` per step.
* Sampling per request: rows that are greedy without repetition penalty share one argmax; other
  rows call `sample` with their own params, seeded generator and seen-token tensor — the same
  calls as the reference `generate_step`, so seeded outputs match it.
* The engine owns the model. `submit` only validates, hashes images and enqueues (thread-safe);
  the model runs inside `step()` under a lock, driven by a background thread (`start()`), by
  `run_until_done()`, or by whoever iterates a handle.
* Stop strings live above the engine (request.py: `RequestHandle`, `stream_text`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque

import torch

from ..kernels import available as kernels_available
from ..kernels.fused import DecodePlan
from ..model.fastvlm import check_tokens_per_image
from .kv_cache import SlotKVCache
from .request import _DONE, Key, RequestHandle, stream_text
from .sampling import SamplingParams, make_generator, sample

__all__ = ["Engine", "RequestHandle", "VisionCache", "content_hash", "stream_text"]

log = logging.getLogger(__name__)

_GREEDY = SamplingParams()


def content_hash(t: torch.Tensor) -> str:
    """sha256 over shape, dtype and raw bytes (bf16 included: hashed as uint8)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _lcp(a: list[Key], b: list[Key]) -> int:
    """Length of the common prefix; slice compares run in C, binary search over the length."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class VisionCache:
    """LRU of projected image embeddings (tokens, D), keyed by `content_hash` of one image."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        e = self._d.get(key)
        if e is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return e

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class Engine:
    """Continuous-batching engine over one model (see the module docstring).

    eng = Engine(model, slots=8)
    h = eng.submit(ids, pixel_values, SamplingParams(max_tokens=64))
    for tok in h: ...  # drives the engine itself unless `start()` was called
    """

    def __init__(
        self,
        model,
        *,
        slots: int = 8,
        max_len: int | None = None,
        eos_ids: list[int] | set[int] | tuple[int, ...] | None = None,
        vocab_limit: int | None = None,
        vision_cache_size: int = 32,
        prefix_reuse: bool = True,
        compile: bool = False,
        span_bucket: int = 64,
        cpu_kernels: bool = True,
        cuda_graphs: bool | None = None,
        fused_decode: bool = True,
    ) -> None:
        cfg = model.config.text
        ctx = cfg.max_position_embeddings
        max_len = min(ctx, 4096) if max_len is None else max_len
        if not 1 <= max_len <= ctx:
            raise ValueError(f"max_len must be in [1, {ctx}] (the model's context), got {max_len}")
        if slots < 1:
            raise ValueError("slots must be ≥ 1")
        if eos_ids is None:
            e = cfg.eos_token_id
            eos_ids = e if isinstance(e, list) else [] if e is None else [e]
        self.model = model
        self.slots, self.max_len = slots, max_len
        self.device = model.lm_head.weight.device
        self.fast_linears = 0
        cpu_fast = cpu_kernels and self.device.type == "cpu" and not compile
        if cpu_fast:
            # Decode GEMVs at memory bandwidth (fastvlm/kernels): swaps the decoder's fp32
            # Linears in place (same Parameters; quantized layers use the kernels already).
            from ..kernels import available, use_fast_linears

            if available():
                self.fast_linears = use_fast_linears(model)
        self.eos_ids = set(eos_ids)
        self.vocab_limit = vocab_limit
        self.prefix_reuse = prefix_reuse
        self.span_bucket = span_bucket
        self.image_token_id = model.config.image_token_id
        self.cache = SlotKVCache.for_model(model, slots, max_len)
        self.vision_cache = VisionCache(vision_cache_size)
        self.counters = dict.fromkeys(
            ("steps", "prefill_tokens", "cached_tokens", "vision_calls", "decode_rows", "holes"), 0
        )
        self._active: list[RequestHandle | None] = [None] * slots
        self._slot_keys: list[list[Key]] = [[] for _ in range(slots)]  # tokens whose KV is held
        self._slot_used = [0] * slots  # LRU clock of parked slots
        self._clock = itertools.count(1)
        self._ids = itertools.count()
        self._waiting: deque[RequestHandle] = deque()
        self._lock = threading.Lock()  # guards _waiting
        self._cond = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one step (one model call sequence) at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        # CPU decode steps run every decoder layer in one C call when the model allows it
        # (fastvlm/kernels/fused.py; re-validated when a request is admitted, else the torch path).
        self.fused_decode = bool(fused_decode and cpu_fast)
        self._plan = None
        self._plan_checked = False  # re-validated when a request is admitted (see _decode_forward)
        self._decode_fn = self._decode_forward
        self.graphs = None  # GraphedDecode when decode steps replay CUDA graphs
        if compile:
            self._decode_fn = torch.compile(self._decode_forward, dynamic=True)
        elif self.device.type == "cuda" and cuda_graphs is not False:
            from .cudagraphs import GraphedDecode

            self.graphs = GraphedDecode(self._decode_forward, self.device)
            self._decode_fn = self.graphs

    @classmethod
    def from_vlm(cls, vlm, **kw) -> Engine:
        """An engine for a loaded `fastvlm.FastVLM` (its EOS ids and vocabulary limit)."""
        kw.setdefault("eos_ids", vlm.eos_ids)
        kw.setdefault("vocab_limit", vlm.vocab_limit)
        return cls(vlm.model, **kw)

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
        req = RequestHandle(self, next(self._ids), ids, params)
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("pass pixel_values or image_embeds, not both")
        if pixel_values is not None:
            px = pixel_values if pixel_values.ndim == 4 else pixel_values[None]
            native = self.model.config.num_image_tokens
            req._pixels, req._tpi = px, check_tokens_per_image(tokens_per_image, native)
            pool = "" if req._tpi == native else f"@{req._tpi}"  # pooled embeds: own cache key
            req._hashes = [content_hash(p) + pool for p in px]
        elif image_embeds is not None:
            em = image_embeds if image_embeds.ndim == 3 else image_embeds[None]
            req._embeds, req._tpi = em, em.shape[1]
            req._hashes = ["embeds:" + content_hash(e) for e in em]
        n_ph = ids.count(self.image_token_id)
        if n_ph != len(req._hashes) * req._tpi:
            raise ValueError(
                f"{n_ph} image placeholder tokens but {len(req._hashes)} image(s) of "
                f"{req._tpi} tokens were given"
            )
        req.stats.image_tokens = n_ph
        keys: list[Key] = list(ids)
        j = 0
        for i, x in enumerate(ids):
            if x == self.image_token_id:
                keys[i] = (req._hashes[j // req._tpi], j % req._tpi)
                j += 1
        req._keys = keys
        with self._cond:
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def reset_caches(self) -> None:
        """Forget cached image embeddings and the parked KV of idle slots (for benchmarks:
        the next request is computed in full). Active requests keep their slots."""
        with self._step_lock:
            self.vision_cache = VisionCache(self.vision_cache.capacity)
            for s in range(self.slots):
                if self._active[s] is None:
                    self._slot_keys[s] = []

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def has_work(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._active)

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
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
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
        with self._step_lock, torch.inference_mode():
            self.counters["steps"] += 1
            self._reap_cancelled()
            try:
                rows, logits = self._decode()
                for req, lg in self._admit():
                    rows.append(req)
                    logits.append(lg)
                if not rows:
                    return 0
                toks = self._sample(rows, torch.cat(logits))
                values = toks.tolist()  # the one host read per step
            except Exception as e:
                for r in [r for r in self._active if r is not None]:
                    self._slot_keys[r._slot] = []  # KV state unknown: forget it
                    self._finish(r, "error", e)
                raise
            now = time.perf_counter()
            for i, (req, tok) in enumerate(zip(rows, values, strict=True)):
                self._emit(req, tok, toks[i : i + 1], now)
            return len(values)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.has_work():
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:
                log.exception("engine step failed; its requests were failed")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _reap_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r._cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone + [r for r in self._active if r is not None and r._cancelled]:
            self._finish(r, "cancelled")

    def _finish(self, req: RequestHandle, reason: str, exc: BaseException | None = None) -> None:
        if req._slot is not None:
            self._active[req._slot] = None
            self._slot_used[req._slot] = next(self._clock)  # parked: KV kept for prefix reuse
            req._slot = None
        req._gen = req._seen = req._pixels = req._embeds = None
        req.finish_reason = reason
        if exc is not None:
            req._q.put(exc)
        req._q.put(_DONE)

    def _emit(self, req: RequestHandle, tok: int, tok_t: torch.Tensor, now: float) -> None:
        req.output_ids.append(tok)
        req._q.put(tok)
        n = len(req.output_ids)
        if n == 1:
            req._t_first = now
            req.stats.prefill_s = now - req._submitted  # time to first token, queueing included
        req.stats.generation_tokens = n
        req.stats.decode_s = now - req._t_first
        p = req.params
        if tok in self.eos_ids and not p.ignore_eos:
            self._finish(req, "stop")
        elif n >= p.max_tokens:
            self._finish(req, "length")
        else:
            req._pending = tok
            if req._seen is not None:
                req._seen = torch.cat([req._seen, tok_t.view(1, 1)], dim=1)

    # ------------------------------------------------------------------ admission + prefill
    def _admit(self) -> list[tuple[RequestHandle, torch.Tensor]]:
        out = []
        while True:
            with self._lock:
                if not self._waiting:
                    break
                req = self._waiting[0]
            pick = self._pick_slot(req)
            if pick is None:  # all slots busy: FIFO, wait for one to free up
                break
            with self._lock:
                self._waiting.popleft()
            self._plan_checked = False  # weights may have changed since the last request
            try:
                out.append((req, self._prefill(req, *pick)))
            except Exception as e:
                self._finish(req, "error", e)
        return out

    def _pick_slot(self, req: RequestHandle) -> tuple[int, int, int | None] | None:
        """(slot, reused prompt tokens, slot to copy them from) or None when all slots are busy.

        A parked slot whose whole history starts the new prompt (the next chat turn) is taken in
        place. A partial match (shared system prompt, edited turn) copies the common prefix's KV
        into the slot that would be picked anyway — an empty one (lowest index keeps the decode
        window compact), else the least recently used — so the other history survives.
        """
        free = [s for s in range(self.slots) if self._active[s] is None]
        if not free:
            return None
        src, common = None, 0
        if self.prefix_reuse:
            for s in free:
                n = _lcp(self._slot_keys[s], req._keys)
                if n > common:
                    src, common = s, n
        reuse = min(common, len(req._keys) - 1)  # prefill ≥ 1 token: we need its logits
        if req._tpi:  # never split an image: restart at the first row of a cut one
            ph = [i for i, k in enumerate(req._keys[:reuse]) if isinstance(k, tuple)]
            if cut := len(ph) % req._tpi:
                reuse = ph[len(ph) - cut]
        if src is not None and reuse > 0 and common == len(self._slot_keys[src]):
            return src, reuse, None
        dst = min(free, key=lambda s: (bool(self._slot_keys[s]), self._slot_used[s], s))
        if reuse == 0 or dst == src:
            return dst, reuse if dst == src else 0, None
        return dst, reuse, src

    def _prefill(self, req: RequestHandle, slot: int, reuse: int, src: int | None) -> torch.Tensor:
        ids = req.input_ids
        n_img_before = sum(1 for k in req._keys[:reuse] if isinstance(k, tuple))
        assert req._tpi == 0 or n_img_before % req._tpi == 0
        first = n_img_before // req._tpi if req._tpi else 0
        embeds = self._image_embeds(req, first)
        if src is not None:
            self._slot_keys[slot] = []
            self.cache.copy_prefix(src, slot, reuse)
        self._slot_keys[slot] = req._keys[:reuse]  # still true if the forward below fails
        self.cache.lengths[slot] = reuse
        new = torch.tensor([ids[reuse:]], dtype=torch.long, device=self.device)
        pos = torch.arange(reuse, len(ids), device=self.device)[None]
        view = self.cache.prefill_view(slot, reuse)
        logits = self.model(new, image_embeds=embeds, positions=pos, cache=view, last_only=True)
        self._slot_keys[slot] = list(req._keys)
        self.cache.lengths[slot] = len(ids)
        self._active[slot], req._slot = req, slot
        req.cached_tokens, req.prefill_tokens = reuse, len(ids) - reuse
        self.counters["prefill_tokens"] += len(ids) - reuse
        self.counters["cached_tokens"] += reuse
        req._gen = make_generator(req.params.seed, self.device)
        if req.params.repetition_penalty != 1:
            req._seen = torch.tensor([ids], dtype=torch.long, device=self.device)
        return logits[:, -1]  # (1, V)

    def _image_embeds(self, req: RequestHandle, first: int) -> torch.Tensor | None:
        """Embeddings (n, tokens, D) of images `first:`; pixels go through the vision cache."""
        if first >= len(req._hashes):
            return None
        if req._embeds is not None:
            return req._embeds[first:].to(self.device)
        t0 = time.perf_counter()
        hashes = req._hashes[first:]
        found = {h: e for h in set(hashes) if (e := self.vision_cache.get(h)) is not None}
        todo = [i for i, h in enumerate(hashes, first) if h not in found]
        todo = list({req._hashes[i]: i for i in todo}.values())  # one encode per distinct image
        if todo:
            px = req._pixels[todo].to(self.device)
            self.counters["vision_calls"] += 1
            pooled = req._tpi != self.model.config.num_image_tokens
            embeds = (
                self.model.embed_images(px, req._tpi) if pooled else self.model.embed_images(px)
            )
            for i, e in zip(todo, embeds, strict=True):
                found[req._hashes[i]] = e
                self.vision_cache.put(req._hashes[i], e)
        req.stats.vision_s += time.perf_counter() - t0
        return torch.stack([found[h] for h in hashes])

    # ------------------------------------------------------------------ decode + sample
    def _decode(self) -> tuple[list[RequestHandle], list[torch.Tensor]]:
        """One forward over the slot window holding every request with a pending token."""
        run = [s for s, r in enumerate(self._active) if r is not None and r._pending is not None]
        if not run:
            return [], []
        lo, hi = run[0], run[-1] + 1
        toks, wpos, mpos = [], [], []
        for s in range(lo, hi):
            r, n = self._active[s], self.cache.lengths[s]
            if r is not None and r._pending is not None:
                toks.append(r._pending)
                wpos.append(n)
                mpos.append(n)
            else:  # hole: write past its valid KV (n ≤ max_len - 1 always), attend key 0 only
                toks.append(0)
                wpos.append(min(n, self.max_len - 1))
                mpos.append(0)
        b = self.span_bucket
        span = min(self.max_len, (max(mpos) + b) // b * b)  # ≥ max(mpos) + 1, fewer shapes
        dev = self.device
        tokens = torch.tensor(toks, dtype=torch.long, device=dev)[:, None]  # (B, 1)
        positions = torch.tensor(wpos, dtype=torch.long, device=dev)[:, None]  # (B, 1)
        limit = torch.tensor(mpos, dtype=torch.long, device=dev)[:, None]
        mask = (torch.arange(span, device=dev)[None] <= limit)[:, None, None]  # (B, 1, 1, S)
        logits = self._decode_fn(tokens, positions, mask, lo, hi)  # (B, V)
        self.counters["decode_rows"] += hi - lo
        self.counters["holes"] += hi - lo - len(run)
        rows = []
        for s in run:
            r = self._active[s]
            self._slot_keys[s].append(r._pending)
            self.cache.lengths[s] += 1
            r._pending = None
            rows.append(r)
        if len(run) < hi - lo:
            logits = logits[torch.tensor([s - lo for s in run], device=dev)]
        return rows, [logits]

    def _decode_forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        # Decode ids are never image placeholders (masked at sampling), so skip `model.embed`
        # and its host sync.
        lm = self.model.language_model
        if self.fused_decode:
            # The plan is checked against the model (module identities, weight storages and
            # versions: ~0.5 ms with cold caches on the 0.5B shape) when a request was admitted
            # since the last check, not on every step: weights changed while requests are in
            # flight are not picked up by those requests (they hold their own pointers safely).
            if not kernels_available():
                self._plan = None
            elif not self._plan_checked:
                self._plan = DecodePlan.current(self._plan, lm, self.cache)
                self._plan_checked = True
            if self._plan is not None:
                # embedding, layers and final norm in the one C call; (B, 1) -> (B,) are views
                limits = mask.reshape(mask.shape[0], -1).sum(-1) - 1  # mask = arange(S) <= limit
                x = self._plan.step(tokens.view(-1), lo, positions.view(-1), limits)
                return self.model.lm_head(x)
        view = self.cache.window(lo, hi, mask.shape[-1])
        h = lm(lm.embed_tokens(tokens), positions, mask, view)  # (B, 1, D)
        return self.model.lm_head(h[:, -1])

    def _sample(self, rows: list[RequestHandle], logits: torch.Tensor) -> torch.Tensor:
        """Next token per row (N,), on the device; no host sync."""
        if self.image_token_id < logits.shape[-1]:  # a placeholder would demand an image next
            logits[:, self.image_token_id] = float("-inf")
        fast = [i for i, r in enumerate(rows) if r.params.greedy and r._seen is None]
        if len(fast) == len(rows):
            return sample(logits, _GREEDY, None, None, self.vocab_limit)
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if fast:
            idx = torch.tensor(fast, device=logits.device)
            out[idx] = sample(logits[idx], _GREEDY, None, None, self.vocab_limit)
        for i, r in enumerate(rows):
            if not (r.params.greedy and r._seen is None):
                out[i : i + 1] = sample(
                    logits[i : i + 1], r.params, r._gen, r._seen, self.vocab_limit
                )
        return out
