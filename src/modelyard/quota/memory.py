"""Counting a key's quota in this process's memory: the store of `[quota] backend = "memory"` (the
default), and every shared backend's fallback (quota/policy: this process's share of each limit).

- rpm and tpm: sliding one-minute windows, a deque of request times and one of token charges
  with a running sum; past them, a Refusal with when the window frees up (Retry-After);
- max_parallel: a count of this process's requests in flight (`InFlight`);
- the budget (`LocalBudget`): what the period used outside this process's requests in flight
  (memory and postgres: control/budget.BudgetBook, the usage table plus this process's unflushed
  usage) plus the reservations of this process's requests in flight. A request reserves its most
  (prompt + n * max_tokens) and is refused if that does not fit; it settles to what it computed.
  Its usage row must be recorded before it settles (the request ledger does so), so its tokens
  move from "reserved" to "used" without a gap: counted twice for a moment, never missed.

Budget overshoot bound (memory or postgres). One process never passes the budget: it sees its own
usage at once (unflushed) and its own reservations. It sees another process's requests only once
they are usage in the table (that process flushed it, every control/usage.FLUSH = 5 s, and this
one read it, every control/budget.POLL = 1 s, plus one query); another's reservations never. So
the tokens served to a key in a period are at most

    budget_tokens + what the other processes reserved or served it in the last FLUSH + POLL s

and budget_tokens * processes at the very worst (each process filling the budget by itself
within those seconds). A remote engine's after-the-fact charge (settle(None, ...)) is not
checked: it can pass the budget by that request's tokens.

Every method here runs without awaiting anything, so each is atomic on the event loop.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from .limits import WINDOW, KeyLimits, Refusal, Slot
from .policy import Backend, KeyQuota, Store


class Charge:
    """One request's tokens in its key's window: reserved, then settled."""

    __slots__ = ("at", "tokens", "expired")

    def __init__(self, at: float, tokens: int) -> None:
        self.at, self.tokens, self.expired = at, tokens, False


class InFlight:
    """A key's requests in flight in this process."""

    def __init__(self) -> None:
        self.count = 0

    def take(self, limit: int) -> Slot | Refusal:
        if limit and self.count >= limit:
            return Refusal("parallel")
        self.count += 1
        return Slot(self._release)

    def _release(self) -> None:
        self.count -= 1


class LocalBudget:
    """A budget as this process sees it: `base()` (used outside its requests in flight) plus
    `held` (what those requests reserved). `spent`: told the tokens of each request once settled
    or charged here (Redis's fallback owes them to its counter; None: the usage table has them)."""

    def __init__(self, base: Callable[[], int], spent: Callable[[int], None] | None = None) -> None:
        self.base, self.spent, self.held = base, spent, 0

    def exhausted(self, limits: KeyLimits) -> Refusal | None:
        if limits.budget and (used := self.base()) >= limits.budget:
            return Refusal("budget", used=used, reserved=self.held)
        return None

    def reserve(self, limits: KeyLimits, tokens: int) -> int | Refusal:
        """What it now holds for the request (0 without a budget), or a Refusal."""
        if not limits.budget:
            return 0
        used = self.base()
        if used + self.held + tokens > limits.budget:
            return Refusal("budget", used=used, reserved=self.held, tokens=tokens)
        self.held += tokens
        return tokens

    def settle(self, held: int, tokens: int) -> None:
        self.held -= held
        self.charge(tokens)

    def charge(self, tokens: int) -> None:
        if self.spent is not None and tokens:
            self.spent(tokens)


class MemoryStore:
    """`Store` (quota/policy) over this process's memory."""

    def __init__(self, budget: LocalBudget, inflight: InFlight | None = None) -> None:
        self.budget, self.inflight = budget, inflight or InFlight()
        self._requests: deque[float] = deque()
        self._tokens: deque[Charge] = deque()
        self._token_sum = 0

    def _expire(self, now: float) -> None:
        while self._requests and self._requests[0] <= now - WINDOW:
            self._requests.popleft()
        while self._tokens and self._tokens[0].at <= now - WINDOW:
            c = self._tokens.popleft()
            c.expired = True
            self._token_sum -= c.tokens

    @property
    def used(self) -> int:
        """Tokens spent or reserved in the last minute."""
        self._expire(time.monotonic())
        return self._token_sum

    async def admit(self, limits: KeyLimits) -> Slot | None | Refusal:
        now = time.monotonic()
        self._expire(now)
        if limits.max_parallel and self.inflight.count >= limits.max_parallel:
            return Refusal("parallel")
        if limits.rpm and len(self._requests) >= limits.rpm:
            return Refusal("rpm", retry_after=self._requests[0] + WINDOW - now)
        if limits.tpm and self._token_sum >= limits.tpm:
            return Refusal("tpm", retry_after=self._tokens[0].at + WINDOW - now, used=self._token_sum)
        if (no := self.budget.exhausted(limits)) is not None:
            return no
        self._requests.append(now)
        return self.inflight.take(limits.max_parallel)

    async def reserve(self, limits: KeyLimits, tokens: int, check: bool) -> tuple[Charge, int] | Refusal | None:
        now = time.monotonic()
        self._expire(now)
        if not check:
            self._charge(now, tokens)
            self.budget.charge(tokens)
            return None
        if limits.tpm and self._token_sum + tokens > limits.tpm:
            return Refusal("tpm", retry_after=self._frees(limits.tpm, tokens, now), used=self._token_sum,
                           tokens=tokens)
        held = self.budget.reserve(limits, tokens)
        if isinstance(held, Refusal):
            return held
        return self._charge(now, tokens), held

    async def settle(self, hold: tuple[Charge, int], reserved: int, tokens: int) -> None:
        self.unsettled(hold, reserved, tokens)

    def unsettled(self, hold: tuple[Charge, int], reserved: int, tokens: int) -> None:
        charge, held = hold
        if not charge.expired:     # a charge older than the window no longer counts either way
            self._token_sum += tokens - charge.tokens
            charge.tokens = tokens
        self.budget.settle(held, tokens)

    def _charge(self, now: float, tokens: int) -> Charge:
        charge = Charge(now, tokens)
        self._tokens.append(charge)
        self._token_sum += tokens
        return charge

    def _frees(self, tpm: int, tokens: int, now: float) -> float:
        """Seconds until enough of the window expires for `tokens` more to fit."""
        left = self._token_sum
        for c in self._tokens:
            left -= c.tokens
            if left + tokens <= tpm:
                return c.at + WINDOW - now
        return WINDOW


def book_used(quota: KeyQuota) -> Callable[[], int]:
    """The budget's usage as control/budget.BudgetBook has it (0 without one)."""
    def used() -> int:
        book = quota.book
        return book.used(quota.key_id, quota.budget_period) if book is not None and quota.budget_period else 0
    return used


class MemoryQuotas(Backend):
    """`[quota] backend = "memory"`: each key counted by this process alone; nothing to fall back from."""

    def stores(self, quota: KeyQuota, name: str) -> tuple[Store, Store | None]:
        return MemoryStore(LocalBudget(book_used(quota))), None
