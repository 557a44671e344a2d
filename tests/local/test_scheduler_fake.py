"""Scheduler + SlotPool through EngineCore with a weightless FakeRunner (vLLM-style).

Every step's batch is recorded; the fake KV checks positions against what each slot holds,
and Harness.check() checks the scheduler's idea of each slot's cache after every step.
"""

from __future__ import annotations

import itertools
import random

import pytest

from fake_engine import EOG, Harness, L, coin, counting, encode, find_seed, scripted, sure
from modelyard.engine.types import FinishReason, SamplingParams
from modelyard.errors import EngineError
from modelyard.local.request import RequestStatus
from modelyard.local.scheduler import PROMPT_LOGITS_ROWS
from modelyard.local.slots import RUN_TOKENS, SlotPool, common_prefix

LETTERS = "abcdefghijklmnopqrst"        # a 20-token prompt


def text_of(h: Harness, rid: str, i: int = 0) -> str:
    return h.result(rid).choices[i].text


# -- one batch: decodes first, then prompt chunks ---------------------------------------------

def test_decodes_first_then_prompt_chunks_up_to_the_budget() -> None:
    h = Harness(n_slots=2, step_tokens=8)
    a = h.add("A", "abc", max_tokens=10)
    b = h.add("B", LETTERS, max_tokens=2)
    produced = []
    while h.step():
        produced.append(len(a.seqs[0].output_ids))

    for rec in h.batches:
        assert len(rec.tokens) <= 8
        # decode rows are the first rows of the batch
        assert sorted(rec.decode_rows) == list(range(len(rec.decodes)))
        n_prefill = sum(e - s for _, s, e in rec.prefills)
        assert len(rec.decodes) + n_prefill == len(rec.tokens)

    # B's 20-token prompt is chunked by what the budget leaves after A's decode token, but
    # never into a one-token chunk (another kernel path): 12..19 would leave 19..20 alone
    b_chunks = [(s, e) for rec in h.batches for rid, s, e in rec.prefills if rid == "B"]
    assert b_chunks == [(0, 5), (5, 12), (12, 18), (18, 20)]
    # only the last prompt position asks for logits
    first = h.batches[0]
    assert first.logits == [False, False, True] + [False] * 5
    last_b = h.batches[3]
    assert last_b.tokens[-1] == L("t") and last_b.positions[-1] == 19 and last_b.logits == [True, False, True]
    # the running stream gets a token every step while B prefills
    assert produced[:5] == [1, 2, 3, 4, 5]
    assert text_of(h, "A") == "defghijklm"
    assert text_of(h, "B") == "uv"


def test_positions_and_slots_of_decodes() -> None:
    h = Harness(n_slots=2, step_tokens=4)
    h.add("A", "ab", max_tokens=3)
    h.run()
    assert [(r.tokens, r.positions, r.slots) for r in h.batches] == [
        ([L("a"), L("b")], [0, 1], [0, 0]),
        ([L("c")], [2], [0]),
        ([L("d")], [3], [0]),
    ]
    assert text_of(h, "A") == "cde"


def test_every_prefill_row_goes_to_the_requests_first_slot_in_order() -> None:
    h = Harness(n_slots=3, step_tokens=5)
    reqs = [h.add(f"R{i}", LETTERS[i:i + 7], n=1, max_tokens=2) for i in range(3)]
    h.run()
    covered = {r.id: [] for r in reqs}
    for rec in h.batches:
        for rid, s, e in rec.prefills:
            covered[rid].append((s, e))
    for i, r in enumerate(reqs):
        spans = covered[r.id]
        assert spans[0][0] == 0 and spans[-1][1] == 7
        assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))   # contiguous, no overlap
        assert text_of(h, r.id) == LETTERS[i + 7:i + 9]


# -- admission ---------------------------------------------------------------------------------

