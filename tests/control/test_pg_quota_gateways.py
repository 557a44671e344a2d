"""[quota] backend = "postgres" with real `modelyard serve` processes on one real PostgreSQL (no
Redis): the requests admitted across four gateways stay within the bound quota/postgres states
(rpm + processes * B in a window), with a database write per block, not per request; a gateway
killed with -9 while holding a block does not lock the key out: the others keep the rest of the
quota, and the whole quota comes back once that block has left the window."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from modelyard.quota.limits import WINDOW
from modelyard.control.db import open_database
from testkit.pg import fresh_database
from testkit.servers import MODEL, served
from testkit.until import until

pytestmark = pytest.mark.model

ADMIN, KEY = "sk-pg-admin", "sk-pg-shared"


def config(url: str, rpm: int, processes: int) -> str:
    return (f'[server]\napi_keys = ["{ADMIN}"]\ndatabase_url = "{url}"\n\n[quota]\nbackend = "postgres"\n'
            f'processes = {processes}\n\n[[keys]]\nkey = "{KEY}"\nrpm = {rpm}\n\n'
            f'[[endpoints]]\nname = "{MODEL}"\ncontext = 128\nparallel = 2\nthreads = 1\n')


def call(gw) -> int:
    return httpx.post(f"{gw.api}/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}).status_code


def test_four_gateways_admit_within_the_stated_bound(tmp_path, pg_server):
    rpm, processes = 40, 4
    block = max(1, rpm // (4 * processes))               # quota/postgres: B = rpm // (BLOCKS * processes)
    url = fresh_database(pg_server, "pgq_gateways")
    with ExitStack() as stack:
        gws = [stack.enter_context(served(tmp_path / f"gw{i}", config(url, rpm, processes), name=f"gw{i}", key=ADMIN))
               for i in range(processes)]
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: call(gws[i % processes]), range(3 * rpm)))
        admitted = codes.count(200)
        assert set(codes) == {200, 429}, codes
        assert rpm - processes * block <= admitted <= rpm + processes * block, (admitted, codes)
        db = open_database(url)
        rows = db.query("SELECT amount FROM quota_blocks")
        db.close()
        assert sum(r["amount"] for r in rows) <= rpm            # what was granted in this window
        assert len(rows) <= admitted // block + processes        # a write per block, not per request
        for gw in gws:
            assert KEY not in gw.log_text()


def test_a_killed_gateway_s_block_does_not_lock_the_key_out(tmp_path, pg_server):
    rpm = 8                                               # processes = 1: B = 8 // 4 = 2
    url = fresh_database(pg_server, "pgq_killed")
    with served(tmp_path / "a", config(url, rpm, 1), name="a", key=ADMIN) as a, \
            served(tmp_path / "b", config(url, rpm, 1), name="b", key=ADMIN) as b:
        assert call(a) == 200                             # a leases a block of 2 and spends 1
        db = open_database(url)
        (held,) = db.query("SELECT id, amount FROM quota_blocks")
        assert held["amount"] == 2
        a.kill()                                          # -9 with one request of its block unspent
        codes = [call(b) for _ in range(8)]
        assert codes == [200] * 6 + [429] * 2, codes      # the rest of the quota: 8 - a's block
        until(lambda: call(b) == 200, WINDOW + 30, "a's block left the window", interval=1.0)
        ids = [r["id"] for r in db.query("SELECT id FROM quota_blocks")]
        db.close()
        assert held["id"] not in ids                      # the dead process's block is gone
