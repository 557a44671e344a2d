"""A key's limits beyond the per-minute windows: `max_parallel` (its requests in flight at once)
and a token budget per UTC calendar day or month (`budget_tokens`, `budget_period`).

What every quota backend shares: the period's bounds, the in-flight `Slot` a request holds from
admission to its very end, and the 429s (each says the limit; a budget's also says what was used
and when the period starts again).

A slot is taken at admission (api/auth.KeyChecker.check, as the request arrives) and released by
api/middleware/ledger.CloseLedger (closing the request's quota/ledger), in a `finally` around the whole ASGI call: that call ends only once the
response has ended (a streaming body included), so a request that finished, failed, was left by its
client or had its stream closed gives its slot back exactly once, wherever it ended.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable

from ..errors import RateLimited

PERIODS = ("day", "month")


def period_bounds(period: str, now: float | None = None) -> tuple[int, int]:
    """The UTC calendar day or month holding `now`: (start, end) in unix seconds."""
    t = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = datetime.fromtimestamp(start.timestamp() + 86400, tz=timezone.utc)
    elif period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"budget_period must be one of {PERIODS}, got {period!r}")
    return int(start.timestamp()), int(end.timestamp())


def parallel_exceeded(limit: int) -> RateLimited:
    return RateLimited(f"parallel limit: this key may have {limit} requests in flight at once; "
                       "retry when one of them has ended", code="parallel_limit_exceeded", retry_after=1.0)


def budget_exceeded(limit: int, period: str, used: int, now: float | None = None) -> RateLimited:
    _, resets = period_bounds(period, now)
    when = datetime.fromtimestamp(resets, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    now = time.time() if now is None else now
    return RateLimited(f"token budget: {limit} tokens per {period} for this key, {used} used this {period}; "
                       f"it resets at {when} (unix {resets})", code="budget_exceeded",
                       retry_after=max(1.0, resets - now))


class Slot:
    """One admitted request's place among its key's `max_parallel`; `release` is idempotent."""

    __slots__ = ("_release", "released")

    def __init__(self, release: Callable[[], None]) -> None:
        self._release, self.released = release, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()
