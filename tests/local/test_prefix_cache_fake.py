"""The host prefix cache (local/prefix_cache.py) with the scheduler and the real runner on a
FakeContext: saves happen when a slot is overwritten, restores put the exact KV back (the fake
context checks every position), the byte bound and LRU order hold."""

from __future__ import annotations

from fake_engine import Harness, encode

from modelyard.local.prefix_cache import MIN_TOKENS, HostCache

LONG_A = "abcdefghij" * 4          # 40 tokens: above MIN_TOKENS
LONG_B = "klmnopqrst" * 4
LONG_C = "uvwxyuvwxy" * 4


def text_of(h: Harness, rid: str) -> str:
    return h.result(rid).choices[0].text


def run_one(h: Harness, rid: str, prompt: str, **kw):
    req = h.add(rid, prompt, max_tokens=3, **kw)
    h.run()
    assert h.result(rid).error is None
    return req


def test_an_overwritten_slot_is_saved_and_restored_exactly() -> None:
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=1_000_000)
    run_one(h, "A1", LONG_A)
    run_one(h, "B", LONG_B)                     # takes A's only slot: A's prefix goes to host
    assert len(h.host_cache) == 1 and h.host_cache.saves == 1
    n_before = len(h.batches)
    run_one(h, "A2", LONG_A)
    first = h.batches[n_before]
    # A's 40 prompt tokens come back from host memory; the last two are always computed.
    assert ("restore", 0) in h.runner.ctx.ops
    assert first.prefills == [("A2", 38, 40)]
    assert h.host_cache.hits == 1 and h.host_cache.hit_tokens == 40
    assert h.sched.reused_tokens == 38
    assert text_of(h, "A2") == text_of(h, "A1")


def test_only_the_prompt_computed_prefix_is_saved() -> None:
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=1_000_000)
    run_one(h, "A", LONG_A)                     # the slot then holds 40 prompt + 2 decoded tokens
    run_one(h, "B", LONG_B)
    entry, shared = h.host_cache.best(encode(LONG_A + "zz"))
    assert entry is not None and entry.tokens == tuple(encode(LONG_A)) and shared == 40
    assert h.host_cache.bytes == 100 * 40       # the fake's size: decoded tokens were cut first


def test_a_free_slot_with_the_longer_prefix_wins_over_the_host_copy() -> None:
    h = Harness(n_slots=2, step_tokens=64, host_cache_bytes=1_000_000)
    run_one(h, "A", LONG_A)
    run_one(h, "B", LONG_B)
    restores = [op for op in h.runner.ctx.ops if op[0] == "restore"]
    run_one(h, "A2", LONG_A)                    # A's slot still holds it: no host traffic
    assert [op for op in h.runner.ctx.ops if op[0] == "restore"] == restores
    assert h.host_cache.hits == 0


def test_short_prefixes_are_not_saved() -> None:
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=1_000_000)
    run_one(h, "A", "abcdefgh")                 # 8 tokens < MIN_TOKENS
    run_one(h, "B", LONG_B)
    assert len(h.host_cache) == 0 and MIN_TOKENS > 8


def test_bytes_stay_within_capacity_least_recently_used_out() -> None:
    # Room for two 40-token entries (100 fake bytes a token).
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=8_000)
    for rid, prompt in (("A", LONG_A), ("B", LONG_B), ("C", LONG_C), ("D", "zyxwvutsrq" * 4)):
        run_one(h, rid, prompt)
        assert h.host_cache.bytes <= 8_000
    # A, B, C were saved in turn; A was the least recently used when C's save needed room.
    assert h.host_cache.evictions == 1
    assert h.host_cache.best(encode(LONG_A))[1] == 0
    assert h.host_cache.best(encode(LONG_B))[1] == 40 and h.host_cache.best(encode(LONG_C))[1] == 40


