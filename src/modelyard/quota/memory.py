"""Per-key quotas in this process's memory (`[quota] backend = "memory"`, the default), and the
reserve/settle pair every backend's quotas follow (quota/redis, quota/postgres derive from Quota).

Quotas are sliding one-minute windows of requests and of tokens per key; past them, 429 with
Retry-After saying when the window frees up.

Tokens are reserved before any work and settled when the request ends: the engine reserves
prompt tokens + n * max_tokens once it has tokenized the prompt and resolved max_tokens (chat
without max_tokens: the room the prompt leaves, so prompt + budget = the endpoint's context per
sequence), and settles to what it computed (prompt tokens prefilled + tokens generated) however
the request ended: finished, aborted by a client that left, failed or timed out. So a burst is
admitted only while its reservations fit, and nobody gets tokens for free by disconnecting.

A stored key may also limit its requests in flight (`max_parallel`) and its tokens per UTC day or
month (`budget_tokens`): quota/limits. In memory, the budget's "used" is the usage table's total
for the period plus this process's unflushed usage (control/budget.BudgetBook).
"""

from __future__ import annotations

import time
from collections import deque

from ..errors import RateLimited
from .limits import Slot, budget_exceeded, parallel_exceeded

WINDOW = 60.0


class Charge:
    """One engine request's tokens in its key's window: reserved at admission, then settled."""

    __slots__ = ("at", "tokens", "expired", "settled")

    def __init__(self, at: float, tokens: int) -> None:
        self.at, self.tokens, self.expired, self.settled = at, tokens, False, False


class Quota:
    def __init__(self, rpm: int, tpm: int, endpoints: frozenset[str] | None = None,
                 expires_at: int | None = None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.endpoints = endpoints          # a stored key may be limited to these endpoints
        self.key_id = ""                    # the key's id in usage records (never its secret)
        self.expires_at = expires_at        # unix seconds (a stored key's expiry)
        self.max_parallel = 0               # requests in flight at once (0: no limit)
        self.budget_tokens = 0              # tokens per budget_period (0: no budget)
        self.budget_period: str | None = None
        self.book = None                    # control/budget.BudgetBook: what the budget's period used
        self.in_flight = 0
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

    def admit(self, now: float) -> Slot:
        """Called as a request arrives: counts it and gives it a slot among the key's in-flight
        requests (released when the request has ended), or raises RateLimited."""
        self._expire(now)
        if self.max_parallel and self.in_flight >= self.max_parallel:
            raise parallel_exceeded(self.max_parallel)
        if self.rpm and len(self._requests) >= self.rpm:
            raise RateLimited(f"rate limit: {self.rpm} requests per minute for this key",
                              code="rate_limit_exceeded", retry_after=self._requests[0] + WINDOW - now)
        if self.tpm and self._token_sum >= self.tpm:
            raise RateLimited(f"rate limit: {self.tpm} tokens per minute for this key "
                              f"({self._token_sum} used in the last minute)",
                              code="rate_limit_exceeded", retry_after=self._tokens[0].at + WINDOW - now)
        if self.budget_tokens and self.budget_period and self.book is not None:
            used = self.book.used(self.key_id, self.budget_period)
            if used >= self.budget_tokens:
                raise budget_exceeded(self.budget_tokens, self.budget_period, used)
        self._requests.append(now)
        self.in_flight += 1
        return Slot(self._release)

    def _release(self) -> None:
        self.in_flight -= 1

    @property
    def metered(self) -> bool:
        """Whether its engine requests need reserve/settle (a tpm window, or a budget counted there)."""
        return bool(self.tpm)

    def reserve(self, tokens: int, now: float) -> Charge:
        """Before any work: the most a request may use, or RateLimited if that does not fit."""
        self._expire(now)
        if self.tpm and self._token_sum + tokens > self.tpm:
            why = (f"rate limit: {self.tpm} tokens per minute for this key ({self._token_sum} used in "
                   f"the last minute); this request may use up to {tokens} tokens (prompt + max_tokens)")
            if tokens > self.tpm:   # can never fit: say so rather than let the client wait
                raise RateLimited(why + f", more than the whole quota; lower max_tokens or shorten the prompt",
                                  code="rate_limit_exceeded", retry_after=WINDOW)
            raise RateLimited(why, code="rate_limit_exceeded", retry_after=self._frees(tokens, now))
        charge = Charge(now, tokens)
        self._tokens.append(charge)
        self._token_sum += tokens
        return charge

    def settle(self, charge: Charge, tokens: int) -> None:
        """When the request ends: its reservation becomes what it actually used."""
        if charge.settled:
            return
        charge.settled = True
        if not charge.expired:     # a charge older than the window no longer counts either way
            self._token_sum += tokens - charge.tokens
            charge.tokens = tokens

    def spend(self, tokens: int, now: float) -> None:
        """Charge after the fact, for an engine that does not meter (a remote one: only the
        upstream tokenizes, so nothing is known before its answer)."""
        self._expire(now)
        self._tokens.append(Charge(now, tokens))
        self._token_sum += tokens

    def meter(self) -> "Meter":
        return Meter(self)

    def _frees(self, tokens: int, now: float) -> float:
        """Seconds until enough of the window expires for `tokens` more to fit."""
        left = self._token_sum
        for c in self._tokens:
            left -= c.tokens
            if left + tokens <= self.tpm:
                return c.at + WINDOW - now
        return WINDOW


class Meter:
    """The reserve/settle pair one EngineRequest carries (see engine.types.EngineRequest)."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self.charge: Charge | None = None

    def reserve(self, tokens: int) -> None:
        self.charge = self.quota.reserve(tokens, time.monotonic())

    def settle(self, tokens: int) -> None:
        if self.charge is not None:
            self.quota.settle(self.charge, tokens)
