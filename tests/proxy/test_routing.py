"""proxy/routing as pure logic: prefix matching, the load margin (absolute and relative),
rendezvous placement shared by independent routers, removal moving only the removed replica's
share, session affinity, the LRU bound."""

from __future__ import annotations

import random

import pytest

from modelyard.proxy.routing import (BLOCK_CHARS, Candidate, PrefixIndex, Router, block_hashes, overloaded,
                                     rendezvous)

URLS = ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1", "http://10.0.0.3:8000/v1"]
SYSTEM = "You are a careful assistant who answers in French. " * 8     # 416 characters: 6 blocks


def router(**kw) -> Router:
    args = dict(abs_threshold=4, rel_threshold=1.5, capacity=10_000)
    args.update(kw)
    return Router("prefix", **args)


def idle(names=URLS, **loads) -> list[Candidate]:
    return [Candidate(n, loads.get(f"r{i}", 0)) for i, n in enumerate(names)]


def test_block_hashes_are_chained_prefixes():
    a = block_hashes(SYSTEM + "question one")
    b = block_hashes(SYSTEM + "another question entirely, longer than one block of text for sure....")
    assert len(a) == len(SYSTEM + "question one") // BLOCK_CHARS
    shared = len(SYSTEM) // BLOCK_CHARS
    assert a[:shared] == b[:shared]
    # a change in block 0 changes every later hash (chained), even where the text is equal
    c = block_hashes("X" + SYSTEM[1:] + "question one")
    assert not set(a) & set(c)
    # short prompts still get one (partial) block to be placed by; empty text none
    assert len(block_hashes("hi")) == 1 and block_hashes("") == []
    # partitions never share hashes
    assert not set(block_hashes(SYSTEM, salt="key-a")) & set(block_hashes(SYSTEM, salt="key-b"))


def test_longest_prefix_wins():
    r = router()
    conversation = SYSTEM + "user: tell me about Paris\nassistant: it is the capital\n"
    r.record(URLS[1], block_hashes(SYSTEM))                 # only the system prompt
    r.record(URLS[2], block_hashes(conversation))           # the whole conversation so far
    d = r.choose(idle(), conversation + "user: and Lyon?")
    assert d.order[0] == URLS[2] and d.reason == "prefix"
    assert d.matched_blocks == len(conversation) // BLOCK_CHARS
    d = r.choose(idle(), SYSTEM + "a different question")
    assert d.order[0] in (URLS[1], URLS[2]) and d.matched_blocks == len(SYSTEM) // BLOCK_CHARS


def test_the_load_margin_is_absolute_and_relative():
    assert not overloaded(5, 0, abs_threshold=5, rel_threshold=1.5)       # difference not above abs
    assert overloaded(6, 0, abs_threshold=5, rel_threshold=1.5)
    assert not overloaded(30, 24, abs_threshold=5, rel_threshold=1.5)     # diff 6 > 5, ratio 1.25 < 1.5
    assert overloaded(40, 24, abs_threshold=5, rel_threshold=1.5)         # diff 16, ratio 1.67

    r = router(abs_threshold=5, rel_threshold=1.5)
    r.record(URLS[0], block_hashes(SYSTEM))
    text = SYSTEM + "q"
    assert r.choose(idle(r0=30, r1=24, r2=26), text).order[0] == URLS[0]      # busy, within the margin
    d = r.choose(idle(r0=40, r1=24, r2=26), text)
    assert d.order[0] == URLS[1] and d.reason == "spill" and d.spilled_from == URLS[0]
    assert r.choose(idle(r0=5, r1=0, r2=0), text).order[0] == URLS[0]
    assert r.choose(idle(r0=6, r1=0, r2=3), text).order[0] == URLS[1]


def test_two_independent_routers_place_new_prompts_alike():
    """Gateways that never talk: the same candidates give the same replica for the same first
    block, and different first blocks spread over all replicas."""
    a, b = router(), router()
    placed = {}
    for i in range(300):
        text = f"system prompt number {i:04d} " * 4 + "question"
        da, db = a.choose(idle(), text), b.choose(idle(), text)
        assert da.order == db.order and da.reason == "placement"
        placed[i] = da.order[0]
        # the same system prompt with another question: same replica
        assert a.choose(idle(), f"system prompt number {i:04d} " * 4 + "other").order[0] == placed[i]
    counts = [list(placed.values()).count(u) for u in URLS]
    assert min(counts) > 60, counts       # 100 each expected


def test_removing_a_replica_moves_only_its_share():
    keys = [f"key-{i}".encode() for i in range(3000)]
    before = {k: rendezvous(k, URLS)[0] for k in keys}
    after = {k: rendezvous(k, URLS[:1] + URLS[2:])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == URLS[1] for k in moved)
    assert len(moved) == sum(1 for k in keys if before[k] == URLS[1])
    # and what moved went to its second choice, spread over both survivors
    assert {after[k] for k in moved} == {URLS[0], URLS[2]}
    # through the router too: the decision's order is the failover order
    r = router()
    for i in range(200):
        text = f"prompt {i} " * 10
        d = r.choose(idle(), text)
        d2 = r.choose([c for c in idle() if c.name != URLS[1]], text)
        assert d2.order[0] == (d.order[0] if d.order[0] != URLS[1] else d.order[1])


def test_a_session_sticks_until_its_replica_is_overloaded():
    r = router()
    sessions = {f"user-{i}": r.choose(idle(), "turn 1", session=f"user-{i}").order[0] for i in range(60)}
    assert len(set(sessions.values())) == 3
    for s, home in sessions.items():
        for turn in range(2, 5):
            d = r.choose(idle(), f"turn {turn} " * 20, session=s)
            assert d.order[0] == home and d.reason == "session"
        assert router().choose(idle(), "x", session=s).order[0] == home       # another gateway agrees
    s, home = next(iter(sessions.items()))
    loads = {f"r{URLS.index(home)}": 10}
    d = r.choose(idle(**loads), "turn 5", session=s)
    assert d.order[0] != home and d.spilled_from == home


def test_the_index_is_lru_bounded():
    index = PrefixIndex(capacity=50)
    rng = random.Random(1)
    for _ in range(100):
        index.add(block_hashes("".join(rng.choice("abcdef") for _ in range(BLOCK_CHARS * 7))))
        assert len(index) <= 50
    recent = block_hashes("z" * BLOCK_CHARS * 10)
    index.add(recent)
    assert index.match(recent) == 10
    # a long prompt keeps its head: tails are evicted before the prefix they hang off
    long = block_hashes("y" * BLOCK_CHARS * 80)
    index.add(long)
    assert len(index) == 50 and index.match(long) == 50
    r = router(capacity=20)
    for i in range(50):
        r.record(URLS[0], block_hashes(f"{i:03d}" * 400))
    assert r.blocks(URLS[0]) == 20


def test_least_in_flight_keeps_todays_behaviour():
    r = Router("least_in_flight", abs_threshold=4, rel_threshold=1.5, capacity=10)
    cands = [Candidate(URLS[0], 0, 2), Candidate(URLS[1], 9, 0), Candidate(URLS[2], 0, 0)]
    firsts = {r.choose(cands, SYSTEM).order[0] for _ in range(4)}
    assert firsts == {URLS[1], URLS[2]}           # ties in turn, engine load ignored
    r.record(URLS[0], block_hashes(SYSTEM))
    assert r.blocks(URLS[0]) == 0                  # nothing indexed under this policy


def test_unknown_balance_is_refused():
    with pytest.raises(ValueError, match="balance"):
        Router("random", abs_threshold=1, rel_threshold=1, capacity=1)
