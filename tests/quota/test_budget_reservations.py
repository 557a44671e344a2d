"""A budget holds what requests reserve, as tpm does (hole 2 of issue 20): without max_parallel, a
burst of requests each reserving prompt + max_tokens gets in only while the reservations fit in
the budget; settling replaces a reservation by what was used. In memory (the usage table, as
control/budget.BudgetBook has it, plus this process's reservations) and in Redis (one counter,
increased at reserve and corrected at settle, an overage included)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from modelyard.errors import RateLimited
from modelyard.quota.memory import MemoryQuotas
from modelyard.quota.redis import RedisQuotas

KEY = b"\x03" * 32


class Book:
    """control/budget.BudgetBook's answer, set by the test: the usage recorded for the period."""

    def __init__(self) -> None:
        self.usage = 0

    def used(self, key_id: str, period: str) -> int:
        return self.usage


def budgeted(backend, budget: int = 1000):
    q = backend.quota(0, 0, KEY)
    q.budget_tokens, q.budget_period, q.book = budget, "day", Book()
    return q


async def burst(q, n: int = 100, tokens: int = 500) -> list:
    out = await asyncio.gather(*(q.reserve(tokens) for _ in range(n)), return_exceptions=True)
    refused = [r for r in out if isinstance(r, BaseException)]
    assert all(isinstance(r, RateLimited) and r.code == "budget_exceeded" for r in refused), refused[:1]
    return [r for r in out if not isinstance(r, BaseException)]


def test_memory_budget_holds_reservations():
    async def main():
        q = budgeted(MemoryQuotas())
        assert q.metered
        held = await burst(q)
        assert len(held) == 2                    # 2 x 500 = 1000: the rest refused, not admitted
        with pytest.raises(RateLimited) as err:
            await q.reserve(1)
        assert "0 used this day, 1000 reserved by requests in flight, 0 left" in err.value.message
        assert err.value.retry_after == 1.0      # what is held comes back as they end
        q.book.usage = 300                       # the first one's usage row, recorded before it settles
        await q.settle(held[0], 300)
        await q.settle(held[0], 300)             # once per reservation
        assert len(await burst(q, 10, 100)) == 2  # 300 used + 500 reserved: 200 left
        with pytest.raises(RateLimited) as err:
            await q.reserve(1001)
        assert "more than the whole budget" in err.value.message
    asyncio.run(main())


def test_memory_budget_exhausted_refuses_admission():
    async def main():
        q = budgeted(MemoryQuotas(), 100)
        q.book.usage = 100
        with pytest.raises(RateLimited) as err:
            await q.admit()
        assert err.value.code == "budget_exceeded" and "100 used this day" in err.value.message
    asyncio.run(main())


def test_redis_budget_holds_reservations_across_processes(redis_url):
    url, _ = redis_url

    async def main():
        # The claim here is the shared counter's atomicity, not the fallback: a burst of 100 calls
        # on a loaded machine can pass the 0.25 s bound, so these clients get a generous one
        # (the fallback has tests of its own, in test_shared_quota and test_leases).
        a, b = (RedisQuotas(url, 2, client=aioredis.Redis.from_url(url, socket_timeout=10)) for _ in range(2))
        qa, qb = budgeted(a), budgeted(b)
        await qa.admit()                         # connected before the burst
        await qb.admit()
        both = await asyncio.gather(burst(qa, 50), burst(qb, 50))
        held = both[0] + both[1]
        assert len(held) == 2 and not (a.fallback or b.fallback)     # 2 x 500: one counter, atomic
        with pytest.raises(RateLimited) as err:
            await qb.reserve(1)
        assert "1000 used this day" in err.value.message and "0 left" in err.value.message
        await qa.settle(held[0], 100)            # used 100 of 500: 400 come back, in both processes
        assert len(await burst(qb, 10, 100)) == 4
        await qa.settle(held[0], 500)            # once per reservation
        with pytest.raises(RateLimited):
            await qb.reserve(1)
        await a.close()
        await b.close()
    asyncio.run(main())


def test_redis_settle_charges_an_overage(redis_url):
    url, _ = redis_url

    async def main():
        backend = RedisQuotas(url, 1)
        q = backend.quota(0, 100, KEY)
        q.budget_tokens, q.budget_period = 1000, "day"
        await q.settle(await q.reserve(10), 90)   # a bound that was too low: 80 more, in both
        with pytest.raises(RateLimited) as err:
            await q.reserve(20)
        assert "90 used in the last minute" in err.value.message
        q.tpm = 0
        await q.reserve(910)
        with pytest.raises(RateLimited) as err:
            await q.reserve(1)
        assert err.value.code == "budget_exceeded"
        await backend.close()
    asyncio.run(main())
