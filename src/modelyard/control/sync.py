"""Keeps this process's view of the stored keys fresh: a change made through any process (a key
created, limited or revoked) takes effect here within POLL seconds.

A poll of the active keys (a small table, one indexed query a second) works the same on SQLite
and PostgreSQL; PostgreSQL's LISTEN/NOTIFY would cut the delay further and is left for later.
This process's own writes are applied at once (`refresh` after each admin call). The same poll
refreshes the admin tokens stored by `modelyard admin` (`also`).
"""

from __future__ import annotations

import asyncio
import logging

from ..api.auth import KeyChecker
from .keys import KeyStore

log = logging.getLogger("modelyard.control")
POLL = 1.0       # seconds; the propagation bound is POLL plus one query


class KeySync:
    def __init__(self, store: KeyStore, checker: KeyChecker, interval: float = POLL, also=()) -> None:
        self.store, self.checker, self.interval = store, checker, interval
        self.also = also        # more views with a blocking refresh() on the same poll (control/admin_tokens)
        self._task: asyncio.Task | None = None
        self.failures = 0

    async def refresh(self) -> None:
        self.checker.replace_stored(await asyncio.to_thread(self.store.active))
        for view in self.also:
            await asyncio.to_thread(view.refresh)

    async def start(self) -> None:
        await self.refresh()          # serve no request before the stored keys are known
        self._task = asyncio.create_task(self._loop(), name="control-key-sync")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last good set; say so
                self.failures += 1
                log.error("cannot read the API keys from the control store (keeping the last set): %s: %s",
                          type(exc).__name__, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
