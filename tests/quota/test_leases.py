"""max_parallel and token budgets shared through a real redis-server: in-flight slots are leases
renewed by their holder and lapsing when it stops (a killed process frees its slots), budgets a
per-key per-period counter held at reserve and corrected at settle; with Redis hung, each
process's share (max_parallel / processes) and the budget against what Redis last said plus what
it charged since."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from modelyard.quota import redis as shared_quota
from modelyard.quota.policy import RETRY
from modelyard.quota.redis import RedisQuotas
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


async def refused(q, code: str) -> str:
    with pytest.raises(RateLimited) as err:
        await q.admit()
    assert err.value.code == code, err.value.message
    return err.value.message


def test_in_flight_slots_are_one_set_across_processes_and_renewed_while_held(redis_url):
    url, _ = redis_url

    async def main():
        a, b = RedisQuotas(url, 2), RedisQuotas(url, 2)
        try:
            qa, qb = limited(a, max_parallel=2), limited(b, max_parallel=2)
            held = [await qa.admit(), await qb.admit()]
            assert "2 requests in flight" in await refused(qb, "parallel_limit_exceeded")
            await asyncio.sleep(3 * shared_quota.LEASE)          # three lease lengths: renewed, still held
            await refused(qa, "parallel_limit_exceeded")
            held[0].release()
            held[0].release()                           # idempotent: frees one slot, not two
            await asyncio.sleep(0.05)                   # the release is sent in the background
            third = await qb.admit()
            await refused(qa, "parallel_limit_exceeded")
            third.release()
            held[1].release()
            await asyncio.sleep(0.05)
            assert [await qa.admit() is not None for _ in range(2)] == [True, True]
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())


def test_a_dead_holder_s_slots_lapse(redis_url):
    url, _ = redis_url

    async def main():
        dead, alive = RedisQuotas(url, 2), RedisQuotas(url, 2)
        try:
            await limited(dead, max_parallel=1).admit()
            await dead.close()                          # stops renewing, never releases: a killed process
            q = limited(alive, max_parallel=1)
            await refused(q, "parallel_limit_exceeded")
            deadline = time.monotonic() + 10 * shared_quota.LEASE
            while True:                                 # bounded: the lease lapses after LEASE
                try:
                    slot = await q.admit()
                    break
                except RateLimited:
                    assert time.monotonic() < deadline, "a dead process's lease never lapsed"
                    await asyncio.sleep(0.1)
            assert slot is not None
        finally:
            await alive.close()
    asyncio.run(main())


def test_budget_is_one_counter_per_period_held_at_reserve_and_settled(redis_url):
    import redis
    url, _ = redis_url

    async def main():
        a, b = RedisQuotas(url, 2), RedisQuotas(url, 2)
        qa, qb = limited(a, budget=30, period="month"), limited(b, budget=30, period="month")
        assert qa.metered and qb.metered
        await qa.admit()
        await qa.settle(await qa.reserve(25), 20)          # reserved 25, used 20: 20 charged
        await qb.admit()
        await qb.settle(None, 15)                          # after the fact (a remote engine)
        message = await refused(qa, "budget_exceeded")
        assert "30 tokens per month" in message and "35 used this month" in message and "resets at" in message
        await refused(qb, "budget_exceeded")
        qa.budget_tokens = qb.budget_tokens = 100          # raised through the control plane
        assert await qb.admit() is None
        await a.close()
        await b.close()
    asyncio.run(main())
    client = redis.Redis.from_url(url)
    names = [k.decode() for k in client.keys("*budget*")]
    assert len(names) == 1 and names[0].startswith("modelyard:q:") and 0 < client.ttl(names[0])


def test_hung_redis_gives_each_process_its_share_of_parallel_and_keeps_the_budget(redis_url):
    url, pid = redis_url

    async def main():
        backend = RedisQuotas(url, processes=2)
        try:
            q = limited(backend, max_parallel=4, budget=50, period="day")
            (await q.admit()).release()
            await q.settle(await q.reserve(10), 40)       # 40 of 50 in Redis (an overage of 30)
            os.kill(pid, signal.SIGSTOP)
            try:
                slots = [await q.admit(), await q.admit()]     # 4 / 2 processes
                assert backend.fallback
                await refused(q, "parallel_limit_exceeded")
                slots[0].release()
                await q.settle(None, 10)                    # charged here while Redis is down: owed
                assert "50 used" in await refused(q, "budget_exceeded")
            finally:
                os.kill(pid, signal.SIGCONT)
            slots[1].release()
            await asyncio.sleep(RETRY + 0.1)
            assert "50 used" in await refused(q, "budget_exceeded")    # what was owed reached Redis
            assert not backend.fallback
        finally:
            await backend.close()
    asyncio.run(main())
