"""A key's limits and every 429 they give, in one place for the three quota backends.

The limits: sliding one-minute windows of requests (`rpm`) and tokens (`tpm`), requests in flight
at once (`max_parallel`) and a token budget per UTC calendar day or month (`budget_tokens`,
`budget_period`); 0 is no limit. `KeyLimits.share` is one process's part of them, what a process
allows by itself while its shared store does not answer (quota/policy).

A store counts and says no with a `Refusal` (which limit, what it saw, when to retry); only
`Refusal.error` turns that into the RateLimited a client reads, so the three backends cannot word
a limit differently.

A slot is taken at admission (quota/keys.KeyChecker.admit, as the request arrives) and released
by api/middleware/ledger.CloseLedger (closing the request's quota/ledger), in a `finally` around the whole ASGI call: that call ends only once
the response has ended (a streaming body included), so a request that finished, failed, was left
by its client or had its stream closed gives its slot back exactly once, wherever it ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from ..errors import RateLimited

PERIODS = ("day", "month")
WINDOW = 60.0         # seconds: rpm and tpm are sliding windows this long


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


def share(limit: int, processes: int) -> int:
    """One process's part of a limit: never 0 (unlimited) where the limit is set."""
    return max(1, limit // processes) if limit else 0


@dataclass(frozen=True)
class KeyLimits:
    rpm: int = 0
    tpm: int = 0
    max_parallel: int = 0
    budget_tokens: int = 0
    budget_period: str | None = None

    @property
    def budget(self) -> int:
        """The budget in force (0: none; a budget without a period is none)."""
        return self.budget_tokens if self.budget_period else 0

    def share(self, processes: int) -> "KeyLimits":
        """This process's part: the windows and max_parallel divided; the budget whole, because
        what it is checked against (what the store last said, plus what was charged here since)
        is a total, not a share."""
        return KeyLimits(share(self.rpm, processes), share(self.tpm, processes), share(self.max_parallel, processes),
                      self.budget_tokens, self.budget_period)


@dataclass(frozen=True)
class Refusal:
    """Why a store said no: `kind` is "parallel", "rpm", "tpm" or "budget"; `used` what the limit
    saw (tokens in the window, or the period's usage), `reserved` the budget held by requests in
    flight where the store knows it apart from `used` (None: counted in `used`), `tokens` the
    reservation refused (None: an admission)."""
    kind: str
    retry_after: float = 1.0
    used: int = 0
    reserved: int | None = None
    tokens: int | None = None

    def error(self, limits: KeyLimits) -> RateLimited:
        """The 429 a client reads: each names its limit and what was counted against it."""
        if self.kind == "parallel":
            return RateLimited(f"parallel limit: this key may have {limits.max_parallel} requests in flight at "
                               "once; retry when one of them has ended", code="parallel_limit_exceeded",
                               retry_after=1.0)
        if self.kind == "rpm":
            return RateLimited(f"rate limit: {limits.rpm} requests per minute for this key",
                               code="rate_limit_exceeded", retry_after=max(self.retry_after, 0.0))
        if self.kind == "tpm":
            return self._tpm(limits.tpm)
        return self._budget(limits.budget_tokens, limits.budget_period or "day")

    def _tpm(self, tpm: int) -> RateLimited:
        why = f"rate limit: {tpm} tokens per minute for this key ({self.used} used in the last minute)"
        if self.tokens is None:
            return RateLimited(why, code="rate_limit_exceeded", retry_after=max(self.retry_after, 0.0))
        why += f"; this request may use up to {self.tokens} tokens (prompt + max_tokens)"
        if self.tokens > tpm:     # can never fit: say so rather than let the client wait
            return RateLimited(why + ", more than the whole quota; lower max_tokens or shorten the prompt",
                               code="rate_limit_exceeded", retry_after=WINDOW)
        return RateLimited(why, code="rate_limit_exceeded", retry_after=max(self.retry_after, 0.0))

    def _budget(self, limit: int, period: str) -> RateLimited:
        now = time.time()
        _, resets = period_bounds(period, now)
        when = datetime.fromtimestamp(resets, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        held = self.used + (self.reserved or 0)
        counted = (f"{self.used} used this {period}, {self.reserved} reserved by requests in flight"
                   if self.reserved is not None else
                   f"{self.used} used this {period} (requests in flight counted at what they reserved)")
        why = f"token budget: {limit} tokens per {period} for this key, {counted}, {max(limit - held, 0)} left"
        retry = max(1.0, resets - now)
        if self.tokens is not None:
            why += f"; this request may use up to {self.tokens} tokens (prompt + max_tokens)"
            if self.tokens > limit:
                return RateLimited(why + ", more than the whole budget; lower max_tokens or shorten the prompt",
                                   code="budget_exceeded", retry_after=retry)
            if self.reserved:         # what is held now comes back as those requests end
                retry = 1.0
        return RateLimited(f"{why}; it resets at {when} (unix {resets})", code="budget_exceeded", retry_after=retry)


class Slot:
    """One admitted request's place among its key's `max_parallel`; `release` is idempotent and
    synchronous (a store that must tell a server schedules that)."""

    __slots__ = ("_release", "released")

    def __init__(self, release: Callable[[], None]) -> None:
        self._release, self.released = release, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()
