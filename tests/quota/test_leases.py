"""max_parallel and token budgets shared through a real redis-server: in-flight slots are leases
renewed by their holder and lapsing when it stops (a killed process frees its slots), budgets a
per-key per-period counter charged as requests settle; with Redis hung, each process's share
(max_parallel / processes) and the budget against what Redis last said plus what it charged since."""

from __future__ import annotations

import os
import signal
import time

import pytest

from modelyard.quota import redis as shared_quota
from modelyard.quota.redis import RETRY, RedisQuotas
from modelyard.errors import RateLimited

KEY = b"\x02" * 32


@pytest.fixture(autouse=True)
def short_leases(monkeypatch):
    monkeypatch.setattr(shared_quota, "LEASE", 1.0)
    monkeypatch.setattr(shared_quota, "RENEW_EVERY", 0.2)


def limited(backend: RedisQuotas, max_parallel=0, budget=0, period=None):
    q = backend.quota(0, 0, KEY)
    q.max_parallel, q.budget_tokens, q.budget_period = max_parallel, budget, period
    return q


def refused(q, code: str) -> str:
    with pytest.raises(RateLimited) as err:
        q.admit(time.monotonic())
    assert err.value.code == code, err.value.message
    return err.value.message


def test_in_flight_slots_are_one_set_across_processes_and_renewed_while_held(redis_url):
    url, _ = redis_url
    a, b = RedisQuotas(url, 2), RedisQuotas(url, 2)
    try:
        qa, qb = limited(a, max_parallel=2), limited(b, max_parallel=2)
        held = [qa.admit(time.monotonic()), qb.admit(time.monotonic())]
        assert "2 requests in flight" in refused(qb, "parallel_limit_exceeded")
        time.sleep(3 * shared_quota.LEASE)          # three lease lengths: renewed, still held
        refused(qa, "parallel_limit_exceeded")
        held[0].release()
        held[0].release()                           # idempotent: frees one slot, not two
        third = qb.admit(time.monotonic())
        refused(qa, "parallel_limit_exceeded")
        third.release()
        held[1].release()
        assert [qa.admit(time.monotonic()) is not None for _ in range(2)] == [True, True]
    finally:
        a.close()
        b.close()


def test_a_dead_holder_s_slots_lapse(redis_url):
    url, _ = redis_url
    dead, alive = RedisQuotas(url, 2), RedisQuotas(url, 2)
    try:
        limited(dead, max_parallel=1).admit(time.monotonic())
        dead.close()                                # stops renewing, never releases: a killed process
        q = limited(alive, max_parallel=1)
        refused(q, "parallel_limit_exceeded")
        deadline = time.monotonic() + 10 * shared_quota.LEASE
        while True:                                 # bounded: the lease lapses after LEASE
            try:
                slot = q.admit(time.monotonic())
                break
            except RateLimited:
                assert time.monotonic() < deadline, "a dead process's lease never lapsed"
                time.sleep(0.1)
        assert slot is not None
    finally:
        alive.close()


def test_budget_is_one_counter_per_period_charged_on_settle(redis_url):
    url, _ = redis_url
    a, b = RedisQuotas(url, 2), RedisQuotas(url, 2)
    qa, qb = limited(a, budget=30, period="month"), limited(b, budget=30, period="month")
    assert qa.metered and qb.metered
    qa.admit(time.monotonic())
    qa.settle(qa.reserve(100, time.monotonic()), 20)      # reserved 100, used 20: 20 charged
    qb.admit(time.monotonic())
    qb.spend(15, time.monotonic())                         # after the fact (a remote engine)
    message = refused(qa, "budget_exceeded")
    assert "30 tokens per month" in message and "35 used this month" in message and "resets at" in message
    refused(qb, "budget_exceeded")
    qa.budget_tokens = qb.budget_tokens = 100              # raised through the control plane
    assert qb.admit(time.monotonic()) is None
    import redis
    names = [k.decode() for k in redis.Redis.from_url(url).keys("*budget*")]
    assert len(names) == 1 and names[0].startswith("modelyard:q:") and 0 < redis.Redis.from_url(url).ttl(names[0])


def test_hung_redis_gives_each_process_its_share_of_parallel_and_keeps_the_budget(redis_url):
    url, pid = redis_url
    backend = RedisQuotas(url, processes=2)
    try:
        q = limited(backend, max_parallel=4, budget=50, period="day")
        q.admit(time.monotonic()).release()
        q.settle(q.reserve(10, time.monotonic()), 40)       # 40 of 50 in Redis
        os.kill(pid, signal.SIGSTOP)
        try:
            slots = [q.admit(time.monotonic()), q.admit(time.monotonic())]     # 4 / 2 processes
            assert backend.fallback
            refused(q, "parallel_limit_exceeded")
            slots[0].release()
            q.spend(10, time.monotonic())                    # charged here while Redis is down: owed
            assert "50 used" in refused(q, "budget_exceeded")
        finally:
            os.kill(pid, signal.SIGCONT)
        slots[1].release()
        time.sleep(RETRY + 0.1)
        assert "50 used" in refused(q, "budget_exceeded")    # what was owed reached Redis on the next charge
        assert not backend.fallback
    finally:
        backend.close()
