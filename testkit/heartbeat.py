"""`Heartbeat`: a coroutine that ticks every 10 ms on the running event loop; the longest gap
between its ticks is how long the loop was blocked (a test that a call never waits on a
stopped database or Redis on the event loop)."""

from __future__ import annotations

import asyncio
import time


class Heartbeat:
    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.ticks: list[float] = []
        self._task: asyncio.Task | None = None

    async def _beat(self) -> None:
        while True:
            self.ticks.append(time.monotonic())
            await asyncio.sleep(self.every)

    def start(self) -> "Heartbeat":
        self._task = asyncio.ensure_future(self._beat())
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.ticks, self.ticks[1:])), default=0.0)