def test_fifo_head_waits_for_its_slots_and_nobody_overtakes() -> None:
    h = Harness(n_slots=3, step_tokens=16)
    a = h.add("A", "ab", n=2, max_tokens=3)
    b = h.add("B", "fg", n=2, max_tokens=2)
    c = h.add("C", "x", n=1, max_tokens=1)
    h.step()
    assert a.status is RequestStatus.RUNNING
    assert b.status is RequestStatus.WAITING and c.status is RequestStatus.WAITING
    assert list(h.sched.waiting) == [b, c]
    assert h.pool.n_free == 1                     # C would fit, but must not overtake B
    h.run()
    first_batch = {rid: min(i for i, rec in enumerate(h.batches) for r, _, _ in rec.prefills if r == rid)
                   for rid in "ABC"}
    assert first_batch["A"] < first_batch["B"] <= first_batch["C"]
    assert [text_of(h, "B", i) for i in range(2)] == ["hi", "hi"]
    assert text_of(h, "C") == "y"
    assert h.pool.n_free == 3


def test_requests_wait_while_all_slots_are_taken() -> None:
    h = Harness(n_slots=1, step_tokens=4)
    h.add("A", "abc", max_tokens=3)
    b = h.add("B", "klm", max_tokens=2)
    h.step()
    assert b.status is RequestStatus.WAITING
    h.run()
    a_last = max(i for i, rec in enumerate(h.batches) for rid, _, _ in rec.decodes if rid == "A")
    b_first = min(i for i, rec in enumerate(h.batches) for rid, _, _ in rec.prefills if rid == "B")
    assert b_first == a_last + 1
    assert (text_of(h, "A"), text_of(h, "B")) == ("def", "no")


# -- n > 1 -------------------------------------------------------------------------------------

def test_n_choices_prefill_once_then_copy_to_siblings() -> None:
    h = Harness(n_slots=4, step_tokens=16)
    req = h.add("A", "abcd", n=3, max_tokens=3)
    h.run()
    first, second = h.batches[0], h.batches[1]
    # the prompt is computed once, in the first choice's slot
    assert first.tokens == encode("abcd") and set(first.slots) == {req.seqs[0].slot}
    assert first.copies == []
    # the next batch first copies it to the siblings, which then decode at len(prompt)
    src = req.seqs[0].slot
    assert sorted(second.copies) == sorted((src, s.slot) for s in req.seqs[1:])
    assert len({s.slot for s in req.seqs}) == 3
    assert second.positions == [4, 4, 4]
    assert sorted(second.slots) == sorted(s.slot for s in req.seqs)
    assert all(rec.copies == [] for rec in h.batches[2:])
    res = h.result("A")
    assert [res.choices[i].text for i in range(3)] == ["efg"] * 3
    assert res.usage.prompt_tokens == 4 and res.usage.completion_tokens == 9
    assert h.pool.n_free == 4


def test_n_choices_with_seeds_diverge_and_use_their_own_slot_kv() -> None:
    q = L("q")

    def nxt(hist):
        return coin(L("r"), L("x")) if hist == (q,) else sure(counting(hist))

    seed = find_seed(coin(L("r"), L("x")), [L("r"), L("x")])
    h = Harness(n_slots=2, step_tokens=4, model=scripted(nxt))
    h.add("A", [q], n=2, max_tokens=3, sampling=SamplingParams(temperature=1.0, seed=seed))
    h.run()
    res = h.result("A")
    assert (res.choices[0].text, res.choices[1].text) == ("rst", "xyz")


# -- prefix reuse ------------------------------------------------------------------------------

def test_prefix_reuse_takes_the_slot_and_prefills_only_the_rest() -> None:
    h = Harness(n_slots=2, step_tokens=16)
    a = h.add("A", "abc", max_tokens=3)          # its slot then caches a b c d e ("f" never fed)
    h.run()
    slot = a.seqs[0].slot
    assert h.pool.cached[slot] == encode("abcde")
    n_before = len(h.batches)
    b = h.add("B", "abcdxy", max_tokens=1)
    h.run()
    first = h.batches[n_before]
    assert b.seqs[0].slot == slot
    # only the prompt-computed "abc" is reused: "d" was decoded alone (another kernel path)
    assert first.truncations == [(slot, 3)]
    assert first.prefills == [("B", 3, 6)]
    assert first.positions == [3, 4, 5] and first.tokens == encode("dxy")
    assert text_of(h, "B") == "z"


