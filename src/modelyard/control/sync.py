"""Keeps this process's view of the control store fresh: a change made through any process (a
key created, limited or revoked; an endpoint created, changed, unloaded or deleted) takes
effect here within POLL seconds, usually far sooner (control/notify wakes the loop on
PostgreSQL's NOTIFY or SQLite's data_version).

Each refresher reads one small table with one query and applies it (keys; the admin tokens
stored by `modelyard admin`; endpoints, `EndpointSync` below); this process's own writes are applied at once (`refresh`
after each admin call).

Fail closed: while the database does not answer, this process keeps its last view, and a key or
token revoked meanwhile would stay valid here without bound. So once `fail_closed_after` seconds
have passed since the last successful refresh, `stale()` says so and the stored keys and admin
tokens are refused (503 control_store_unavailable; quota/keys, api/admin/auth, console/session); the
configured ones, which do not depend on the database, still work. It is measured at each check,
not by the loop, because a refresh against a database that hangs (a stopped host) never returns.
A watcher logs entering and leaving that state, once each, and feeds the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from ..periodic import Periodic
from ..quota.keys import KeyChecker
from ..registry.registry import Registry
from .endpoints import EndpointStore, StoredEndpoint
from .keys import KeyStore
from .notify import ChangeFeed

log = logging.getLogger("modelyard.control")
POLL = 1.0       # seconds; the propagation bound is POLL plus one query

Refresher = Callable[[], Awaitable[None]]


class ControlSync:
    def __init__(self, store: KeyStore, checker: KeyChecker, interval: float = POLL,
                 feed: ChangeFeed | None = None, also: tuple[Refresher, ...] = (),
                 fail_closed_after: float = 60.0) -> None:
        self.store, self.checker, self.interval = store, checker, interval
        self.feed = feed
        self.fail_closed_after = fail_closed_after
        self._refreshers: tuple[Refresher, ...] = (self._keys, *also)
        self._loops: list[Periodic] = []       # the sync and the fail-closed watcher, once started
        self.failures = 0
        self.last_ok = time.monotonic()     # the last refresh that read every table
        self.closed = False                 # what the watcher last logged

    def age(self) -> float:
        """Seconds since the last successful refresh."""
        return time.monotonic() - self.last_ok

    def stale(self) -> float | None:
        """Seconds without a successful refresh when past the bound (stored credentials are then
        refused), else None."""
        age = self.age()
        closed = age > self.fail_closed_after
        if closed != self.closed:       # a refusal may see the change before the watcher does
            self._mark()
        return age if closed else None

    def refusal(self, what: str) -> str:
        return (f"the control database has not answered for {int(self.age())} s (fail_closed_after = "
                f"{self.fail_closed_after:g} s): {what} are refused until it does; keys and admin tokens "
                "from the config file still work")

    async def _keys(self) -> None:
        self.checker.replace_stored(await asyncio.to_thread(self.store.active))

    async def refresh(self) -> None:
        started = time.monotonic()
        for refresh in self._refreshers:
            await refresh()
        # from when it began: a view read over a slow minute is as old as that minute
        self.last_ok = max(self.last_ok, started)
        self._mark()

    def _mark(self) -> None:
        """Logs a change between serving stored credentials and refusing them, once each way."""
        closed = self.age() > self.fail_closed_after
        if closed and not self.closed:
            log.error("control store: no successful read for %.0f s (fail_closed_after = %g s): refusing stored "
                      "API keys and admin tokens until it answers", self.age(), self.fail_closed_after)
        elif self.closed and not closed:
            log.warning("control store answers again: stored API keys and admin tokens are accepted")
        self.closed = closed

    async def start(self) -> None:
        await self.refresh()          # serve no request before the stored keys are known
        if self.feed is not None:
            self.feed.start()
        self._loops = [
            Periodic("control-sync", self.interval, self.refresh, log=log, wait=self._wake, on_error=self._failed,
                     failure="cannot read the control store (keeping the last state)"),
            Periodic("control-sync-watch", min(1.0, self.fail_closed_after / 4), self._mark, log=log,
                     failure="control store watcher failed")]
        for loop in self._loops:
            loop.start()

    async def _wake(self) -> None:
        """A round of the sync: when the change feed says something changed, or after `interval`."""
        if self.feed is not None:
            await self.feed.wait(self.interval)
        else:
            await asyncio.sleep(self.interval)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1

    async def stop(self) -> None:
        for loop in self._loops:
            await loop.stop()
        if self.feed is not None:
            await self.feed.stop()


class EndpointSync:
    """The endpoints' refresher: The stored run-time endpoints -> this process's registry: new rows are added (and load),
    changed revisions update the endpoint (a new spec reloads it; unloaded drains it), rows gone
    are deleted (drained, then dropped). Every process runs this, including the one that served
    the admin call (right after its write), so there is one path for local and remote changes.
    
    A stored endpoint whose name this process already serves from its config file is skipped
    with one log line (config wins: it is what this process was started with)."""

    def __init__(self, store: EndpointStore, registry: Registry) -> None:
        self.store, self.registry = store, registry
        self._skipped: dict[str, int] = {}       # id -> revision already logged as skipped

    async def refresh(self) -> None:
        self.apply(await asyncio.to_thread(self.store.active))

    def apply(self, rows: list[StoredEndpoint]) -> None:
        registry, ids = self.registry, set()
        for row in rows:
            ids.add(row.id)
            ep = registry.endpoints.get(row.name)
            if ep is not None and ep.id != row.id:
                # config's, or one of the same name still being deleted here: skip for now
                if ep.desired != "deleted" and self._skipped.get(row.id) != row.revision:
                    self._skipped[row.id] = row.revision
                    log.error("stored model endpoint %s (%s) is not served here: this process has a %s "
                              "endpoint of that name", row.name, row.id, ep.source)
                continue
            try:
                if ep is None:
                    ep = registry.add(row.spec, id=row.id, desired=row.desired, revision=row.revision)
                elif ep.revision != row.revision:
                    registry.update(row.name, row.spec, desired=row.desired, revision=row.revision)
            except Exception as exc:  # noqa: BLE001 - one bad row must not stop the others
                if self._skipped.get(row.id) != row.revision:
                    self._skipped[row.id] = row.revision
                    log.error("stored model endpoint %s (%s) cannot be applied here: %s", row.name, row.id, exc)
                continue
            ep.created_at, ep.updated_at = row.created_at, row.updated_at
        for ep in list(registry.endpoints.values()):
            if ep.source == "api" and ep.id not in ids and ep.desired != "deleted":
                registry.delete(ep.name)
