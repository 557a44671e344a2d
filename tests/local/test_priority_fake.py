"""Batch priority in the embedded engine's scheduler (issue 23), with the weightless FakeRunner:
batch requests take only the slots and step budget interactive requests leave, are preempted
(restarted from zero) when interactive requests queue, give the same output however often they
were preempted, never show a discarded attempt to their consumer, and run as soon as
interactive traffic stops."""

from __future__ import annotations

import pytest

from fake_engine import Harness, Result, coin, scripted
from modelyard.engine.types import Constraint, SamplingParams
from modelyard.errors import InvalidRequest
from modelyard.local.request import RequestStatus
from modelyard.local.scheduler import BATCH_ROWS_BESIDE_INTERACTIVE, INTERACTIVE_GRACE_STEPS, INTERACTIVE_SPARE_SLOTS

LONG = 12           # a batch request long enough to be caught running


def first_prefill(h: Harness, rid: str) -> int:
    return min(i for i, rec in enumerate(h.batches) for r, _, _ in rec.prefills if r == rid)


def alone(rid: str, prompt: str, **kw) -> Result:
    """The same request run alone, at interactive priority, on a fresh engine."""
    h = Harness(n_slots=4)
    h.add(rid, prompt, **kw)
    h.run()
    return h.result(rid)


def same_output(got: Result, want: Result) -> None:
    assert got.error is None and want.error is None
    assert {i: (c.text, c.finish) for i, c in got.choices.items()} == \
        {i: (c.text, c.finish) for i, c in want.choices.items()}
    for i, c in want.choices.items():
        if c.logprobs is not None:
            assert got.choices[i].logprobs.as_dict() == c.logprobs.as_dict()
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == \
        (want.usage.prompt_tokens, want.usage.completion_tokens)


# -- admission ---------------------------------------------------------------------------------

def test_batch_waits_while_interactive_requests_wait() -> None:
    h = Harness(n_slots=2)
    b = h.add("B", "ab", max_tokens=3, priority="batch")    # arrives first
    i1 = h.add("I1", "cd", max_tokens=3)
    i2 = h.add("I2", "ef", max_tokens=3)
    h.step()
    assert (i1.status, i2.status, b.status) == (RequestStatus.RUNNING, RequestStatus.RUNNING, RequestStatus.WAITING)
    h.run()
    assert first_prefill(h, "B") > max(first_prefill(h, "I1"), first_prefill(h, "I2"))
    assert h.sched.preemptions == 0


def test_batch_takes_the_slots_interactive_leaves_free_but_a_spare_one() -> None:
    """Beside a running interactive request, batch work leaves INTERACTIVE_SPARE_SLOTS free (the
    interactive client's next request finds a slot, not a preemption); alone, it takes them all."""
    h = Harness(n_slots=3)
    i = h.add("I", "ab", max_tokens=5)
    b1 = h.add("B1", "cd", max_tokens=5, priority="batch")
    b2 = h.add("B2", "ef", max_tokens=5, priority="batch")
    h.step()
    assert (i.status, b1.status, b2.status) == (RequestStatus.RUNNING, RequestStatus.RUNNING, RequestStatus.WAITING)
    assert h.sched.slots.n_free == INTERACTIVE_SPARE_SLOTS
    i2 = h.add("I2", "gh", max_tokens=2)        # arrives: takes the spare slot, no preemption
    h.step()
    assert i2.status is RequestStatus.RUNNING and h.sched.preemptions == 0
    h.run()
    assert h.result("B2").choices[0].text == "ghijk"
    h2 = Harness(n_slots=3)
    alone = [h2.add(f"B{k}", "ab", max_tokens=3, priority="batch") for k in range(3)]
    h2.step()
    assert all(b.status is RequestStatus.RUNNING for b in alone)


