"""Shared quotas on a real redis-server: several processes' worth of connections see one window;
admission is atomic; reservations settle; an unreachable Redis means a local share, never
unlimited, and quotas are shared again once it answers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from modelyard.quota.redis import RETRY, RedisQuotas
from modelyard.errors import RateLimited

KEY = b"\x01" * 32


def gateways(url: str, n: int) -> list[RedisQuotas]:
    return [RedisQuotas(url, processes=n) for _ in range(n)]


def admitted(quota, tries: int) -> int:
    ok = 0
    for _ in range(tries):
        try:
            quota.admit(time.monotonic())
            ok += 1
        except RateLimited:
            pass
    return ok


def test_rpm_is_shared_by_every_process_and_admission_is_atomic(redis_url):
    url, _ = redis_url
    quotas = [g.quota(7, 0, KEY) for g in gateways(url, 4)]
    counts = [0] * 4
    def hammer(i):
        counts[i] = admitted(quotas[i], 10)
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(counts) == 7, counts           # not 4 x 7: one window for the key
    with pytest.raises(RateLimited) as err:
        quotas[0].admit(time.monotonic())
    assert "7 requests per minute" in err.value.message and 0 < err.value.retry_after <= 60


def test_tpm_reservations_settle_to_what_was_used_across_processes(redis_url):
    url, _ = redis_url
    a, b = (g.quota(0, 100, KEY) for g in gateways(url, 2))
    now = time.monotonic()
    first = a.reserve(60, now)
    with pytest.raises(RateLimited) as err:
        b.reserve(50, now)                      # 60 + 50 > 100, seen from the other process
    assert "60 used in the last minute" in err.value.message
    a.settle(first, 20)                         # it used less: the room comes back
    second = b.reserve(50, now)
    b.settle(second, 50)
    with pytest.raises(RateLimited):
        a.reserve(31, now)
    a.reserve(30, now)
    with pytest.raises(RateLimited) as err:
        a.reserve(101, now)
    assert "more than the whole quota" in err.value.message


def test_no_secret_reaches_redis(redis_url):
    import redis
    url, _ = redis_url
    secret = b"sk-very-secret-key"
    import hashlib
    quota = RedisQuotas(url, 1).quota(5, 0, hashlib.sha256(secret).digest())
    quota.admit(time.monotonic())
    client = redis.Redis.from_url(url)
    names = [k.decode() for k in client.keys("*")]
    assert names and all(k.startswith("modelyard:q:") for k in names)
    assert hashlib.sha256(secret).hexdigest()[:16] not in "".join(names)


def test_an_unreachable_redis_means_a_local_share_then_back(redis_url):
    url, pid = redis_url
    backend = RedisQuotas(url, processes=4)
    quota = backend.quota(8, 0, KEY)
    assert admitted(quota, 1) == 1 and not backend.fallback
    os.kill(pid, signal.SIGSTOP)                # Redis hangs: calls time out
    try:
        assert admitted(quota, 5) == 2          # 8 / 4 processes, never unlimited
        assert backend.fallback and backend.fallbacks == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(RETRY + 0.1)
    # Shared again: 8 in the window, less the one admitted before and the call that timed out
    # (it had reached Redis's socket, so Redis ran it on waking: over-counted, never under).
    assert admitted(quota, 10) == 6
    assert not backend.fallback


def test_the_token_windows_running_sum_follows_the_set_and_is_rebuilt_if_lost(redis_url):
    """Admissions read a running sum beside the set of charges (no scan per request); it must
    equal the set's own total after reserves and settles, and a lost sum key is rebuilt from
    the set rather than read as zero (which would admit a full window again)."""
    url, _ = redis_url
    g = RedisQuotas(url, processes=1)
    q = g.quota(0, 1000, b"\x05" * 32)
    now = time.monotonic()
    charges = [q.reserve(100, now) for _ in range(5)]
    for c, used in zip(charges, (10, 20, 30, 40, 50)):
        q.settle(c, used)
    tok, total = q._token_keys
    members = g.redis.zrange(tok, 0, -1)
    assert int(g.redis.get(total)) == sum(int(m.rsplit(b":", 1)[1]) for m in members) == 150
    q.reserve(850, now)                         # the window is full: 1000
    g.redis.delete(total)
    with pytest.raises(RateLimited) as err:
        q.reserve(1, now)
    assert "1000 used in the last minute" in err.value.message
    assert int(g.redis.get(total)) == 1000
