"""Token budgets per UTC day or month with `[quota] backend = "memory"` or `"postgres"`: what a
key has used this period, without a database read or write per request.

`used(key, period)` = the usage table's total for the period, as last read (every POLL seconds,
one grouped query for the keys that have a budget), plus this process's usage the table may not
hold yet (control/usage.UsageRecorder.unflushed: pending, being flushed, or flushed after the
last read began: counted twice for a moment rather than not at all).

A request's reservation is held against the budget besides (quota/memory.LocalBudget), so one
process never passes the budget; the bound across processes (each sees another's usage only once
it is flushed, every control/usage.FLUSH = 5 s, and read, every POLL = 1 s) is stated there. With
`backend = "redis"` the budget is a counter in Redis held at reserve and corrected at settle
(quota/redis).
"""

from __future__ import annotations

import asyncio
import logging

from ..quota.limits import period_bounds
from .db import Database
from .usage import UsageRecorder

log = logging.getLogger("modelyard.control")
POLL = 1.0


class BudgetBook:
    def __init__(self, db: Database, recorder: UsageRecorder, interval: float = POLL) -> None:
        self.db, self.recorder, self.interval = db, recorder, interval
        self._read: dict[tuple[str, int], int] = {}     # (key id, period start) -> tokens in the table
        self._task: asyncio.Task | None = None
        self.keys: dict[str, str] = {}                  # key id -> period, the keys with a budget

    def used(self, key_id: str, period: str) -> int:
        start, _ = period_bounds(period)
        return self._read.get((key_id, start), 0) + self.recorder.unflushed(key_id, start)

    def _query(self, keys: dict[str, str]) -> dict[tuple[str, int], int]:
        read: dict[tuple[str, int], int] = {}
        by_start: dict[int, list[str]] = {}
        for key_id, period in keys.items():
            by_start.setdefault(period_bounds(period)[0], []).append(key_id)
        for start, ids in by_start.items():
            marks = ", ".join("?" for _ in ids)
            rows = self.db.query(f"SELECT key_id, SUM(prompt_tokens + completion_tokens) AS tokens FROM usage "
                                 f"WHERE minute >= ? AND key_id IN ({marks}) GROUP BY key_id", (start, *ids))
            for r in rows:
                read[(r["key_id"], start)] = int(r["tokens"] or 0)
        return read

    async def refresh(self, keys: dict[str, str] | None = None) -> None:
        if keys is not None:
            self.keys = keys
        if not self.keys:
            self._read = {}
            return
        committed = self.recorder.committed        # flushes committed before this read began
        self._read = await asyncio.to_thread(self._query, dict(self.keys))
        self.recorder.confirm(committed)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="control-budget-read")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last read; say so
                log.error("cannot read budget usage from the control store (keeping the last read): %s: %s",
                          type(exc).__name__, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