def test_prefix_reuse_picks_the_longest_shared_prefix() -> None:
    h = Harness(n_slots=3, step_tokens=16)
    h.add("A", "abcd", max_tokens=1)
    h.add("B", "abxy", max_tokens=1)
    h.run()
    slot_a, slot_b = h.requests["A"].seqs[0].slot, h.requests["B"].seqs[0].slot
    n_before = len(h.batches)
    c = h.add("C", "abxyab", max_tokens=1)
    h.run()
    assert c.seqs[0].slot == slot_b != slot_a
    assert h.batches[n_before].truncations == [(slot_b, 4)]


def test_fully_cached_prompt_recomputes_its_last_token() -> None:
    h = Harness(n_slots=2, step_tokens=16)
    a = h.add("A", "abc", max_tokens=3)
    h.run()
    slot = a.seqs[0].slot
    n_before = len(h.batches)
    h.add("B", "abcde", max_tokens=3)            # all 5 tokens are in the cache, "de" decoded
    h.run()
    first = h.batches[n_before]
    assert first.truncations == [(slot, 3)]
    assert first.prefills == [("B", 3, 5)] and first.logits == [False, True]
    assert text_of(h, "B") == "fgh"
    # the same prompt again: its last two tokens are recomputed (a one-token chunk would not
    # be the computation a cold prefill does)
    n_before = len(h.batches)
    h.add("C", "abc", max_tokens=3)
    h.run()
    assert h.batches[n_before].truncations == [(slot, 1)]
    assert h.batches[n_before].prefills == [("C", 1, 3)]
    assert text_of(h, "C") == "def"


def test_prefix_cache_off_prefills_everything() -> None:
    h = Harness(n_slots=1, step_tokens=16, prefix_cache=False)
    h.add("A", "abc", max_tokens=3)
    h.run()
    n_before = len(h.batches)
    h.add("B", "abcde", max_tokens=2)
    h.run()
    assert h.batches[n_before].truncations == [(0, 0)]
    assert h.batches[n_before].prefills == [("B", 0, 5)]
    assert text_of(h, "B") == "fg"


def test_reused_and_fresh_prompts_give_the_same_output() -> None:
    prompts = ["abcdef", "abcxyz", "abcdefgh", "ab", "abcdefghij"]
    outs = {}
    for cache in (True, False):
        h = Harness(n_slots=2, step_tokens=4, prefix_cache=cache)
        for i, p in enumerate(prompts):
            h.add(f"R{i}", p, max_tokens=4)
            h.run()
        outs[cache] = [text_of(h, f"R{i}") for i in range(len(prompts))]
    assert outs[True] == outs[False]


def test_slot_pool_acquire_prefers_empty_then_least_recently_used() -> None:
    pool = SlotPool(3)
    slots, shared = pool.acquire([1, 2, 3], 1, reuse=True)
    assert (slots, shared) == ([0], 0)
    pool.cached[0] = [1, 2, 3]
    pool.release(0)
    # an empty slot is cheaper than one whose cache would be lost
    slots, shared = pool.acquire([9], 2, reuse=True)
    assert (sorted(slots), shared) == ([1, 2], 0)
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2



def test_slot_pool_keeps_busy_ids_in_one_run_unless_a_cache_spares_much_more() -> None:
    """llama.cpp decodes only consecutive sequence ids in one ubatch, each ubatch a pass over all
    the weights: a slot next to the busy ones is taken over one whose cache spares fewer than
    RUN_TOKENS more tokens, and not over one that spares more."""
    pool = SlotPool(4)
    template = list(range(100, 140))                      # a chat template both prompts share
    old, new = template + [1, 2, 3, 4, 5, 6], template + [7, 8]
    for slot, cached in ((0, old), (1, template[:30])):
        pool.acquire([], 1, reuse=False)
        pool.cached[slot], pool.reusable[slot] = list(cached), len(cached)
    pool.acquire([], 2, reuse=False)                      # slots 2 and 3 busy
    pool.release(0)
    pool.release(1)
    # slot 0 spares 40 tokens, slot 1 (beside the busy 2) spares 30: 10 more is not worth a run
    assert pool.acquire(new, 1, reuse=True) == ([1], 30)
    pool.release(1)
    pool.cached[0] = pool.cached[0] + list(range(RUN_TOKENS))
    pool.reusable[0] = len(pool.cached[0])
    longer = pool.cached[0] + [9]                         # slot 0 spares RUN_TOKENS + 46 tokens
    assert pool.acquire(longer, 1, reuse=True) == ([0], len(longer) - 1)