def test_no_host_cache_without_prefix_cache() -> None:
    h = Harness(n_slots=1, step_tokens=64, prefix_cache=False, host_cache_bytes=1_000_000)
    run_one(h, "A", LONG_A)
    run_one(h, "B", LONG_B)
    run_one(h, "A2", LONG_A)
    assert len(h.host_cache) == 0 and h.host_cache.hits == 0
    assert text_of(h, "A2") == text_of(h, "A")


def test_restore_then_longer_prompt_extends_the_entry() -> None:
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=1_000_000)
    run_one(h, "A", LONG_A)
    run_one(h, "B", LONG_B)
    run_one(h, "A+", LONG_A + "klmno")          # restores A's 40, computes the rest
    run_one(h, "C", LONG_C)                     # overwrites: A+ (45 tokens) replaces A's entry
    entries = [h.host_cache.best(encode(p))[1] for p in (LONG_A + "klmno", LONG_B)]
    assert entries == [45, 40] and len(h.host_cache) == 2


def test_a_partition_reuses_only_its_own_prefixes_in_slots_and_host_memory() -> None:
    """Tenant isolation (issue 19): B's copy of A's prompt finds neither A's slot nor A's host
    entry, and is saved apart from it; each tenant's repeat still reuses its own."""
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=1_000_000)
    run_one(h, "A1", LONG_A, cache_partition="a")
    run_one(h, "B1", LONG_A, cache_partition="b")        # A's slot, same tokens: no reuse
    assert h.sched.reused_tokens == 0 and h.host_cache.hits == 0
    assert h.host_cache.saves == 1                      # A's prefix went to host, as A's
    assert h.host_cache.best(encode(LONG_A), "b") == (None, 0)
    run_one(h, "A2", LONG_A, cache_partition="a")        # A's own entry comes back
    assert h.host_cache.hits == 1 and h.sched.reused_tokens == 38
    run_one(h, "B2", LONG_A, cache_partition="b")        # and B's own, saved when A2 took the slot
    assert h.host_cache.hits == 2 and h.sched.reused_tokens == 76
    assert len(h.host_cache) == 2                       # the same tokens, once per partition
    assert {text_of(h, r) for r in ("A1", "B1", "A2", "B2")} == {text_of(h, "A1")}


def test_a_slot_is_reused_only_by_its_partition() -> None:
    h = Harness(n_slots=2, step_tokens=64)
    a = run_one(h, "A", LONG_A, cache_partition="a")
    b = run_one(h, "B", LONG_A, cache_partition="b")
    assert b.seqs[0].slot != a.seqs[0].slot and h.sched.reused_tokens == 0
    a2 = run_one(h, "A2", LONG_A, cache_partition="a")
    assert a2.seqs[0].slot == a.seqs[0].slot and h.sched.reused_tokens == 38


# -- the pure bookkeeping -----------------------------------------------------------------------

def test_host_cache_put_skips_what_it_cannot_hold_and_dedupes_prefixes() -> None:
    c = HostCache(1000)
    c.put(range(40), "s1", 2000)                # larger than the whole cache
    assert len(c) == 0 and c.bytes == 0
    c.put(range(40), "s1", 400)
    assert not c.worth_saving(list(range(35)))  # held already, as a prefix of an entry
    assert c.worth_saving(list(range(41)))
    c.put(range(50), "s2", 500)                 # supersedes the 40-token entry
    assert len(c) == 1 and c.bytes == 500
    entry, shared = c.best(list(range(45)) + [999])
    assert entry is not None and entry.state == "s2" and shared == 45


def test_host_cache_entries_of_other_partitions_are_neither_found_nor_superseded() -> None:
    c = HostCache(10_000)
    c.put(range(40), "a", 400, partition="a")
    assert c.worth_saving(list(range(40)), "b") and not c.worth_saving(list(range(40)), "a")
    c.put(range(50), "b", 500, partition="b")           # a longer prefix, but not a's
    assert len(c) == 2
    assert c.best(list(range(50)), "a")[0].state == "a" and c.best(list(range(50)), "a")[1] == 40
    assert c.best(list(range(50)), "b")[1] == 50 and c.best(list(range(50)))[0] is None


