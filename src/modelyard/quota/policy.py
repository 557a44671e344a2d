"""One key's quota: the policy, whichever store counts it (memory, Redis, PostgreSQL).

`KeyQuota` is what a request meets: `admit()` as it arrives (rpm, tpm already spent, max_parallel,
budget already exhausted: 429, or a `Slot` it holds until it has ended), `reserve(tokens)` once
the engine knows the most it may use (prompt + n * max_tokens, resolved), held against the tpm
window AND the budget, and `settle(reservation, tokens)` once it has ended, however it ended:
what was reserved is replaced by what was computed, in both, an overage included. So a burst is
admitted only while its reservations fit, a budget has a bound without max_parallel, and nobody
gets tokens for free by disconnecting. `settle(None, tokens)` charges an engine that could not
reserve (a remote one: only the upstream tokenizes) after the fact, unchecked.

A `Store` is how one backend counts one key: the three differ only there (quota/memory,
quota/redis, quota/postgres). The policy around them is here, once:

- the limits in force, read from the key at each call (the control plane changes them at run time);
- every store call is bounded in time (asyncio.wait_for, `Backend.timeout`): a shared store that
  fails or does not answer within its bound is the fallback, never a stalled event loop;
- the fallback: this process's share of every limit (`KeyLimits.share`: limit // processes, at
  least 1, never unlimited) counted in memory by the key's `local` store; logged once each way
  and shown by `modelyard_quota_fallback`/`_fallbacks` (metrics.py reads `fallback`,
  `fallbacks`); the shared store is tried again every RETRY seconds;
- the 429s: a store answers with a `Refusal`, quota/limits words it.

A call that timed out may still have run once the store woke: it counts there although this
process used its local share: over-counted for a window, never under.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, Awaitable, Callable, Coroutine, Protocol, TypeVar

from .limits import KeyLimits, Refusal, Slot

log = logging.getLogger("modelyard.quota")
RETRY = 1.0           # seconds between attempts to get back to a shared store that failed
T = TypeVar("T")


class Store(Protocol):
    """How one backend counts one key. Every method may be cancelled at its bound (the policy's
    wait_for) and must leave the count on the safe side when it is."""

    async def admit(self, limits: KeyLimits) -> Slot | None | Refusal:
        """Count a request against rpm and max_parallel; refuse when tpm or the budget is
        already spent."""

    async def reserve(self, limits: KeyLimits, tokens: int, check: bool) -> Any:
        """Hold `tokens` in the tpm window and the budget; a hold to settle, or a Refusal.
        check=False: charged unchecked and final (nothing to settle)."""

    async def settle(self, hold: Any, reserved: int, tokens: int) -> None:
        """Replace the `reserved` tokens of `hold` by `tokens` in the window and the budget."""

    def unsettled(self, hold: Any, reserved: int, tokens: int) -> None:
        """`settle` could not reach the store: what this process does without it (what is held
        here let go; an overage owed; the reservation left counted there: the safe side)."""


class Reservation:
    """Tokens one request holds from `reserve` to `settle`, and which store holds them."""

    __slots__ = ("tokens", "store", "hold", "settled")

    def __init__(self, tokens: int, store: Store | None, hold: Any = None) -> None:
        self.tokens, self.store, self.hold, self.settled = tokens, store, hold, False


class Background:
    """Work a synchronous caller starts and nobody awaits (a slot's release in Redis, a settle
    from an engine's callback): kept referenced until done, its failure logged."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("quota: background work failed: %r", task.exception())

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Backend:
    """What every backend has: its stores per key, the fallback state, `prepare`/`close`.
    Subclasses set `name`, `errors` (their client's failures) and `timeout`, and make stores."""

    name = "memory"
    errors: tuple[type[BaseException], ...] = ()
    timeout = 0.25
    bounded_by_client = False       # True: the client's own timeouts end every call within `timeout`

    def __init__(self, processes: int = 1) -> None:
        self.processes = max(1, processes)
        self.fallback = False
        self.fallbacks = 0            # times this process fell back (a counter for /metrics)
        self._down_since = 0.0
        self.background = Background()

    def quota(self, rpm: int, tpm: int, ident: bytes) -> "KeyQuota":
        """A key's quota; `ident` names it in the shared store (quota/keys: the key's stable id,
        never its secret; only a digest of it reaches the store)."""
        quota = KeyQuota(self, rpm, tpm)
        quota.store, quota.local = self.stores(quota, hashlib.sha256(b"modelyard-quota:" + ident).hexdigest()[:24])
        return quota

    def stores(self, quota: "KeyQuota", name: str) -> tuple[Store, Store | None]:
        """The key's shared store and its local fallback (None: the store is local)."""
        raise NotImplementedError

    async def prepare(self) -> None:
        """At start, before any request."""

    async def close(self) -> None:
        await self.background.drain()

    async def call(self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]] | None) -> T:
        """`shared()` within the bound, else `local()` (the fallback)."""
        if local is None:
            return await shared()
        if self.fallback and time.monotonic() - self._down_since < RETRY:
            return await local()
        try:
            # A client whose own socket timeouts bound every call (Redis's) needs no wait_for:
            # it costs a task per call, a fifth of an admission's CPU on the request path.
            out = await (shared() if self.bounded_by_client else asyncio.wait_for(shared(), self.timeout))
        except (asyncio.TimeoutError, *self.errors) as exc:
            self.down(exc)
            return await local()
        if self.fallback:
            log.warning("%s answers again: quotas are shared across processes again", self.name)
            self.fallback = False
        return out

    def down(self, exc: BaseException) -> None:
        if not self.fallback:
            why = "no answer within %.2f s" % self.timeout if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
            log.error("%s unreachable for quotas (%s): each key gets 1/%d of its quota in this process until it "
                      "answers", self.name, why, self.processes)
            self.fallbacks += 1
        self.fallback, self._down_since = True, time.monotonic()


