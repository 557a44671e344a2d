"""[quota] backend = "postgres" on a real PostgreSQL server: blocks of a key's quota leased from
the database (quota/postgres). In process: several backends (one per "process") stay within the
stated bound with far fewer database writes than requests, a full key costs no call per request,
tpm reservations settle back into their block; the secret never reaches the table."""

from __future__ import annotations

import hashlib
import itertools
import threading
import time

import pytest

from modelyard.quota.postgres import PostgresQuotas
from modelyard.control.db import open_database
from modelyard.errors import RateLimited
from pg import fresh_database

_n = itertools.count()
SECRET = b"sk-pg-quota-secret"
KEY = hashlib.sha256(SECRET).digest()


@pytest.fixture
def pg_url(pg_server) -> str:
    url = fresh_database(pg_server, f"pgq{next(_n)}")
    open_database(url).close()          # migrated
    return url


def admitted(quota, tries: int) -> int:
    ok = 0
    for _ in range(tries):
        try:
            quota.admit(time.monotonic()).release()
            ok += 1
        except RateLimited:
            pass
    return ok


def test_four_processes_stay_within_rpm_plus_processes_times_block(pg_url):
    rpm, processes = 40, 4
    backends = [PostgresQuotas(pg_url, processes) for _ in range(processes)]
    block = backends[0].block(rpm)
    assert block == 2
    quotas = [b.quota(rpm, 0, KEY) for b in backends]
    counts = [0] * processes

    def hammer(i: int) -> None:
        counts[i] = admitted(quotas[i], 30)
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    total = sum(counts)
    assert rpm - processes * block <= total <= rpm + processes * block, counts
    leases = sum(b.leases for b in backends)
    assert leases <= total // block + processes                 # a write per block, not per request
    before = leases
    assert admitted(quotas[0], 20) == 0                          # full: refused...
    assert sum(b.leases for b in backends) == before             # ...from memory, no database call
    db = open_database(pg_url)
    rows = db.query("SELECT * FROM quota_blocks")
    assert sum(r["amount"] for r in rows) <= rpm and SECRET.decode() not in repr(rows)
    assert hashlib.sha256(SECRET).hexdigest()[:16] not in repr(rows)
    db.close()
    for b in backends:
        b.close()


def test_tpm_blocks_reserve_and_settle(pg_url):
    a, b = PostgresQuotas(pg_url, 2), PostgresQuotas(pg_url, 2)
    qa, qb = a.quota(0, 100, KEY), b.quota(0, 100, KEY)
    now = time.monotonic()
    first = qa.reserve(60, now)                  # a block of its own size (more than 100 // 8)
    with pytest.raises(RateLimited) as err:
        qb.reserve(50, now)                      # 60 + 50 > 100, seen from the other process
    assert "60 used in the last minute" in err.value.message
    qa.settle(first, 20)                         # 40 unused go back to qa's block
    qa.reserve(40, now)                          # from that block: no new lease
    assert a.leases == 1
    with pytest.raises(RateLimited) as err:
        qa.reserve(101, now)
    assert "more than the whole quota" in err.value.message
    a.close()
    b.close()
