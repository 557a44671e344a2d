"""[quota] backend = "postgres" on a real PostgreSQL server: blocks of a key's quota leased from
the database (quota/postgres). In process: several backends (one per "process") stay within the
stated bound with far fewer database writes than requests, a full key costs no call per request,
tpm reservations settle back into their block and an overage is charged; a budget holds what is
reserved; a hung database is the local share without stalling the event loop; the secret never
reaches the table."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from modelyard.quota.postgres import BOUND, PostgresQuotas
from modelyard.control.db import open_database
from modelyard.errors import RateLimited
from testkit.heartbeat import Heartbeat
from testkit.pg import fresh_database

_n = itertools.count()
SECRET = b"sk-pg-quota-secret"
KEY = hashlib.sha256(SECRET).digest()


@pytest.fixture
def pg_url(pg_server) -> str:
    url = fresh_database(pg_server, f"pgq{next(_n)}")
    asyncio.run(PostgresQuotas(url, 1).prepare())       # the backend's own table, nothing else
    return url


class Book:
    """control/budget.BudgetBook's answer, set by the test: the usage recorded for the period."""

    def __init__(self) -> None:
        self.usage = 0

    def used(self, key_id: str, period: str) -> int:
        return self.usage


async def admitted(quota, tries: int) -> int:
    ok = 0
    for _ in range(tries):
        try:
            (await quota.admit()).release()
            ok += 1
        except RateLimited:
            pass
    return ok


def test_four_processes_stay_within_rpm_plus_processes_times_block(pg_url):
    rpm, processes = 40, 4

    async def main():
        backends = [PostgresQuotas(pg_url, processes) for _ in range(processes)]
        block = backends[0].block(rpm)
        assert block == 2
        quotas = [b.quota(rpm, 0, KEY) for b in backends]
        counts = await asyncio.gather(*(admitted(q, 30) for q in quotas))
        total = sum(counts)
        assert rpm - processes * block <= total <= rpm + processes * block, counts
        leases = sum(b.leases for b in backends)
        assert leases <= total // block + processes                 # a write per block, not per request
        before = leases
        assert await admitted(quotas[0], 20) == 0                    # full: refused...
        assert sum(b.leases for b in backends) == before             # ...from memory, no database call
        for b in backends:
            await b.close()
    asyncio.run(main())
    db = open_database(pg_url)
    rows = db.query("SELECT * FROM quota_blocks")
    assert sum(r["amount"] for r in rows) <= rpm and SECRET.decode() not in repr(rows)
    assert hashlib.sha256(SECRET).hexdigest()[:16] not in repr(rows)
    db.close()


def test_tpm_blocks_reserve_and_settle(pg_url):
    async def main():
        a, b = PostgresQuotas(pg_url, 2), PostgresQuotas(pg_url, 2)
        qa, qb = a.quota(0, 100, KEY), b.quota(0, 100, KEY)
        first = await qa.reserve(60)                 # a block of its own size (more than 100 // 8)
        with pytest.raises(RateLimited) as err:
            await qb.reserve(50)                     # 60 + 50 > 100, seen from the other process
        assert "60 used in the last minute" in err.value.message
        await qa.settle(first, 20)                   # 40 unused go back to qa's block
        await qa.reserve(40)                         # from that block: no new lease
        assert a.leases == 1
        with pytest.raises(RateLimited) as err:
            await qa.reserve(101)
        assert "more than the whole quota" in err.value.message
        await a.close()
        await b.close()
    asyncio.run(main())


def test_an_overage_is_charged_in_the_window(pg_url):
    """A request that computed more than it reserved (a remote engine's bound was low) is
    charged its overage: from its block, the rest leased unchecked; so the key's other processes
    see it."""
    async def main():
        a, b = PostgresQuotas(pg_url, 1), PostgresQuotas(pg_url, 1)
        qa, qb = a.quota(0, 100, KEY), b.quota(0, 100, KEY)
        await qa.settle(await qa.reserve(10), 90)     # reserved 10 (a block of 25), used 90
        with pytest.raises(RateLimited) as err:
            await qb.reserve(20)                      # 90 + 20 > 100
        assert "90 used in the last minute" in err.value.message
        await a.close()
        await b.close()
    asyncio.run(main())


def test_a_budget_holds_what_is_reserved(pg_url):
    """Hole 2: 100 concurrent reservations of 500 on a budget of 1000 (no max_parallel): exactly
    two fit; settling gives back what was not used, once the usage is recorded."""
    async def main():
        backend = PostgresQuotas(pg_url, 1)
        q = backend.quota(0, 0, KEY)
        q.budget_tokens, q.budget_period, q.book = 1000, "day", Book()
        out = await asyncio.gather(*(q.reserve(500) for _ in range(100)), return_exceptions=True)
        held = [r for r in out if not isinstance(r, BaseException)]
        assert len(held) == 2 and all(isinstance(r, RateLimited) for r in out if r not in held)
        refusal = next(r for r in out if isinstance(r, RateLimited))
        assert refusal.code == "budget_exceeded" and "1000 reserved" in refusal.message and "0 left" in refusal.message
        q.book.usage = 600                      # their usage rows, recorded before they settle
        for r in held:
            await q.settle(r, 300)
        await q.settle(held[0], 300)            # once per reservation
        await q.reserve(400)
        with pytest.raises(RateLimited) as err:
            await q.reserve(1)
        assert "600 used this day, 400 reserved" in err.value.message
        with pytest.raises(RateLimited) as err:
            await q.reserve(1001)
        assert "more than the whole budget" in err.value.message
        await backend.close()
    asyncio.run(main())


@contextmanager
def stopped(url: str):
    """The PostgreSQL server and every backend process of it stopped (SIGSTOP): connections
    open, nothing answered."""
    root = Path(parse_qs(urlparse(url).query)["host"][0])
    postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
    pids = [postmaster] + [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == postmaster]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_hung_database_is_the_local_share_and_never_stalls_the_loop(pg_url, pg_server):
    async def main():
        backend = PostgresQuotas(pg_url, 4)
        quota = backend.quota(40, 0, KEY)
        assert await admitted(quota, 1) == 1 and not backend.fallback
        beat = Heartbeat().start()
        with stopped(pg_server):
            quota.store._pots["req"].left = 0          # the next admission needs the database
            started = time.monotonic()
            out = await asyncio.gather(*(quota.admit() for _ in range(20)), return_exceptions=True)
            took = time.monotonic() - started
            assert backend.fallback and backend.fallbacks == 1
            assert sum(not isinstance(o, BaseException) for o in out) == 10     # 40 / 4, never unlimited
            assert took < BOUND + 1.0, took
        beat.stop()
        assert beat.longest_gap < 0.25, beat.longest_gap                        # the loop never waited
        await asyncio.sleep(1.1)                                                # RETRY: back to the database
        assert await admitted(quota, 1) == 1 and not backend.fallback
        await backend.close()
    asyncio.run(main())
