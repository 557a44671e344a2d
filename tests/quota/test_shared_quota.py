"""Shared quotas on a real redis-server: several processes' worth of connections see one window;
admission is atomic; reservations settle; an unreachable Redis means a local share, never
unlimited, without stalling the event loop, and quotas are shared again once it answers."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from modelyard.quota.policy import RETRY
from modelyard.quota.redis import TIMEOUT, RedisQuotas
from modelyard.errors import RateLimited
from testkit.heartbeat import Heartbeat

KEY = b"\x01" * 32


def gateways(url: str, n: int) -> list[RedisQuotas]:
    return [RedisQuotas(url, processes=n) for _ in range(n)]


async def admitted(quota, tries: int) -> int:
    ok = 0
    for _ in range(tries):
        try:
            await quota.admit()
            ok += 1
        except RateLimited:
            pass
    return ok


def test_rpm_is_shared_by_every_process_and_admission_is_atomic(redis_url):
    url, _ = redis_url

    async def main():
        quotas = [g.quota(7, 0, KEY) for g in gateways(url, 4)]
        counts = await asyncio.gather(*(admitted(q, 10) for q in quotas))
        assert sum(counts) == 7, counts           # not 4 x 7: one window for the key
        with pytest.raises(RateLimited) as err:
            await quotas[0].admit()
        assert "7 requests per minute" in err.value.message and 0 < err.value.retry_after <= 60
    asyncio.run(main())


def test_tpm_reservations_settle_to_what_was_used_across_processes(redis_url):
    url, _ = redis_url

    async def main():
        a, b = (g.quota(0, 100, KEY) for g in gateways(url, 2))
        first = await a.reserve(60)
        with pytest.raises(RateLimited) as err:
            await b.reserve(50)                      # 60 + 50 > 100, seen from the other process
        assert "60 used in the last minute" in err.value.message
        await a.settle(first, 20)                    # it used less: the room comes back
        second = await b.reserve(50)
        await b.settle(second, 50)
        with pytest.raises(RateLimited):
            await a.reserve(31)
        await a.reserve(30)
        with pytest.raises(RateLimited) as err:
            await a.reserve(101)
        assert "more than the whole quota" in err.value.message
    asyncio.run(main())


def test_no_secret_reaches_redis(redis_url):
    import hashlib
    import redis
    url, _ = redis_url
    secret = b"sk-very-secret-key"

    async def main():
        quota = RedisQuotas(url, 1).quota(5, 0, hashlib.sha256(secret).digest())
        await quota.admit()
    asyncio.run(main())
    client = redis.Redis.from_url(url)
    names = [k.decode() for k in client.keys("*")]
    assert names and all(k.startswith("modelyard:q:") for k in names)
    assert hashlib.sha256(secret).hexdigest()[:16] not in "".join(names)


def test_an_unreachable_redis_means_a_local_share_then_back(redis_url):
    url, pid = redis_url

    async def main():
        backend = RedisQuotas(url, processes=4)
        quota = backend.quota(8, 0, KEY)
        assert await admitted(quota, 1) == 1 and not backend.fallback
        os.kill(pid, signal.SIGSTOP)                # Redis hangs: calls time out
        try:
            assert await admitted(quota, 5) == 2          # 8 / 4 processes, never unlimited
            assert backend.fallback and backend.fallbacks == 1
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(RETRY + 0.1)
        # Shared again: 8 in the window, less the one admitted before and the call that timed out
        # (it had reached Redis's socket, so Redis ran it on waking: over-counted, never under).
        assert await admitted(quota, 10) == 6
        assert not backend.fallback
    asyncio.run(main())


def test_a_hung_redis_never_stalls_the_event_loop(redis_url):
    """With Redis stopped (SIGSTOP), concurrent admissions fall back within the bound while an
    unrelated coroutine keeps its pace: no call waits on Redis on the event loop."""
    url, pid = redis_url

    async def main():
        backend = RedisQuotas(url, processes=2)
        quota = backend.quota(1000, 0, KEY)
        await quota.admit()
        beat = Heartbeat().start()
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            out = await asyncio.gather(*(quota.admit() for _ in range(50)), return_exceptions=True)
            took = time.monotonic() - started
            assert not any(isinstance(o, BaseException) for o in out), out    # the local share: 1000 // 2
            assert backend.fallback and took < TIMEOUT + 1.0, took
            await asyncio.sleep(0.2)
        finally:
            os.kill(pid, signal.SIGCONT)
            beat.stop()
        assert len(beat.ticks) > 20 and beat.longest_gap < TIMEOUT, beat.longest_gap   # never waited on Redis
    asyncio.run(main())


def test_the_token_windows_running_sum_follows_the_set_and_is_rebuilt_if_lost(redis_url):
    """Admissions read a running sum beside the set of charges (no scan per request); it must
    equal the set's own total after reserves and settles, and a lost sum key is rebuilt from
    the set rather than read as zero (which would admit a full window again)."""
    import redis
    url, _ = redis_url
    sync = redis.Redis.from_url(url)

    async def main():
        g = RedisQuotas(url, processes=1)
        q = g.quota(0, 1000, b"\x05" * 32)
        charges = [await q.reserve(100) for _ in range(5)]
        for c, used in zip(charges, (10, 20, 30, 40, 50)):
            await q.settle(c, used)
        tok, total = q.store.token_keys
        members = sync.zrange(tok, 0, -1)
        assert int(sync.get(total)) == sum(int(m.rsplit(b":", 1)[1]) for m in members) == 150
        await q.reserve(850)                        # the window is full: 1000
        sync.delete(total)
        with pytest.raises(RateLimited) as err:
            await q.reserve(1)
        assert "1000 used in the last minute" in err.value.message
        assert int(sync.get(total)) == 1000
    asyncio.run(main())
