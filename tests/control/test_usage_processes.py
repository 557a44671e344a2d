"""Usage durability with several real `modelyard serve` processes on one real PostgreSQL:
`kill -9` of one mid-traffic leaves the usage table consistent (a flush is one transaction, so
no half of one is ever stored) and loses at most that process's last interval; SIGTERM of the
other loses nothing. And, on both backends, a flush that fails half-way stores nothing of itself
and keeps its rows for the next one."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from modelyard.control.db import open_database
from modelyard.control.usage import FLUSH, UsageRecorder, query
from testkit.pg import fresh_database
from testkit.servers import MODEL, modelyard_process, wait_ready
from testkit.until import until

ADMIN = "usage-procs-admin"


def test_a_flush_that_fails_half_way_stores_nothing_and_is_kept(db, monkeypatch):
    recorder = UsageRecorder(db)
    recorder.record("key_1", "m", 3, 1)
    recorder.record("key_2", "m", 5, 1)
    real, upserts = db.execute, []

    def dies_at_the_second_row(sql, params=()):
        if sql.startswith("INSERT INTO usage"):
            upserts.append(params)
            if len(upserts) == 2:
                raise RuntimeError("the process dies here")
        return real(sql, params)
    monkeypatch.setattr(db, "execute", dies_at_the_second_row)
    with pytest.raises(RuntimeError):
        asyncio.run(recorder.flush())
    assert query(db, "day", None, None, None, None)["data"] == []      # the first row went back too
    monkeypatch.setattr(db, "execute", real)
    recorder.record("key_1", "m", 3, 1)
    assert asyncio.run(recorder.flush()) == 2
    rows = {r["key_id"]: (r["requests"], r["prompt_tokens"]) for r in query(db, "day", None, None, None, None)["data"]}
    assert rows == {"key_1": (2, 6), "key_2": (1, 5)}


def test_concurrent_flushes_of_the_same_rows_never_deadlock(request):
    """Two processes' batches share rows in opposite orders; each flush locks its rows in one
    order (sorted), so neither waits for the other in a cycle (PostgreSQL: DeadlockDetected)."""
    url = fresh_database(request.getfixturevalue("pg_server"), "usage_deadlock")
    dbs = [open_database(url) for _ in range(2)]
    buckets = [(f"key_{i:03d}", "m") for i in range(100)]
    errors: list[Exception] = []
    try:
        for _ in range(5):
            recorders = [UsageRecorder(d) for d in dbs]
            for key, endpoint in buckets:
                recorders[0].record(key, endpoint, 1, 1)
            for key, endpoint in reversed(buckets):
                recorders[1].record(key, endpoint, 1, 1)
            barrier = threading.Barrier(2)

            def flush(recorder: UsageRecorder) -> None:
                barrier.wait()
                try:
                    asyncio.run(recorder.flush())
                except Exception as exc:  # noqa: BLE001 - collected, asserted below
                    errors.append(exc)
            threads = [threading.Thread(target=flush, args=(r,)) for r in recorders]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert errors == []
        assert sum(r["requests"] for r in query(dbs[0], "day", None, None, None, None)["data"]) == 2 * 100 * 5
    finally:
        for d in dbs:
            d.close()


def config(url: str) -> str:
    return (f'[server]\ndatabase_url = "{url}"\n\n[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[endpoints]]\nname = "{MODEL}"\ncontext = 128\nparallel = 2\nthreads = 1\n')


class Traffic(threading.Thread):
    """Sequential completions on one server, cycling through `keys`; what was served, and when."""

    def __init__(self, srv, keys: list[str]) -> None:
        super().__init__(daemon=True)
        self.srv, self.keys, self.stop_now = srv, keys, threading.Event()
        self.done: list[tuple[str, float, int, int]] = []     # key, monotonic end, prompt, completion tokens
        self.failed = 0

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            for i in range(100_000):
                if self.stop_now.is_set():
                    return
                key = self.keys[i % len(self.keys)]
                try:
                    r = client.post(f"{self.srv.api}/completions", headers={"Authorization": f"Bearer {key}"},
                                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
                except httpx.TransportError:
                    self.failed += 1              # the server was killed
                    return
                assert r.status_code == 200, r.text
                u = r.json()["usage"]
                self.done.append((key, time.monotonic(), u["prompt_tokens"], u["completion_tokens"]))

    def served(self, key: str) -> int:
        return sum(1 for k, *_ in self.done if k == key)


def stored(url: str) -> dict[str, tuple[int, int, int]]:
    """key id -> (requests, prompt tokens, completion tokens) in the usage table."""
    db = open_database(url)
    try:
        rows = query(db, "day", None, None, None, None)["data"]
    finally:
        db.close()
    out: dict[str, tuple[int, int, int]] = {}
    for r in rows:
        n, p, c = out.get(r["key_id"], (0, 0, 0))
        out[r["key_id"]] = (n + r["requests"], p + r["prompt_tokens"], c + r["completion_tokens"])
    return out


@pytest.mark.model
def test_kill_9_loses_at_most_its_last_interval_and_sigterm_nothing(tmp_path, request):
    url = fresh_database(request.getfixturevalue("pg_server"), "usage_procs")
    a = modelyard_process(tmp_path, config(url), name="a").start()
    b = modelyard_process(tmp_path, config(url), name="b").start()
    traffic = []
    try:
        wait_ready(a), wait_ready(b)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        ids, secrets = {}, {}
        for name in ("a1", "a2", "b1"):
            r = httpx.post(f"{a.base}/api/v1/control/api-keys", headers=admin, json={"name": name}, timeout=30)
            ids[name], secrets[name] = r.json()["id"], r.json()["secret"]
        until(lambda: httpx.post(f"{b.api}/completions", headers={"Authorization": f"Bearer {secrets['b1']}"},
                                 json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}, timeout=60)
              .status_code == 200, 5, "b knows b1")
        before = stored(url)                 # the probe request above, once b flushes it
        # a alternates a1, a2 (so at every flush a1 has 0 or 1 more than a2); b serves b1
        ta, tb = Traffic(a, [secrets["a1"], secrets["a2"]]), Traffic(b, [secrets["b1"]])
        traffic = [ta, tb]
        ta.start(), tb.start()
        # two flushes of a's traffic have landed (so it ran longer than an interval), then a few
        # more requests: kill -9 mid-traffic
        until(lambda: stored(url).get(ids["a2"], (0,))[0] > 0, 4 * FLUSH, "a flush from a")
        first = stored(url)[ids["a2"]][0]
        until(lambda: stored(url)[ids["a2"]][0] > first, 4 * FLUSH, "a second flush from a")
        flushed_seen = len(ta.done)
        until(lambda: len(ta.done) >= flushed_seen + 4, 60, "a serving on")
        killed_at = time.monotonic()
        a.kill()
        ta.join(60)
        tb.stop_now.set()
        tb.join(60)
        assert b.stop(timeout=30) in (0, -15)        # SIGTERM: the last flush on the way out
        after = stored(url)
    finally:
        for t in traffic:
            t.stop_now.set()
        a.stop(timeout=5), b.stop(timeout=5)

    # every request costs the same, so whole requests are what is stored
    (p, c), = {(pt, ct) for _, _, pt, ct in ta.done + tb.done}
    for key_id, (n, pt, ct) in after.items():
        assert (pt, ct) == (n * p, n * c), (key_id, after[key_id])
    a1, a2 = after[ids["a1"]][0], after[ids["a2"]][0]
    assert a1 - a2 in (0, 1), (a1, a2)                 # never a part of a flush
    served_a = ta.served(secrets["a1"]) + ta.served(secrets["a2"])
    # at most what a served (+1: a request recorded and flushed whose answer the kill cut off) ...
    assert a1 + a2 <= served_a + 1
    # ... and at least all it served before its last interval (one flush period, plus 1 s for
    # the flush itself on a busy machine)
    settled = sum(1 for k, end, *_ in ta.done if end < killed_at - FLUSH - 1.0)
    assert settled > 0 and a1 + a2 >= settled, (a1 + a2, settled, served_a)
    # b: SIGTERM lost nothing (the probe request is in `before` or was flushed since)
    probe = 1
    assert after[ids["b1"]][0] == tb.served(secrets["b1"]) + probe
    assert before.get(ids["b1"], (0,))[0] <= probe