def test_slots_interactive_requests_just_left_stay_free_for_their_next_ones() -> None:
    """Two closed-loop clients whose answers end in the same step: their next requests come a
    moment later, and must find their slots free, not taken by batch work in the step between
    (bench/batch_priority: a preemption for nearly every interactive request before this). Once
    interactive traffic has been gone for the grace steps, batch work takes every slot."""
    h = Harness(n_slots=4)
    i1, i2 = h.add("I1", "ab", max_tokens=2), h.add("I2", "cd", max_tokens=2)
    batch = [h.add(f"B{k}", "efgh", max_tokens=LONG, priority="batch") for k in range(8)]
    while RequestStatus.FINISHED not in (i1.status, i2.status):
        h.step()
    assert i1.status is i2.status is RequestStatus.FINISHED     # in the same step
    h.step()                                     # the step before the clients come back
    assert h.sched.slots.n_free == 2 + INTERACTIVE_SPARE_SLOTS
    i3, i4 = h.add("I3", "ab", max_tokens=2), h.add("I4", "cd", max_tokens=2)
    h.step()
    assert i3.status is i4.status is RequestStatus.RUNNING and h.sched.preemptions == 0
    while RequestStatus.FINISHED not in (i3.status, i4.status):
        h.step()
    running = []                # batch requests running after each step
    for _ in range(INTERACTIVE_GRACE_STEPS + 4):
        h.step()
        running.append(sum(1 for r in h.sched.running if r.batch))
    assert running[0] < 4 and max(running) == 4
    assert h.sched.preemptions == 0
    h.run()
    for b in batch:
        same_output(h.result(b.id), alone(b.id, "efgh", max_tokens=LONG))

def test_interactive_fifo_is_unchanged_by_batch_work() -> None:
    h = Harness(n_slots=2)
    for k in range(3):
        h.add(f"B{k}", "ab", max_tokens=LONG, priority="batch")
    order = []
    for k in range(6):
        order.append(h.add(f"I{k}", "cd", n=1 + k % 2, max_tokens=2))
        h.step()
    h.run()
    firsts = [first_prefill(h, r.id) for r in order]
    assert firsts == sorted(firsts)


def test_interactive_prompt_chunks_take_the_step_budget_first() -> None:
    h = Harness(n_slots=2, step_tokens=8)
    h.add("B", "abcdefghijklmnopqrst", max_tokens=2, priority="batch")
    h.step()                                  # B is prefilling alone: its chunk takes it all
    h.add("I", "abcdefghijklmnopqrst"[::-1], max_tokens=2)
    h.step()
    rec = h.batches[-1]
    assert [r for r, _, _ in rec.prefills][0] == "I"
    assert rec.prefills[0][2] - rec.prefills[0][1] == 8      # I's chunk took the whole budget
    assert "B" not in [r for r, _, _ in rec.prefills]


def test_batch_work_beside_interactive_requests_is_a_few_rows_a_step_and_all_alone() -> None:
    h = Harness(n_slots=4, step_tokens=64)
    prompt = "abcdefghijklmnopqrstuvwxy" * 8   # 200 tokens
    h.add("I", "ab", max_tokens=20)
    h.step()                                   # I prefilled: it decodes from now on
    for k in range(2):
        h.add(f"B{k}", "cdefg"[k:], max_tokens=8, priority="batch")
    h.add("BP", prompt, max_tokens=2, priority="batch")
    h.add("J", "xy", max_tokens=1)             # an interactive prompt: that step has no batch rows
    h.run()
    i_steps = [rec for rec in h.batches[1:] if any(r in ("I", "J") for r, _, _ in rec.decodes + rec.prefills)]
    for rec in i_steps:
        batch_rows = sum(1 for r, _, _ in rec.decodes if r.startswith("B")) + \
            sum(e - s for r, s, e in rec.prefills if r.startswith("B"))
        assert batch_rows <= BATCH_ROWS_BESIDE_INTERACTIVE
        if any(r == "J" for r, _, _ in rec.prefills):
            assert batch_rows == 0
    # every batch stream moved while I ran (in turn), and BP's prompt went faster once I was done
    moved = {r for rec in i_steps for r, _, _ in rec.decodes + rec.prefills if r.startswith("B")}
    assert moved == {"B0", "B1", "BP"}
    alone_ = [e - s for rec in h.batches if rec not in i_steps for r, s, e in rec.prefills if r == "BP"]
    assert alone_ and max(alone_) > BATCH_ROWS_BESIDE_INTERACTIVE
    for rid, p, n in (("B0", "cdefg", 8), ("B1", "defg", 8), ("BP", prompt, 2)):
        same_output(h.result(rid), alone(rid, p, max_tokens=n))


