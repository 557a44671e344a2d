"""Usage per key, endpoint and minute, without a database write per request.

The request path adds to a dict in memory (on the event loop: no lock, no I/O), from each
request's ledger (quota/ledger) as its engine settles it. Every `[server] usage_flush_interval`
seconds (FLUSH by default), and at shutdown, the dict is swapped for an empty one and its rows
are upserted in one transaction (adding to rows other processes wrote), in sorted order (no
deadlock between processes). A process killed between flushes loses at most that interval of
usage; SIGTERM loses nothing (the lifespan flushes last). Queries roll the minutes up to hours
or days in SQL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

from ..errors import InvalidRequest
from ..periodic import Periodic
from .db import Database

log = logging.getLogger("modelyard.control")
FLUSH = 5.0                 # seconds between flushes: the most a killed process loses
GRANULARITY = {"minute": 60, "hour": 3600, "day": 86400}

Bucket = tuple[str, str, int]          # key id, endpoint, minute (unix seconds, a multiple of 60)


class UsageRecorder:
    def __init__(self, db: Database, interval: float = FLUSH) -> None:
        self.db, self.interval = db, interval
        self._pending: dict[Bucket, list[int]] = {}
        self._flusher = Periodic("control-usage-flush", interval, self.flush, log=log,
                                 failure="usage flush failed (kept for the next one)")
        self.flushes = 0
        self.flushed_rows = 0
        # Tokens per key and minute not yet known to be in the table (control/budget reads them):
        # what is pending, and each flush's share until a read of the table that began after
        # its commit (`committed` counts the commits; an entry is dropped by `confirm`).
        self._tokens: dict[str, dict[int, int]] = {}
        self._unconfirmed: list[list] = []     # [commit number or None (flushing), tokens]
        self.committed = 0

    def record(self, key_id: str, endpoint: str, prompt_tokens: int, completion_tokens: int,
               requests: int = 1, batch: bool = False) -> None:
        """Tokens computed for a request of `key_id` (quota/ledger: a request of several engine
        requests is recorded once per engine request, counted as one request); `batch`: a batch's
        line (batch/runner), counted in the totals and in the row's batch share too."""
        minute = int(time.time()) // 60 * 60
        row = self._pending.setdefault((key_id, endpoint, minute), [0, 0, 0, 0, 0])
        row[0] += requests
        row[1] += prompt_tokens
        row[2] += completion_tokens
        if batch:
            row[3] += requests
            row[4] += prompt_tokens + completion_tokens
        per_minute = self._tokens.setdefault(key_id, {})
        per_minute[minute] = per_minute.get(minute, 0) + prompt_tokens + completion_tokens

    def unflushed(self, key_id: str, since: int) -> int:
        """This process's tokens of `key_id` from minute `since` on that a read of the usage table
        may not have seen yet (pending, being flushed, or flushed after that read began)."""
        total = sum(t for m, t in self._tokens.get(key_id, {}).items() if m >= since)
        for _, tokens in self._unconfirmed:
            total += sum(t for m, t in tokens.get(key_id, {}).items() if m >= since)
        return total

    def confirm(self, committed: int) -> None:
        """A read of the table that began when `committed` flushes had committed has ended:
        their tokens are in what it read."""
        self._unconfirmed = [e for e in self._unconfirmed if e[0] is None or e[0] > committed]

    async def flush(self) -> int:
        pending, self._pending = self._pending, {}
        if not pending:
            return 0
        entry: list = [None, self._tokens]
        self._tokens = {}
        self._unconfirmed.append(entry)        # counted until a later read has seen it
        try:
            await asyncio.to_thread(self._write, pending)
        except Exception:
            self._unconfirmed.remove(entry)
            for key_id, minutes in entry[1].items():
                mine = self._tokens.setdefault(key_id, {})
                for m, t in minutes.items():
                    mine[m] = mine.get(m, 0) + t
            # keep what could not be written for the next flush (added to what came meanwhile)
            for bucket, counts in pending.items():
                row = self._pending.setdefault(bucket, [0, 0, 0, 0, 0])
                for i, v in enumerate(counts):
                    row[i] += v
            raise
        self.committed += 1
        entry[0] = self.committed
        self.flushes += 1
        self.flushed_rows += len(pending)
        return len(pending)

    def _write(self, pending: dict[Bucket, list[int]]) -> None:
        # Rows in one order (sorted): processes whose batches share rows then lock them in the
        # same order, so two flushes never wait for each other in a cycle (a PostgreSQL
        # deadlock, seen by bench/usage_flush.py with 4 processes flushing together).
        with self.db.transaction() as db:
            for (key_id, endpoint, minute), (n, p, c, bn, bt) in sorted(pending.items()):
                db.execute("INSERT INTO usage (key_id, endpoint, minute, requests, prompt_tokens, completion_tokens, "
                           "batch_requests, batch_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                           "ON CONFLICT (key_id, endpoint, minute) DO UPDATE SET "
                           "requests = usage.requests + excluded.requests, "
                           "prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens, "
                           "completion_tokens = usage.completion_tokens + excluded.completion_tokens, "
                           "batch_requests = usage.batch_requests + excluded.batch_requests, "
                           "batch_tokens = usage.batch_tokens + excluded.batch_tokens",
                           (key_id, endpoint, minute, n, p, c, bn, bt))

    async def start(self) -> None:
        self._flusher.start()

    async def stop(self) -> None:
        """The last flush: SIGTERM loses nothing."""
        await self._flusher.stop()
        await self.flush()