# -- freeing -----------------------------------------------------------------------------------

def test_slots_freed_on_finish() -> None:
    h = Harness(n_slots=3, step_tokens=8)
    h.add("A", "ab", n=2, max_tokens=2)
    h.add("B", "x", max_tokens=5)                # "yz" then EOG
    h.step()
    assert h.pool.n_free == 0
    h.run()
    assert h.pool.n_free == 3
    assert h.sched.running == [] and not h.sched.has_work
    assert text_of(h, "B") == "yz" and h.result("B").choices[0].finish is FinishReason.STOP


def test_abort_running_and_waiting_frees_slots() -> None:
    h = Harness(n_slots=2, step_tokens=8)
    a = h.add("A", "ab", n=2, max_tokens=10)
    b = h.add("B", "cd", max_tokens=10)
    h.step()
    h.step()
    assert h.pool.n_free == 0 and b.status is RequestStatus.WAITING
    err = EngineError("cancelled")
    h.core.abort("A", err)
    assert a.status is RequestStatus.ABORTED
    assert h.pool.n_free == 2
    assert h.sinks["A"][-1] is err
    h.core.abort("B")                            # waiting, no error: silent
    assert b.status is RequestStatus.ABORTED and not h.sched.waiting
    assert h.sinks["B"] == []
    h.core.abort("nobody")                       # unknown id: nothing happens
    assert not h.step()
    h.check()
    res = h.result("A")
    assert res.usage is None and isinstance(res.error, EngineError)


# -- status transitions ------------------------------------------------------------------------

ALLOWED = {(RequestStatus.WAITING, RequestStatus.RUNNING), (RequestStatus.WAITING, RequestStatus.ABORTED),
           (RequestStatus.RUNNING, RequestStatus.FINISHED), (RequestStatus.RUNNING, RequestStatus.ABORTED),
           (RequestStatus.RUNNING, RequestStatus.WAITING)}     # a batch request preempted


@pytest.mark.parametrize("old,new", list(itertools.product(RequestStatus, RequestStatus)))
def test_status_transitions(old: RequestStatus, new: RequestStatus) -> None:
    req = Harness(n_slots=1).build("A", "a")
    req.status = old
    if (old, new) in ALLOWED:
        req.set_status(new)
        assert req.status is new
    else:
        with pytest.raises(AssertionError):
            req.set_status(new)
        assert req.status is old


def test_finished_request_cannot_be_retired_again() -> None:
    h = Harness(n_slots=1)
    a = h.add("A", "a", max_tokens=1)
    h.run()
    assert a.status is RequestStatus.FINISHED
    with pytest.raises(AssertionError):
        h.sched.retire(a, RequestStatus.ABORTED)


# -- KV bookkeeping bugs -----------------------------------------------------------------------
# LlamaCppRunner applies a batch's truncations (this step's admissions) BEFORE its copies
# (last step's finished prompts). When a choice finishes on its very first token, its request
# can release the copy's source or destination slot before the copy is applied, and the next
# admission then truncates that slot first.

def test_copy_destination_of_a_finished_choice_matches_the_cache() -> None:
    h = Harness(n_slots=2, step_tokens=16)
    a = h.add("A", "abc", n=2, max_tokens=1)     # both choices finish on their first token
    h.step()
    assert a.status is RequestStatus.FINISHED
    h.add("B", "xy", max_tokens=1)               # takes slot 0, the pending copy's source
    h.step()                                     # scheduler: slot 1 caches "abc"; its KV must too
    h.add("C", "abcd", max_tokens=2)             # reuses slot 1's "abc"
    h.run()
    res = h.result("C")
    assert res.error is None and res.choices[0].text == "ef"


