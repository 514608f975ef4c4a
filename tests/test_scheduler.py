"""The engine's scheduler without a model: admission order, slot reuse, prefix-match choice,
cancellation, capacity and the decode window — plain Python sequences, no tensors."""

from __future__ import annotations

import ast
import pathlib
from types import SimpleNamespace

import pytest

from fastvlm.engine.scheduler import Scheduler, common_prefix
from fastvlm.engine.sequence import Sequence, token_keys

IMG = -1  # the image placeholder id used by these tests


def seq(rid: int, ids: list[int], hashes: list[str] = (), tpi: int = 0) -> Sequence:
    params = SimpleNamespace(max_tokens=4, greedy=True, repetition_penalty=1.0)
    keys = token_keys(list(ids), IMG, list(hashes), tpi)
    return Sequence(rid, list(ids), params, None, keys, list(hashes), tpi)


def admit_all(s: Scheduler) -> list:
    out = []
    while (a := s.admit_next()) is not None:
        out.append(a)
    return out


def run_to_park(s: Scheduler, sq: Sequence, generated: list[int] = ()) -> None:
    """Admit `sq`, pretend its prompt and `generated` went into the KV, then finish it."""
    a = s.admit_next()
    assert a is not None and a.seq is sq
    s.hold(a.slot, sq.keys)
    for t in generated:
        sq.pending = t
        s.advance(s.decode_batch())
    s.finish(sq)


# ---------------------------------------------------------------- admission / capacity
@pytest.mark.parametrize("slots,n", [(1, 3), (2, 5), (3, 3), (4, 9), (8, 2)])
def test_admission_is_fifo_into_lowest_empty_slots(slots, n):
    s = Scheduler(slots, 64)
    seqs = [seq(i, [100 + i, 7, 8]) for i in range(n)]
    for q in seqs:
        s.add(q)
    got = admit_all(s)
    assert [a.seq.id for a in got] == list(range(min(slots, n)))
    assert [a.slot for a in got] == list(range(min(slots, n)))
    assert all(a.reuse == 0 and a.src is None for a in got)
    assert [q.id for q in s.waiting] == list(range(slots, n))
    assert s.has_work()


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_full_slots_block_the_queue_head_and_nothing_overtakes(slots):
    s = Scheduler(slots, 64)
    first = [seq(i, [1, 2, 3 + i]) for i in range(slots)]
    for q in first:
        s.add(q)
    admit_all(s)
    s.hold(0, first[0].keys)
    head, match = seq(50, [9, 9, 9]), seq(51, list(first[0].keys) + [4])
    s.add(head)
    s.add(match)
    assert s.admit_next() is None and list(s.waiting) == [head, match]
    s.finish(first[-1])  # one slot frees: the head goes first, the later match still waits
    a = s.admit_next()
    assert a.seq is head and a.slot == slots - 1
    assert s.admit_next() is None and list(s.waiting) == [match]


@pytest.mark.parametrize("slots", [0, -1])
def test_no_slots_is_an_error(slots):
    with pytest.raises(ValueError, match="slots"):
        Scheduler(slots, 16)


def test_empty_scheduler_has_no_work():
    s = Scheduler(2, 16)
    assert not s.has_work() and s.admit_next() is None and s.decode_batch() is None


# ---------------------------------------------------------------- slot reuse
@pytest.mark.parametrize("slots", [2, 3, 5])
def test_unrelated_request_prefers_an_empty_slot_over_parked_history(slots):
    s = Scheduler(slots, 64)
    a = seq(0, [1, 2, 3])
    s.add(a)
    run_to_park(s, a, [4])
    b = seq(1, [7, 8, 9])
    s.add(b)
    adm = s.admit_next()
    assert adm.slot == 1 and adm.reuse == 0  # slot 0's history survives
    assert s.slot_keys[0] == [1, 2, 3, 4]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1], [1, 2, 0]])
def test_all_parked_evicts_the_least_recently_finished(order):
    s = Scheduler(3, 64)
    seqs = [seq(i, [10 * (i + 1), 1, 2]) for i in range(3)]
    for q in seqs:
        s.add(q)
    for a in admit_all(s):
        s.hold(a.slot, a.seq.keys)
    for i in order:
        s.finish(seqs[i])
    new = seq(9, [99, 98])
    s.add(new)
    adm = s.admit_next()
    assert adm.slot == order[0] and adm.reuse == 0 and adm.src is None


def test_forget_idle_keeps_running_slots():
    s = Scheduler(2, 64)
    a, b = seq(0, [1, 2, 3]), seq(1, [4, 5, 6])
    s.add(a)
    run_to_park(s, a)
    s.add(b)
    adm = s.admit_next()
    s.hold(adm.slot, b.keys)
    s.forget_idle()
    assert s.slot_keys[0] == [] and s.slot_keys[1] == [4, 5, 6]


