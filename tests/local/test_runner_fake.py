"""LlamaCppRunner's filler rows (runner.FILLED_RUN) on a FakeContext: a step's decode call keeps
its sequence ids consecutive where one slot between two decoding ones is idle or prefilling, and
the filler leaves nothing behind: every slot's KV, and every answer, is what it is without them."""

from __future__ import annotations

from fake_engine import Harness
from modelyard.local.runner import FILLED_RUN, fillable_holes


def test_fillable_holes_are_runs_of_one_slot_between_decoding_ones() -> None:
    assert FILLED_RUN == 1
    assert fillable_holes([0, 1, 2, 3]) == []
    assert fillable_holes([0, 2, 3, 5]) == [1, 4]
    assert fillable_holes([0, 3]) == []                 # a run of two: two rows cost what the split does
    assert fillable_holes([0, 3], run=2) == [1, 2]
    assert fillable_holes([2, 4]) == [3]                # nothing before the first or after the last
    assert fillable_holes([5]) == []


def gaps_of_one(seqs: list[int]) -> int:
    ids = sorted(set(seqs))
    return sum(1 for a, b in zip(ids, ids[1:]) if b - a == 2)


def run(fill: bool) -> tuple[Harness, list[list[list[int]]]]:
    """Five requests on four slots: B finishes early and leaves a hole between A and C, which E
    then prefills into. Returns the harness and every slot's KV after each step."""
    h = Harness(n_slots=4, step_tokens=16, fill_holes=fill)
    h.add("A", "abc", max_tokens=12)
    h.add("B", "bcd", max_tokens=2)
    h.add("C", "cde", max_tokens=12)
    h.add("D", "def", max_tokens=12)
    kv = []
    for i in range(40):
        if i == 6:
            h.add("E", "mnopqrstuvwxyzab", max_tokens=5)    # 16 tokens: prefilled over two steps
        if not h.step():
            break
        kv.append([list(x) for x in h.kv])
    return h, kv


def test_a_hole_between_decoding_slots_gets_a_filler_that_leaves_no_trace() -> None:
    plain, plain_kv = run(fill=False)
    filled, filled_kv = run(fill=True)
    assert [b.slots for b in filled.batches] == [b.slots for b in plain.batches]   # the same steps
    assert plain.runner._runner.filler_rows == 0
    assert filled.runner._runner.filler_rows >= 3       # B's slot: idle, then E prefilling in it
    # Without fillers some decode calls had a one-slot hole; with them none did.
    assert sum(gaps_of_one(c) for c in plain.runner.ctx.calls) >= 3
    assert sum(gaps_of_one(c) for c in filled.runner.ctx.calls) == 0
    # After every step, every slot's KV holds exactly what it holds without fillers...
    assert filled_kv == plain_kv
    # ...and every answer is the same.
    for rid in "ABCDE":
        a, b = plain.result(rid), filled.result(rid)
        assert a.error is None and b.error is None
        assert [c.text for c in a.choices.values()] == [c.text for c in b.choices.values()]
        assert a.usage == b.usage


def test_a_failed_decode_still_takes_its_fillers_back() -> None:
    h = Harness(n_slots=4, step_tokens=16)
    h.add("A", "abc", max_tokens=12)
    h.add("B", "bcd", max_tokens=2)
    h.add("C", "cde", max_tokens=12)
    for _ in range(4):
        h.step()
    assert h.requests["B"].seqs[0].finished
    hole = h.requests["B"].seqs[0].slot
    before = list(h.kv[hole])
    ops = h.runner.ctx.ops
    start = len(ops)
    h.runner.fail_next_decode()
    h.step()                      # the call with the filler fails; each request is retried alone
    failed = ops.index(("decode", 3), start)
    assert h.runner.ctx.calls[-3] == sorted(h.runner.ctx.calls[-3])
    assert hole in h.runner.ctx.calls[-3]              # the failed call held the filler...
    assert ops[failed + 1] == ("rm", hole, len(before))    # ...and took it back at once
    assert h.kv[hole] == before
    h.run()
    for rid in "AC":
        assert h.result(rid).error is None


def test_no_filler_for_a_slot_holding_more_than_the_call_attends_over() -> None:
    """B's slot holds a long prompt when B ends: a filler there would make every row of the call
    attend over more keys (runner.KV_PAD), so the call is left cut in two."""
    h = Harness(n_slots=4, step_tokens=16)
    h.add("A", "abc", max_tokens=40)
    h.add("B", "bcdefghijklmnopqrstuvwxyz" * 12, max_tokens=1)      # 300 tokens
    h.add("C", "cde", max_tokens=40)
    h.run()
    assert all(h.result(r).error is None for r in "ABC")
    assert sum(gaps_of_one(c) for c in h.runner.ctx.calls) > 0
    assert h.runner._runner.filler_rows == 0