def test_shared_prefix_against_the_obvious_loop() -> None:
    import numpy as np

    from modelyard.local.slots import common_prefix, shared_prefix
    rng = np.random.default_rng(3)
    for _ in range(200):
        a = rng.integers(0, 3, rng.integers(0, 12))
        b = rng.integers(0, 3, rng.integers(0, 12))
        assert shared_prefix(a, b) == common_prefix(a.tolist(), b.tolist())


def test_a_restore_must_spare_as_many_tokens_as_a_save_holds() -> None:
    """A prompt sharing fewer than MIN_TOKENS with an entry (its BOS, a few words) prefills them:
    a restore copies the entry's whole KV in (it did, for one token, on every c=16 request)."""
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=1_000_000)
    run_one(h, "A", LONG_A)
    run_one(h, "B", LONG_B)                     # A's prefix goes to host
    run_one(h, "A-ish", LONG_A[:MIN_TOKENS - 1] + "zzzzzzzzzz")
    assert h.host_cache.hits == 0 and not [op for op in h.runner.ctx.ops if op[0] == "restore"]
    run_one(h, "B2", LONG_B)                    # the slot shares nothing with what comes next
    hits, tokens = h.host_cache.hits, h.host_cache.hit_tokens
    run_one(h, "A-more", LONG_A[:MIN_TOKENS + 2] + "zzzzzzzzzz")
    assert (h.host_cache.hits - hits, h.host_cache.hit_tokens - tokens) == (1, MIN_TOKENS + 2)


WINDOW = 16      # a sliding window shorter than the entries (gemma3's is 512)


def test_an_entry_longer_than_the_window_is_restored_only_to_be_continued() -> None:
    """With sliding-window layers a restored entry lacks the cells out of its last position's
    window: a prompt that keeps fewer than all but its last token must prefill from the start."""
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=1_000_000, window=WINDOW)
    run_one(h, "A", LONG_A)
    run_one(h, "B", LONG_B)                     # A's 40 tokens go to host
    n = len(h.batches)
    run_one(h, "A-cut", LONG_A[:30] + "zzzzzzzzzz")     # shares 30 of 40: would cut it short
    assert h.host_cache.hits == 0
    assert h.batches[n].prefills[0][1] == 0             # prefilled from position 0
    run_one(h, "B2", LONG_B)
    run_one(h, "A-next", LONG_A + "zzzzzzzz")           # a next turn: keeps all 40
    assert h.host_cache.hits == 1
    assert ("restore", 0) in h.runner.ctx.ops
    # Without a window (or an entry within it) the cut restore is fine, as before.
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=1_000_000, window=64)
    run_one(h, "A", LONG_A)
    run_one(h, "B", LONG_B)
    run_one(h, "A-cut", LONG_A[:34] + "zzzzzzzzzz")
    assert h.host_cache.hits == 1


def test_a_restored_slot_is_not_cut_below_the_entry_later() -> None:
    """After such a restore the slot's own prefix may not be reused shorter either: the next
    prompt that shares less of it prefills from the start (and the slot's floor goes)."""
    h = Harness(n_slots=1, step_tokens=64, host_cache_bytes=1_000_000, window=WINDOW)
    run_one(h, "A", LONG_A)
    run_one(h, "B", LONG_B)
    run_one(h, "A-next", LONG_A + "zzzzzzzz")           # restored: the slot may not go below 39
    assert h.host_cache.hits == 1 and h.pool.floor[0] == len(LONG_A) - 1
    n = len(h.batches)
    run_one(h, "A-cut", LONG_A[:30] + "yyyyyyyy")       # shares 30 with the slot
    assert h.batches[n].prefills[0][1] == 0
    assert h.pool.floor[0] == 0
    fresh = Harness(n_slots=1, step_tokens=64)
    run_one(fresh, "A-cut", LONG_A[:30] + "yyyyyyyy")
    assert text_of(h, "A-cut") == text_of(fresh, "A-cut")