USAGE_PAGE = 100            # buckets per page unless `limit` says otherwise
USAGE_PAGE_MAX = 1000       # the most one page may hold (api/admin/usage: 422 past it)


def bucket_id(start: int, key_id: str, endpoint: str) -> str:
    """A bucket's place in the list's order (start, key, endpoint) as an opaque cursor."""
    return "ub_" + base64.urlsafe_b64encode(json.dumps([start, key_id, endpoint]).encode()).decode().rstrip("=")


def _cursor(after: str) -> tuple[int, str, str]:
    try:
        raw = after.removeprefix("ub_")
        start, key_id, endpoint = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if isinstance(start, int) and isinstance(key_id, str) and isinstance(endpoint, str):
            return start, key_id, endpoint
    except (ValueError, TypeError):
        pass
    raise InvalidRequest(f"after must be a last_id this list returned, got {after[:100]!r}", param="after",
                         code="invalid_cursor")


def query(db: Database, granularity: str, key_id: str | None, endpoint: str | None,
          start: int | None, end: int | None, limit: int = USAGE_PAGE, after: str | None = None) -> dict:
    """One page of buckets in (start, key_id, endpoint) order: at most `limit` (the whole table
    was one answer, every row ever stored for `start=0`); `after` is the last page's last_id."""
    step = GRANULARITY[granularity]
    where, args = [], []
    for column, value in (("key_id", key_id), ("endpoint", endpoint)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if start is not None:
        where.append("minute >= ?")
        args.append(start)
    if end is not None:
        where.append("minute < ?")
        args.append(end)
    outer, outer_args = "", []
    if after is not None:
        c_start, c_key, c_endpoint = _cursor(after)
        where.append("minute >= ?")         # no bucket before the cursor's is read at all
        args.append(c_start)
        outer = (" WHERE start > ? OR (start = ? AND key_id > ?) OR (start = ? AND key_id = ? AND endpoint > ?)")
        outer_args = [c_start, c_start, c_key, c_start, c_key, c_endpoint]
    inner = (f"SELECT key_id, endpoint, (minute / {step}) * {step} AS start, SUM(requests) AS requests, "
             "SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens, "
             "SUM(batch_requests) AS batch_requests, SUM(batch_tokens) AS batch_tokens FROM usage"
             + (" WHERE " + " AND ".join(where) if where else "")
             + f" GROUP BY key_id, endpoint, (minute / {step}) * {step}")
    sql = f"SELECT * FROM ({inner}) AS buckets{outer} ORDER BY start, key_id, endpoint LIMIT ?"
    rows = db.query(sql, [*args, *outer_args, limit + 1])
    data = [{"id": bucket_id(int(r["start"]), r["key_id"], r["endpoint"]), "object": "usage_bucket",
             "key_id": r["key_id"], "endpoint": r["endpoint"], "start": int(r["start"]),
             "granularity": granularity, "requests": int(r["requests"]), "prompt_tokens": int(r["prompt_tokens"]),
             "completion_tokens": int(r["completion_tokens"]),
             "total_tokens": int(r["prompt_tokens"]) + int(r["completion_tokens"]),
             # of which batches' lines (batch/runner): counted in the figures above too
             "batch_requests": int(r["batch_requests"]), "batch_tokens": int(r["batch_tokens"])}
            for r in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "last_id": data[-1]["id"] if data else None}


def rename_keys(db: Database, renamed: list[tuple[str, str]]) -> int:
    """Move usage rows from each old key id to its new one, adding to rows the new id has for
    the same endpoint and minute (a process still on the old ids may have written both);
    idempotent, run at every start. The rows moved. Deleted first (RETURNING): two processes
    starting together on PostgreSQL then never both move the same rows (the second's DELETE
    waits for the first's, then finds nothing)."""
    moved = 0
    with db.transaction() as tx:
        for old, new in renamed:
            if old == new:
                continue
            rows = tx.query("DELETE FROM usage WHERE key_id = ? RETURNING endpoint, minute, requests, "
                            "prompt_tokens, completion_tokens, batch_requests, batch_tokens", (old,))
            for r in rows:
                tx.execute("INSERT INTO usage (key_id, endpoint, minute, requests, prompt_tokens, completion_tokens, "
                           "batch_requests, batch_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                           "ON CONFLICT (key_id, endpoint, minute) DO UPDATE SET "
                           "requests = usage.requests + excluded.requests, "
                           "prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens, "
                           "completion_tokens = usage.completion_tokens + excluded.completion_tokens, "
                           "batch_requests = usage.batch_requests + excluded.batch_requests, "
                           "batch_tokens = usage.batch_tokens + excluded.batch_tokens",
                           (new, r["endpoint"], r["minute"], r["requests"], r["prompt_tokens"], r["completion_tokens"],
                            r["batch_requests"], r["batch_tokens"]))
            moved += len(rows)
    return moved