# ---------------------------------------------------------------- prefix matching
@pytest.mark.parametrize("history,extra", [([1, 2, 3], [4]), ([5] * 7, [6, 7, 8]), ([3, 1], [1])])
def test_next_turn_continues_its_parked_slot_in_place(history, extra):
    s = Scheduler(3, 64)
    other = seq(0, [42, 43])
    s.add(other)
    run_to_park(s, other)
    turn1 = seq(1, history[:-1])
    s.add(turn1)
    run_to_park(s, turn1, history[-1:])  # slot 1 holds the whole history
    turn2 = seq(2, history + extra)
    s.add(turn2)
    adm = s.admit_next()
    assert (adm.slot, adm.reuse, adm.src) == (1, len(history), None)


@pytest.mark.parametrize("shared", [2, 4, 6])
def test_partial_match_copies_into_an_empty_slot_and_keeps_the_source(shared):
    s = Scheduler(3, 64)
    base = list(range(1, shared + 1))
    a = seq(0, base + [90, 91])
    s.add(a)
    run_to_park(s, a)
    b = seq(1, base + [70])
    s.add(b)
    adm = s.admit_next()
    assert (adm.slot, adm.reuse, adm.src) == (1, shared, 0)
    assert s.slot_keys[0] == base + [90, 91]


@pytest.mark.parametrize("lens", [(2, 5, 3), (6, 1, 4), (3, 3, 7)])
def test_longest_common_prefix_wins(lens):
    s = Scheduler(4, 64)
    prompt = list(range(1, 20))
    for i, n in enumerate(lens):  # slot i shares n tokens with `prompt`, then diverges
        q = seq(i, prompt[:n] + [500 + i, 600])
        s.add(q)
    for adm in admit_all(s):
        s.hold(adm.slot, adm.seq.keys)
    for q in list(s.running):
        if q is not None:
            s.finish(q)
    new = seq(9, prompt)
    s.add(new)
    adm = s.admit_next()
    best = max(range(3), key=lambda i: lens[i])
    assert adm.reuse == max(lens) and adm.src == best and adm.slot == 3


@pytest.mark.parametrize("shared", [1, 3, 5])
def test_equal_matches_take_the_lowest_slot(shared):
    s = Scheduler(4, 64)
    base = list(range(1, shared + 1))
    qs = [seq(i, base + [100 + i, 7]) for i in range(3)]
    for q in qs:
        s.add(q)
    for adm in admit_all(s):
        s.hold(adm.slot, adm.seq.keys)
    for q in reversed(qs):
        s.finish(q)
    new = seq(9, base + [55])
    s.add(new)
    adm = s.admit_next()
    assert (adm.slot, adm.reuse, adm.src) == (3, shared, 0)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_identical_prompt_still_prefills_one_token(n):
    s = Scheduler(2, 64)
    ids = list(range(1, n + 2))
    a = seq(0, ids)
    s.add(a)
    run_to_park(s, a)
    again = seq(1, ids)
    s.add(again)
    adm = s.admit_next()
    assert adm.reuse == len(ids) - 1 and adm.slot == 0 and adm.src is None


@pytest.mark.parametrize("tpi", [2, 3, 4])
def test_an_image_is_never_split(tpi):
    """The match ends inside an image (its rows differ after a cut only through the image hash
    of a *different* second image): reuse restarts at that image's first row."""
    s = Scheduler(2, 64)
    ids = [5, 6] + [IMG] * tpi + [7]
    a = seq(0, ids, ["imgA"], tpi)
    s.add(a)
    run_to_park(s, a)
    # same text, same image, then one more prompt token: the whole history is reused
    b = seq(1, ids + [8], ["imgA"], tpi)
    s.add(b)
    adm = s.admit_next()
    assert adm.reuse == len(ids)
    s.finish(b)
    # the prompt ends right after the image: reuse ≤ len - 1 would cut it, so restart before it
    c = seq(2, [5, 6] + [IMG] * tpi, ["imgA"], tpi)
    s.add(c)
    adm = s.admit_next()
    assert adm.reuse == 2 and adm.first_image == 0


@pytest.mark.parametrize("tpi", [1, 2, 5])
def test_different_images_behind_the_same_ids_do_not_match(tpi):
    s = Scheduler(2, 64)
    ids = [5] + [IMG] * tpi + [6, 7]
    a = seq(0, ids, ["imgA"], tpi)
    s.add(a)
    run_to_park(s, a)
    b = seq(1, ids, ["imgB"], tpi)
    s.add(b)
    adm = s.admit_next()
    assert adm.reuse == 1 and adm.first_image == 0  # only the text before the image


@pytest.mark.parametrize("history", [[1, 2, 3], [4, 4, 4, 4]])
def test_prefix_reuse_off_never_matches(history):
    s = Scheduler(2, 64, prefix_reuse=False)
    a = seq(0, history)
    s.add(a)
    run_to_park(s, a)
    b = seq(1, history + [9])
    s.add(b)
    adm = s.admit_next()
    assert adm.reuse == 0 and adm.src is None and adm.slot == 1


