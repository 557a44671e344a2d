"""When embedded models are loaded and unloaded: on demand, keep-alive, and a memory budget.

The policy's decisions, each in one place:

- `plan_room`: which loaded endpoints to evict so that one more fits the budget (MiB and count):
  the least recently used idle ones, never one with requests pending or in flight; None when
  even evicting every idle one would not make room (then nothing is evicted, and the request
  that asked gets a 503 naming the budget, what is loaded and what it needs: `no_room`).
- `keep_alive_after`: how long an endpoint stays loaded once idle (the longest a pending
  request asked for, else its spec's).
- `Lifecycle.sweep`: every tick, endpoints idle past their `expires_at` are parked (marked for
  unloading); their reconciler (registry) does the unloading, drained first.

The request path only *asks*: `Registry.serve` holds the endpoint (pending + 1) and, when it is
parked, unparks it and waits for the load its reconciler does. Loads that need room take the
budget's lock, so two loads never count the same free memory.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Iterable

from ..errors import QueueFull
from ..settings import NEVER, Settings
from .endpoint import Endpoint, EndpointState

MIB = 1 << 20
SWEEP_INTERVAL = 0.2        # seconds between looks for idle endpoints past their keep_alive
RETRY_AFTER = 5.0           # what a 503 for want of room tells the client to wait


@dataclass(frozen=True)
class Loaded:
    """One loaded embedded endpoint as the budget sees it."""
    name: str
    bytes: int
    last_used: float
    busy: bool


def plan_room(need: int, loaded: Iterable[Loaded], budget: int, max_models: int) -> list[str] | None:
    """The endpoints to evict, least recently used first, so that one needing `need` bytes fits
    `budget` bytes and `max_models` models (0: no bound); None when it cannot fit."""
    loaded = sorted(loaded, key=lambda e: e.last_used)
    used, count, out = sum(e.bytes for e in loaded), len(loaded), []

    def fits() -> bool:
        return (not budget or used + need <= budget) and (not max_models or count + 1 <= max_models)
    for e in loaded:
        if fits():
            return out
        if not e.busy:
            out.append(e.name)
            used, count = used - e.bytes, count - 1
    return out if fits() else None


def keep_alive_after(ep: Endpoint) -> float:
    """Seconds it stays loaded once idle: the longest keep_alive a request asked for while it was
    pending (-1, never, is the longest), else its spec's."""
    return ep.spec.keep_alive if ep.asked_keep_alive is None else ep.asked_keep_alive


def longer(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return b if a is None else a
    return NEVER if NEVER in (a, b) else max(a, b)


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / MIB, 1)


class Lifecycle:
    """The budget and the idle sweep of one registry's endpoints."""

    def __init__(self, settings: Settings) -> None:
        self.budget = settings.memory_budget_mib * MIB
        self.max_models = settings.max_loaded_models
        self.load_timeout = settings.load_timeout
        self.lock = asyncio.Lock()      # one load making room at a time

    @property
    def bounded(self) -> bool:
        return bool(self.budget or self.max_models)

    # ---- holding an endpoint (the request path) ---------------------------------------------

    @staticmethod
    def hold(ep: Endpoint, keep_alive: float | None) -> None:
        ep.pending += 1
        ep.asked_keep_alive = longer(ep.asked_keep_alive, keep_alive)
        ep.last_used, ep.expires_at = time.time(), None

    @staticmethod
    def release(ep: Endpoint) -> None:
        ep.pending -= 1
        ep.last_used = time.time()
        if ep.pending == 0:
            keep = keep_alive_after(ep)
            ep.asked_keep_alive = None
            ep.expires_at = None if keep == NEVER else ep.last_used + keep

    @staticmethod
    def loaded(ep: Endpoint) -> None:
        """Its load is done: idle from now (if nobody waits), by its own keep_alive."""
        ep.last_used = ep.last_used or time.time()
        if ep.pending == 0:
            keep = keep_alive_after(ep)
            ep.expires_at = None if keep == NEVER else time.time() + keep

    # ---- the budget --------------------------------------------------------------------------

    def check_fits(self, ep: Endpoint, need: int) -> None:
        """A model that could never fit the budget, even alone: the configuration's mistake."""
        if self.budget and need > self.budget:
            from ..errors import ConfigError
            raise ConfigError(f"endpoint {ep.name!r} needs {mib(need)} MiB loaded (weights, KV cache for its "
                              f"context x parallel, compute buffers, prefix cache), more than [server] "
                              f"memory_budget_mib = {self.budget // MIB}", param="memory_budget_mib")

    def plan(self, ep: Endpoint, need: int, endpoints: Iterable[Endpoint]) -> list[Endpoint]:
        """The endpoints to evict for `ep`, or QueueFull (503, Retry-After) when nothing can."""
        others = [e for e in endpoints if e is not ep and e.resident is not None and e.spec.engine == "llamacpp"]
        victims = plan_room(need, [Loaded(e.name, e.resident, e.last_used or 0.0, busy(e)) for e in others],
                            self.budget, self.max_models)
        if victims is None:
            raise no_room(ep, need, others, self.budget, self.max_models)
        return [e for e in others if e.name in victims]

    # ---- the idle sweep ----------------------------------------------------------------------

    def expired(self, endpoints: Iterable[Endpoint], now: float) -> list[Endpoint]:
        return [ep for ep in endpoints
                if ep.spec.engine == "llamacpp" and ep.state is EndpointState.READY and not ep.parked
                and ep.desired == "loaded"
                and ep.expires_at is not None and now >= ep.expires_at and not busy(ep)]


def busy(ep: Endpoint) -> bool:
    """Requests pending (waiting or served) or still in its engine: never unloaded or evicted."""
    return ep.pending > 0 or bool(ep.engine is not None and ep.engine.status().get("in_flight", 0))


def no_room(ep: Endpoint, need: int, loaded: list[Endpoint], budget: int, max_models: int) -> QueueFull:
    held = ", ".join(f"{e.name!r} ({mib(e.resident)} MiB, {'busy' if busy(e) else 'idle'})" for e in loaded) or "none"
    bound = " and ".join(b for b in (f"memory_budget_mib = {budget // MIB}" if budget else "",
                                     f"max_loaded_models = {max_models}" if max_models else "") if b)
    return QueueFull(f"model endpoint {ep.name!r} needs {mib(need)} MiB to load, and nothing can be evicted "
                     f"under [server] {bound}: loaded are {held}; retry when one is idle",
                     param="model", code="memory_budget_exceeded", retry_after=RETRY_AFTER)