def test_running_sibling_keeps_the_prompt_when_the_copy_source_is_reused() -> None:
    q, r = L("q"), L("r")

    def nxt(hist):
        return coin(EOG, r) if hist == (q,) else sure(counting(hist))

    seed = find_seed(coin(EOG, r), [EOG, r])     # choice 0 ends at once, choice 1 goes on
    h = Harness(n_slots=2, step_tokens=8, model=scripted(nxt))
    h.add("A", [q], n=2, max_tokens=4, sampling=SamplingParams(temperature=1.0, seed=seed))
    h.step()
    h.add("B", "xy", max_tokens=1)               # takes slot 0 before choice 1's copy is applied
    h.run()
    res = h.result("A")
    assert res.error is None
    assert (res.choices[0].text, res.choices[1].text) == ("", "rstu")
    assert text_of(h, "B") == "z"


def test_pending_copies_survive_a_step_with_nothing_to_run() -> None:
    h = Harness(n_slots=2, step_tokens=16)
    h.add("A", "abc", n=2, max_tokens=1)
    h.step()
    assert not h.step()                          # e.g. woken by an abort of a finished request
    h.add("B", "xy", max_tokens=1)               # slot 0
    h.add("C", "abcd", max_tokens=2)             # slot 1, reusing "abc"
    h.run()
    res = h.result("C")
    assert res.error is None and res.choices[0].text == "ef"


def test_failed_batch_does_not_forget_a_slot_another_request_took() -> None:
    """A's choice 0 finished earlier; its slot went to B, which got no room in the failing
    batch. Discarding A's KV must not wipe B's slot: B's prefix stays in that KV."""
    p, q, r = L("p"), L("q"), L("r")

    def nxt(hist):
        return coin(EOG, r) if hist == (p, q) else sure(counting(hist))

    seed = find_seed(coin(EOG, r), [EOG, r])
    h = Harness(n_slots=3, step_tokens=5, model=scripted(nxt))
    a = h.add("A", [p, q], n=2, max_tokens=5, sampling=SamplingParams(temperature=1.0, seed=seed))
    h.add("C", "abcdefghij", max_tokens=2)
    h.step()                                     # A: choice 0 -> EOG, its slot is free again
    assert a.seqs[0].finished and not a.seqs[1].finished
    b = h.add("B", [p, q, L("x"), L("y")], max_tokens=1)   # takes that slot, reusing "pq"
    broken = {a.seqs[1].slot, h.requests["C"].seqs[0].slot}
    h.runner.fail_decodes_touching(*broken)
    h.step()                                     # A's decode + C's chunk fill the step; both fail
    h.runner.ctx.fail_when = None
    assert b.seqs[0].slot == a.seqs[0].slot and b.num_computed == 2
    assert not any(rid == "B" for rec in h.batches[-3:] for rid, _, _ in rec.prefills)
    assert isinstance(h.result("A").error, EngineError) and isinstance(h.result("C").error, EngineError)
    h.run()
    assert text_of(h, "B") == "z"
    assert h.pool.n_free == 3


# -- randomized: outputs must not depend on load, chunking or the prefix cache -------------------

