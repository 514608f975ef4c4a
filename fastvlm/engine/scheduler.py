"""Slots, the waiting queue, prefix matching and admission — pure Python, no tensors.

Design decisions:
* Slots, not pages. A request owns one KV slot from prefill to finish. A finished slot keeps its
  KV ("parked") until LRU eviction, so a follow-up chat turn whose ids extend that history
  prefills only the new tokens: the slot is picked by the longest common prefix of *token keys*
  (`sequence.token_keys`), where an image placeholder's key is (image hash, row).
* Admission is FIFO: the head of the queue waits for a free slot; nothing overtakes it.
* The scheduler tracks, per slot, which keys its KV holds (`slot_keys`) and how many positions are
  valid (`lengths`); the engine tells it what the runner wrote (`hold`, `advance`).
* Thread safety: `add`, `cancel` and the queue are guarded by `cond` (the engine's background
  thread waits on it); everything else runs inside the engine's step lock.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass

from .sequence import Key, Sequence


def common_prefix(a: list[Key], b: list[Key]) -> int:
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


@dataclass(frozen=True, slots=True)
class Admission:
    """Prefill `seq` into `slot`, reusing the KV of its first `reuse` prompt tokens (copied from
    slot `src` first when that is not None)."""

    seq: Sequence
    slot: int
    reuse: int
    src: int | None

    @property
    def first_image(self) -> int:
        """Index of the first image whose placeholders are prefilled (earlier ones are reused)."""
        n = sum(1 for k in self.seq.keys[: self.reuse] if isinstance(k, tuple))
        return n // self.seq.tpi if self.seq.tpi else 0


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """One decode forward over the contiguous slot window [lo, hi).

    Rows that are not decoding ("holes") write past their valid length (`positions`) and attend
    key 0 only (`limits`); their logits are dropped. `rows` are the window offsets that decode."""

    lo: int
    hi: int
    seqs: list[Sequence]
    tokens: list[int]
    positions: list[int]
    limits: list[int]
    rows: list[int]

    @property
    def holes(self) -> int:
        return self.hi - self.lo - len(self.seqs)


class Scheduler:
    def __init__(self, slots: int, max_len: int, prefix_reuse: bool = True) -> None:
        if slots < 1:
            raise ValueError("slots must be ≥ 1")
        self.slots, self.max_len, self.prefix_reuse = slots, max_len, prefix_reuse
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence | None] = [None] * slots
        self.slot_keys: list[list[Key]] = [[] for _ in range(slots)]  # tokens whose KV is held
        self.lengths = [0] * slots  # valid KV positions per slot
        self.slot_used = [0] * slots  # LRU clock of parked slots
        self._clock = itertools.count(1)
        self.cond = threading.Condition()

    # ------------------------------------------------------------------ queue (any thread)
    def add(self, seq: Sequence) -> None:
        with self.cond:
            self.waiting.append(seq)
            self.cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        with self.cond:
            seq.cancelled = True
            self.cond.notify_all()

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.running)

    # ------------------------------------------------------------------ inside a step
    def reap_cancelled(self) -> list[Sequence]:
        """Cancelled sequences, waiting ones first; waiting ones leave the queue (running ones
        keep their slot until `finish`)."""
        with self.cond:
            gone = [s for s in self.waiting if s.cancelled]
            for s in gone:
                self.waiting.remove(s)
        return gone + [s for s in self.running if s is not None and s.cancelled]

    def admit_next(self) -> Admission | None:
        """Pop the head of the queue into a slot (reserved for it), or None when the queue is
        empty or every slot is busy."""
        with self.cond:
            if not self.waiting:
                return None
            seq = self.waiting[0]
        pick = self.pick_slot(seq)
        if pick is None:
            return None
        with self.cond:
            self.waiting.popleft()
        slot, reuse, src = pick
        self.running[slot], seq.slot = seq, slot
        return Admission(seq, slot, reuse, src)

    def pick_slot(self, seq: Sequence) -> tuple[int, int, int | None] | None:
        """(slot, reused prompt tokens, slot to copy them from) or None when all slots are busy.

        A parked slot whose whole history starts the new prompt (the next chat turn) is taken in
        place. A partial match (shared system prompt, edited turn) copies the common prefix's KV
        into the slot that would be picked anyway — an empty one (lowest index keeps the decode
        window compact), else the least recently used — so the other history survives.
        """
        free = [s for s in range(self.slots) if self.running[s] is None]
        if not free:
            return None
        src, common = None, 0
        if self.prefix_reuse:
            for s in free:
                n = common_prefix(self.slot_keys[s], seq.keys)
                if n > common:
                    src, common = s, n
        reuse = min(common, len(seq.keys) - 1)  # prefill ≥ 1 token: we need its logits
        if seq.tpi:  # never split an image: restart at the first row of a cut one
            ph = [i for i, k in enumerate(seq.keys[:reuse]) if isinstance(k, tuple)]
            if cut := len(ph) % seq.tpi:
                reuse = ph[len(ph) - cut]
        if src is not None and reuse > 0 and common == len(self.slot_keys[src]):
            return src, reuse, None
        dst = min(free, key=lambda s: (bool(self.slot_keys[s]), self.slot_used[s], s))
        if reuse == 0 or dst == src:
            return dst, reuse if dst == src else 0, None
        return dst, reuse, src

    def hold(self, slot: int, keys: list[Key]) -> None:
        """Slot `slot` now holds valid KV for exactly `keys`."""
        self.slot_keys[slot] = list(keys)
        self.lengths[slot] = len(keys)

    def forget(self, slot: int) -> None:
        """The KV of `slot` is unknown (a copy or a step failed): match nothing against it."""
        self.slot_keys[slot] = []

    def forget_idle(self) -> None:
        for s in range(self.slots):
            if self.running[s] is None:
                self.slot_keys[s] = []

    def abort(self, seq: Sequence) -> None:
        """Undo `admit_next` for a sequence whose prefill failed: its slot is free again."""
        if seq.slot is not None:
            self.running[seq.slot] = None
            seq.slot = None

    def finish(self, seq: Sequence) -> None:
        """Free the sequence's slot; its KV stays parked for prefix reuse (LRU)."""
        if seq.slot is not None:
            self.running[seq.slot] = None
            self.slot_used[seq.slot] = next(self._clock)
            seq.slot = None

    def decode_batch(self) -> DecodeBatch | None:
        """The window of slots holding every sequence with a pending token, or None."""
        run = [s for s, q in enumerate(self.running) if q is not None and q.pending is not None]
        if not run:
            return None
        lo, hi = run[0], run[-1] + 1
        toks, wpos, mpos = [], [], []
        for s in range(lo, hi):
            q, n = self.running[s], self.lengths[s]
            if q is not None and q.pending is not None:
                toks.append(q.pending)
                wpos.append(n)
                mpos.append(n)
            else:  # hole: write past its valid KV (n ≤ max_len - 1 always), attend key 0 only
                toks.append(0)
                wpos.append(min(n, self.max_len - 1))
                mpos.append(0)
        seqs = [q for q in (self.running[s] for s in run) if q is not None]
        return DecodeBatch(lo, hi, seqs, toks, wpos, mpos, [s - lo for s in run])

    def advance(self, batch: DecodeBatch) -> None:
        """The batch's pending tokens are in the KV now."""
        for q in batch.seqs:
            self.slot_keys[q.slot].append(q.pending)
            self.lengths[q.slot] += 1
            q.pending = None

    def all_running(self) -> list[Sequence]:
        return [s for s in self.running if s is not None]