class KeyQuota:
    """One key: its limits (set by quota/keys, changed at run time), its store and its fallback."""

    def __init__(self, backend: Backend, rpm: int, tpm: int) -> None:
        self.backend = backend
        self.rpm, self.tpm = rpm, tpm
        self.endpoints: frozenset[str] | None = None    # a stored key may be limited to these endpoints
        self.key_id = ""                    # the key's id in usage records (never its secret)
        self.expires_at: int | None = None  # unix seconds (a stored key's expiry)
        self.max_parallel = 0               # requests in flight at once (0: no limit)
        self.budget_tokens = 0              # tokens per budget_period (0: no budget)
        self.budget_period: str | None = None
        self.book = None                    # control/budget.BudgetBook: what the budget's period used
        self.store: Store
        self.local: Store | None = None

    @property
    def limits(self) -> KeyLimits:
        return KeyLimits(self.rpm, self.tpm, self.max_parallel, self.budget_tokens, self.budget_period)

    @property
    def metered(self) -> bool:
        """Whether its engine requests reserve and settle (a tpm window, or a budget)."""
        return bool(self.tpm or (self.budget_tokens and self.budget_period))

    async def admit(self) -> Slot | None:
        """As a request arrives: its slot among the key's requests in flight (None: nothing to
        release), or RateLimited."""
        limits = self.limits
        _, out = await self._call(lambda s, lim: s.admit(lim), limits)
        if isinstance(out, Refusal):
            raise out.error(limits)
        return out

    async def reserve(self, tokens: int) -> Reservation:
        """Before any work: the most the request may use, held in the tpm window and the budget,
        or RateLimited if that does not fit."""
        if not self.metered:
            return Reservation(tokens, None)
        limits = self.limits
        store, out = await self._call(lambda s, lim: s.reserve(lim, tokens, True), limits)
        if isinstance(out, Refusal):
            raise out.error(limits)
        return Reservation(tokens, store, out)

    async def settle(self, reservation: Reservation | None, tokens: int) -> None:
        """When the request has ended: once per reservation (again: nothing). None: `tokens`
        charged unchecked (an engine that did not reserve)."""
        if reservation is None:
            if self.metered and tokens > 0:
                await self._call(lambda s, lim: s.reserve(lim, tokens, False), self.limits)
            return
        if reservation.settled:
            return
        reservation.settled = True
        store = reservation.store
        if store is None:
            return
        if store is self.local:
            await store.settle(reservation.hold, reservation.tokens, tokens)
            return
        hold, reserved = reservation.hold, reservation.tokens

        async def unsettled() -> None:
            store.unsettled(hold, reserved, tokens)
        await self.backend.call(lambda: store.settle(hold, reserved, tokens), unsettled if self.local else None)

    def _call(self, work: Callable[[Store, KeyLimits], Awaitable[T]], limits: KeyLimits) -> Awaitable[tuple[Store, T]]:
        """`work` on the shared store, or on the local one with this process's share of the
        limits; with the store that answered (it holds what was reserved)."""
        async def on(store: Store, lim: KeyLimits) -> tuple[Store, T]:
            return store, await work(store, lim)
        local = self.local
        return self.backend.call(lambda: on(self.store, limits),
                                 (lambda: on(local, limits.share(self.backend.processes))) if local else None)