def test_batch_work_stays_small_for_a_few_steps_after_interactive_traffic_left() -> None:
    """A closed-loop client's next request comes a moment after its answer: the step it then
    waits for must not be a full one of batch prompt."""
    h = Harness(n_slots=2, step_tokens=64)
    h.add("I", "ab", max_tokens=1)
    h.step()                                   # I done in one step
    h.add("B", "abcdefghijklmnopqrstuvwxy" * 4, max_tokens=2, priority="batch")
    h.run()
    sizes = [e - s for rec in h.batches for r, s, e in rec.prefills if r == "B"]
    assert sizes[:INTERACTIVE_GRACE_STEPS] == [3] * INTERACTIVE_GRACE_STEPS
    assert max(sizes) > 3


# -- preemption --------------------------------------------------------------------------------

def test_interactive_preempts_the_youngest_batch_request_when_no_slot_is_free() -> None:
    h = Harness(n_slots=2)
    b1 = h.add("B1", "ab", max_tokens=LONG, priority="batch")
    h.step()
    b2 = h.add("B2", "cd", max_tokens=LONG, priority="batch")
    h.step()
    h.step()
    assert b2.seqs[0].output_ids                  # B2 has generated something...
    assert h.result("B2").items == []            # ...that nobody saw
    i = h.add("I", "ef", max_tokens=3)
    h.step()
    assert i.status is RequestStatus.RUNNING and b1.status is RequestStatus.RUNNING
    assert b2.status is RequestStatus.WAITING and b2.preemptions == 1 and h.sched.preemptions == 1
    assert list(h.sched.batch_waiting) == [b2] and b2.seqs[0].output_ids == [] and b2.num_computed == 0
    h.run()
    assert h.result("I").choices[0].text == "ghi"
    same_output(h.result("B2"), alone("B2", "cd", max_tokens=LONG))
    same_output(h.result("B1"), alone("B1", "ab", max_tokens=LONG))


def test_the_preempted_one_is_the_one_whose_slot_holds_the_interactive_prompts_prefix() -> None:
    h = Harness(n_slots=2)
    older = h.add("B1", "klmnopq", max_tokens=LONG, priority="batch")
    h.step()
    younger = h.add("B2", "abcdefg", max_tokens=LONG, priority="batch")
    h.step()
    h.step()
    i = h.add("I", "klmnopxyz", max_tokens=3)        # shares "klmnop" with B1's prompt
    h.step()
    assert older.status is RequestStatus.WAITING and younger.status is RequestStatus.RUNNING
    assert i.cached_tokens == 6                       # prefilled only what B1's slot did not hold
    h.run()
    same_output(h.result("B1"), alone("B1", "klmnopq", max_tokens=LONG))
    same_output(h.result("I"), alone("I", "klmnopxyz", max_tokens=3))