def _scenario(seed: int) -> int:
    """Runs one workload and checks it; returns the batch preemptions it had."""
    rnd = random.Random(seed)
    n_slots = rnd.randint(1, 4)
    h = Harness(n_slots=n_slots, step_tokens=rnd.randint(n_slots + 2, 8), prefix_cache=rnd.random() < 0.8)
    bases = ["abcdefgh", "abcxyz", "klmnop", "ab"]
    specs, arrivals = {}, {}
    priorities = random.Random(seed * 7919 + 1)      # apart, so the workloads stay what they were
    for i in range(rnd.randint(3, 10)):
        base = rnd.choice(bases)
        prompt = base[:rnd.randint(1, len(base))] + "".join(rnd.choice(LETTERS) for _ in range(rnd.randint(0, 3)))
        kw = dict(n=rnd.randint(1, n_slots), max_tokens=rnd.randint(1, 6),
                  stop=tuple(rnd.sample(["de", "q", "xyz", "mn"], rnd.randint(0, 2))), echo=rnd.random() < 0.2,
                  sampling=SamplingParams(temperature=rnd.choice([0.0, 0.0, 1.5]), seed=rnd.randint(0, 99),
                                          logprobs=rnd.choice([None, None, 0, 2])),
                  priority="batch" if priorities.random() < 0.4 else "interactive")
        specs[f"R{i}"] = (prompt, kw)
        arrivals.setdefault(rnd.randint(0, 12), []).append(f"R{i}")
    abort_at = {rnd.randint(0, 12): f"R{rnd.randrange(len(specs))}"} if rnd.random() < 0.3 else {}
    fail_at = rnd.randint(1, 12) if rnd.random() < 0.2 else None
    skip = set()
    for t in range(200):
        for rid in arrivals.get(t, []):
            h.add(rid, specs[rid][0], **specs[rid][1])
        if t in abort_at and abort_at[t] in h.requests:
            h.core.abort(abort_at[t])
            skip.add(abort_at[t])
        if t == fail_at:
            h.runner.fail_next_decode()
        if not h.step() and t > 12:
            break
    assert not h.sched.has_work and h.pool.n_free == n_slots
    for rid, (prompt, kw) in specs.items():
        res = h.result(rid)
        if rid in skip or res.error is not None:
            continue
        alone = Harness(n_slots=4, step_tokens=8, prefix_cache=False)
        alone.add(rid, prompt, **kw)
        alone.run()
        ref = alone.result(rid)
        for i in range(kw["n"]):
            a, b = res.choices[i], ref.choices[i]
            assert (a.text, a.finish, a.logprobs) == (b.text, b.finish, b.logprobs), (rid, i)
        # the same tokens counted; what the prefix cache held (cached_tokens) is the load's doing
        assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (ref.usage.prompt_tokens,
                                                                          ref.usage.completion_tokens)
        assert ref.usage.cached_tokens == 0 and 0 <= res.usage.cached_tokens < res.usage.prompt_tokens
    return h.sched.preemptions


def test_outputs_do_not_depend_on_load_chunking_or_cache() -> None:
    """30 seeded random workloads (arrivals, n, stops, echo, logprobs, sampling, priorities, an
    abort, a failed decode); every request that completes must match the same request run alone,
    batch-priority ones preempted or not."""
    failed, preemptions = [], 0
    for seed in range(30):
        try:
            preemptions += _scenario(seed)
        except AssertionError as exc:
            failed.append((seed, f"{type(exc).__name__}: {str(exc)[:200]}"))
    assert not failed, f"{len(failed)}/30 workloads broke; first: {failed[0]}"
    assert preemptions > 0


# -- echo + logprobs: the logits rows one step holds --------------------------------------------

def test_echo_logprobs_rows_are_bounded_per_step_not_per_prompt() -> None:
    """16 prompts with echo + logprobs admitted at once: a step scores at most PROMPT_LOGITS_ROWS
    prompt tokens over all of them (a row of the vocabulary each, copied until scored: 512 rows,
    1 GiB on gemma3, when the bound was per prompt), and each prompt's logprobs are what it
    gets alone."""
    prompts = {f"P{i}": encode(LETTERS[i:] + LETTERS * 2) for i in range(16)}      # 40-60 tokens
    h = Harness(n_slots=16, step_tokens=1024)
    for rid, prompt in prompts.items():
        h.add(rid, prompt, echo=True, max_tokens=2, sampling=SamplingParams(logprobs=1))
    h.run(max_steps=500)
    for rec in h.batches:
        prefill_rows = sum(rec.logits[len(rec.decodes):])
        # the scored rows, and at most one more per chunk (a prompt's last token)
        assert prefill_rows <= PROMPT_LOGITS_ROWS + len(rec.prefills), (prefill_rows, rec.prefills)
    assert h.runner._runner.peak_step_rows <= PROMPT_LOGITS_ROWS + 16
    for rid, prompt in prompts.items():
        alone = Harness(n_slots=16, step_tokens=1024)
        alone.add(rid, prompt, echo=True, max_tokens=2, sampling=SamplingParams(logprobs=1))
        alone.run(max_steps=100)
        got, ref = text_of(h, rid), text_of(alone, rid)
        assert got == ref
        assert h.result(rid).choices[0].logprobs == alone.result(rid).choices[0].logprobs, rid
