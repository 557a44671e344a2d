"""`Periodic`: one piece of work every N seconds in a background task, until stopped.

Every loop that keeps something fresh (the usage flush, the budget read, replica health, the
console's sampler, the control store's sync) is this one helper: a failure is logged and the
next round runs, because a loop that dies silently freezes what it keeps fresh (a replica never
marked healthy again, usage never flushed).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable


class Periodic:
    def __init__(self, name: str, interval: float, work: Callable[[], Awaitable[None] | None], *,
                 log: logging.Logger, failure: str, traceback: bool = False,
                 wait: Callable[[], Awaitable[object]] | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        # failure: what the log says went wrong ("usage flush failed (kept for the next one)");
        # traceback: log the whole stack (a surprise) rather than the exception's one line (an
        # expected failure, such as a database that does not answer); wait: what a round waits
        # for before it runs (default: `interval` seconds; the sync also wakes on a change feed)
        self.name, self.interval, self.work = name, interval, work
        self.log, self.failure, self.traceback = log, failure, traceback
        self.wait = wait or (lambda: asyncio.sleep(self.interval))
        self.on_error = on_error
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def _loop(self) -> None:
        while True:
            await self.wait()
            try:
                result = self.work()
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await result
            except Exception as exc:  # noqa: BLE001 - the loop outlives any failure; it says so
                if self.on_error is not None:
                    self.on_error(exc)
                if self.traceback:
                    self.log.exception(self.failure)
                else:
                    self.log.error("%s: %s: %s", self.failure, type(exc).__name__, exc)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