def test_no_preemption_when_it_would_not_make_room() -> None:
    h = Harness(n_slots=3)
    h.add("I1", "ab", max_tokens=20)
    b = h.add("B", "cd", max_tokens=4, priority="batch")        # ends while I1 runs
    h.step()
    i2 = h.add("I2", "ef", n=3, max_tokens=2)     # needs every slot: I1 holds one
    h.step()
    assert b.status is RequestStatus.RUNNING and i2.status is RequestStatus.WAITING
    b2 = h.add("B2", "gh", max_tokens=2, priority="batch")
    h.run()
    assert h.sched.preemptions == 0
    # B2 never overtook the waiting interactive I2, though B's slot was free before I1's
    assert first_prefill(h, "B2") > first_prefill(h, "I2")
    assert b2.status is RequestStatus.FINISHED


@pytest.mark.parametrize("kw", [
    dict(max_tokens=LONG),
    dict(max_tokens=LONG, n=2, sampling=SamplingParams(temperature=1.0, seed=7, logprobs=2)),
    dict(max_tokens=LONG, stop=("jk",), echo=True, sampling=SamplingParams(logprobs=1)),
    dict(max_tokens=LONG, constraint=Constraint("regex", "[a-z]{6}", "response_format")),
], ids=["greedy", "seeded-n2-logprobs", "stop-echo-logprobs", "grammar"])
def test_preempted_output_equals_the_request_run_alone(kw) -> None:
    """Preempted again and again (an interactive arrival every few steps), restarted from zero:
    the output is the same as the request's alone, and its stream is one attempt's."""
    model = scripted(lambda hist: coin(hist[-1] % 26, (hist[-1] + 1) % 26)) \
        if kw.get("sampling", SamplingParams()).temperature else None
    h = Harness(n_slots=2, **({"model": model} if model else {}))
    b = h.add("B", "abc", priority="batch", **kw)
    for k in range(3):
        for _ in range(50):       # until B runs again and has generated a few tokens
            if b.status is RequestStatus.RUNNING and len(b.seqs[0].output_ids) >= 2 + k:
                break
            h.step()
        h.add(f"I{k}", "xy", n=2, max_tokens=2)       # both slots: B must yield
    h.run()
    assert b.preemptions == 3
    want_h = Harness(n_slots=2, **({"model": model} if model else {}))
    want_h.add("B", "abc", **kw)
    want_h.run()
    same_output(h.result("B"), want_h.result("B"))


def test_a_batch_request_runs_when_interactive_traffic_stops() -> None:
    """Preempted by a steady stream of interactive requests, it finishes once they stop."""
    h = Harness(n_slots=1)
    b = h.add("B", "ab", max_tokens=LONG, priority="batch")
    for k in range(10):
        h.step()
        h.add(f"I{k}", "xy", max_tokens=2)
    h.step()
    assert b.status is RequestStatus.WAITING and b.preemptions >= 1
    assert h.run(max_steps=500) > 0
    assert b.status is RequestStatus.FINISHED
    same_output(h.result("B"), alone("B", "ab", max_tokens=LONG))


def test_the_ledger_is_settled_once_however_often_it_was_preempted() -> None:
    h = Harness(n_slots=1)
    b = h.build("B", "ab", max_tokens=4, priority="batch")
    ends = []
    b.on_end = lambda prompt, output: ends.append((prompt, output))
    h.sched.add(b)
    h.step()
    h.step()
    h.add("I", "xy", max_tokens=2)
    h.step()
    assert b.preemptions == 1 and ends == []
    h.run()
    assert ends == [(2, 4)]


def test_aborting_a_preempted_batch_request() -> None:
    h = Harness(n_slots=1)
    b = h.add("B", "ab", max_tokens=LONG, priority="batch")
    h.step()
    h.step()
    h.add("I", "xy", max_tokens=2)
    h.step()
    assert b.status is RequestStatus.WAITING
    h.core.abort("B")
    assert b.status is RequestStatus.ABORTED and not h.sched.batch_waiting
    h.run()
    assert h.result("B").items == [] and h.pool.n_free == 1


def test_an_unknown_priority_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="priority is 'urgent'; it must be one of interactive, batch"):
        Harness().build("A", "ab", priority="urgent")
