"""Keeps this process's view of the control store fresh: a change made through any process (a
key created, limited or revoked; an endpoint created, changed, unloaded or deleted) takes
effect here within POLL seconds, usually far sooner (control/notify wakes the loop on
PostgreSQL's NOTIFY or SQLite's data_version).

Each refresher reads one small table with one query and applies it (keys; the admin tokens
stored by `modelyard admin`; endpoints); this process's own writes are applied at once (`refresh`
after each admin call).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from ..api.auth import KeyChecker
from .keys import KeyStore
from .notify import ChangeFeed

log = logging.getLogger("modelyard.control")
POLL = 1.0       # seconds; the propagation bound is POLL plus one query

Refresher = Callable[[], Awaitable[None]]


class ControlSync:
    def __init__(self, store: KeyStore, checker: KeyChecker, interval: float = POLL,
                 feed: ChangeFeed | None = None, also: tuple[Refresher, ...] = ()) -> None:
        self.store, self.checker, self.interval = store, checker, interval
        self.feed = feed
        self._refreshers: tuple[Refresher, ...] = (self._keys, *also)
        self._task: asyncio.Task | None = None
        self.failures = 0

    async def _keys(self) -> None:
        self.checker.replace_stored(await asyncio.to_thread(self.store.active))

    async def refresh(self) -> None:
        for refresh in self._refreshers:
            await refresh()

    async def start(self) -> None:
        await self.refresh()          # serve no request before the stored keys are known
        if self.feed is not None:
            self.feed.start()
        self._task = asyncio.create_task(self._loop(), name="control-sync")

    async def _loop(self) -> None:
        while True:
            if self.feed is not None:
                await self.feed.wait(self.interval)
            else:
                await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last good state; say so
                self.failures += 1
                log.error("cannot read the control store (keeping the last state): %s: %s",
                          type(exc).__name__, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.feed is not None:
            await self.feed.stop()
