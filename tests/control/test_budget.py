"""Memory-backend budgets (control/budget.BudgetBook) on a real SQLite file and a real PostgreSQL:
two processes' recorders on one store; what one used reaches the other once flushed and read, and
a process's own usage counts before it is flushed, while it is flushed and after, never twice
once read, never lost in between."""

from __future__ import annotations

import asyncio
import time

from modelyard.quota.limits import period_bounds
from modelyard.control.budget import BudgetBook
from modelyard.control.usage import UsageRecorder


def test_period_bounds_are_utc_calendar():
    t = 1772323200 + 3600       # 2026-03-01T01:00:00Z
    assert period_bounds("day", t) == (1772323200, 1772323200 + 86400)
    assert period_bounds("month", t) == (1772323200, 1775001600)          # to 2026-04-01
    assert period_bounds("month", 1796083200 + 5) == (1796083200, 1798761600)   # December to January


def test_a_budget_sees_every_process_usage_without_double_counting(db):
    async def run():
        mine, theirs = UsageRecorder(db), UsageRecorder(db)     # two processes' recorders
        book = BudgetBook(db, mine)
        await book.refresh({"k1": "day", "k2": "month"})
        assert book.used("k1", "day") == 0
        mine.record("k1", "ep", 10, 5)
        assert book.used("k1", "day") == 15                  # unflushed, counted at once
        theirs.record("k1", "ep", 100, 0)
        theirs.record("k2", "ep", 7, 0)
        assert book.used("k1", "day") == 15                  # the other process has not flushed
        await theirs.flush()
        await mine.flush()
        assert book.used("k1", "day") == 15                  # flushed but not read yet: still counted
        await book.refresh()
        assert book.used("k1", "day") == 115 and book.used("k2", "month") == 7
        mine.record("k1", "ep", 1, 1)
        await book.refresh()
        assert book.used("k1", "day") == 117                 # pending + read, not twice
        await mine.flush()
        await book.refresh()
        assert book.used("k1", "day") == 117
    asyncio.run(run())


def test_usage_before_the_period_does_not_count(db):
    async def run():
        rec = UsageRecorder(db)
        book = BudgetBook(db, rec)
        start, _ = period_bounds("day")
        db.execute("INSERT INTO usage (key_id, endpoint, minute, requests, prompt_tokens, completion_tokens) "
                   "VALUES (?, ?, ?, ?, ?, ?)", ("k", "ep", start - 60, 1, 500, 0))
        rec.record("k", "ep", 3, 0)
        await rec.flush()
        await book.refresh({"k": "day"})
        assert book.used("k", "day") == 3 and time.time() >= start
    asyncio.run(run())