@pytest.mark.parametrize(
    "a,b,n", [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2, 4], 2),
              (list(range(100)), list(range(37)) + [-5], 37), ([("h", 0), 1], [("h", 1)], 0)],
)  # fmt: skip
def test_common_prefix(a, b, n):
    assert common_prefix(a, b) == common_prefix(b, a) == n


# ---------------------------------------------------------------- cancellation
@pytest.mark.parametrize("which", [0, 1, 2])
def test_cancel_while_waiting_leaves_the_queue(which):
    s = Scheduler(1, 64)
    busy = seq(9, [1, 2])
    s.add(busy)
    s.admit_next()
    waiting = [seq(i, [3 + i, 4]) for i in range(3)]
    for q in waiting:
        s.add(q)
    s.cancel(waiting[which])
    assert s.reap_cancelled() == [waiting[which]]
    assert [q.id for q in s.waiting] == [i for i in range(3) if i != which]
    assert s.reap_cancelled() == []  # reported once
    s.finish(busy)
    assert s.admit_next().seq.id == (1 if which == 0 else 0)


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_cancel_while_running_frees_the_slot_on_finish(slots):
    s = Scheduler(slots, 64)
    run = [seq(i, [1 + i, 2]) for i in range(slots)]
    for q in run:
        s.add(q)
    admit_all(s)
    nxt = seq(99, [7, 7])
    s.add(nxt)
    s.cancel(run[-1])
    assert s.reap_cancelled() == [run[-1]] and run[-1].slot == slots - 1  # still holds it
    assert s.admit_next() is None
    s.finish(run[-1])
    assert run[-1].slot is None and s.admit_next().slot == slots - 1


def test_cancel_both_waiting_and_running_reports_waiting_first():
    s = Scheduler(1, 64)
    r, w = seq(0, [1, 2]), seq(1, [3, 4])
    s.add(r)
    s.admit_next()
    s.add(w)
    s.cancel(r)
    s.cancel(w)
    assert s.reap_cancelled() == [w, r] and not s.waiting


def test_abort_frees_the_reservation_without_parking():
    s = Scheduler(2, 64)
    a = seq(0, [1, 2, 3])
    s.add(a)
    adm = s.admit_next()
    s.abort(a)
    assert a.slot is None and s.running == [None, None] and s.slot_used == [0, 0]
    assert not s.has_work() and adm.slot == 0


# ---------------------------------------------------------------- decode window
@pytest.mark.parametrize("pending", [[0], [0, 2], [1, 3], [0, 1, 2, 3], [3]])
def test_decode_window_spans_pending_slots_with_holes(pending):
    s = Scheduler(4, 32)
    seqs = [seq(i, list(range(1, 3 + i))) for i in range(4)]
    for q in seqs:
        s.add(q)
    for adm in admit_all(s):
        s.hold(adm.slot, adm.seq.keys)
    for i in pending:
        seqs[i].pending = 50 + i
    b = s.decode_batch()
    lo, hi = min(pending), max(pending) + 1
    assert (b.lo, b.hi) == (lo, hi) and b.seqs == [seqs[i] for i in pending]
    assert b.rows == [i - lo for i in pending] and b.holes == hi - lo - len(pending)
    for r, slot in enumerate(range(lo, hi)):
        live = slot in pending
        assert b.tokens[r] == (50 + slot if live else 0)
        assert b.positions[r] == s.lengths[slot]
        assert b.limits[r] == (s.lengths[slot] if live else 0)
    before = list(s.lengths)
    s.advance(b)
    for i in range(4):
        assert s.lengths[i] == before[i] + (i in pending)
        assert s.slot_keys[i][-1] == (50 + i if i in pending else seqs[i].keys[-1])
        assert seqs[i].pending is None
    assert s.decode_batch() is None


def test_hole_at_the_end_of_the_cache_writes_inside_it():
    s = Scheduler(3, 8)
    a, hole, c = seq(0, [1, 2]), seq(1, list(range(1, 9))), seq(2, [3, 4])
    for q in (a, hole, c):
        s.add(q)
    for adm in admit_all(s):
        s.hold(adm.slot, adm.seq.keys)
    a.pending = c.pending = 5
    b = s.decode_batch()
    assert b.positions[1] == 7 and b.limits[1] == 0  # max_len - 1, not 8


# ---------------------------------------------------------------- keys and purity
def test_token_keys_tag_image_rows_with_their_image():
    keys = token_keys([1, IMG, IMG, 2, IMG, IMG], IMG, ["a", "b"], 2)
    assert keys == [1, ("a", 0), ("a", 1), 2, ("b", 0), ("b", 1)]


@pytest.mark.parametrize("name", ["scheduler.py", "sequence.py"])
def test_scheduler_side_imports_no_torch(name):
    src = pathlib.Path(__file__).parents[1] / "fastvlm" / "engine" / name
    tree = ast.parse(src.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            mods.add((node.module or "").split(".")[0])
    assert not mods & {"torch", "numpy"}
