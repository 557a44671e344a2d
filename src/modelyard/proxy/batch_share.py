"""Batch priority on a remote endpoint (issue 23): batch-priority requests hold at most
`batch_share` of the endpoint's capacity, the rest is left to interactive traffic.

The upstream's scheduler is not ours, so the only lever is how many batch requests we send at
once. Capacity is counted, not probed: replicas (spec.urls) x spec.parallel, the requests each
replica is counted to serve at once. A batch request over the share waits here, in arrival
order, until one ends or its deadline passes (DeadlineExceeded); it does not fail for waiting.
Interactive requests never wait here. The count is this gateway's: N gateways in front of one
upstream each send up to their share (set batch_share / N to hold the total).
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from ..errors import DeadlineExceeded
from ..settings import EndpointSpec


def batch_limit(spec: EndpointSpec) -> int:
    """Batch requests the endpoint sends at once: its share of the capacity, at least one (a
    share that rounds to none would leave batches waiting for ever)."""
    return max(1, math.floor(spec.batch_share * len(spec.urls) * spec.parallel))


class BatchShare:
    def __init__(self, spec: EndpointSpec) -> None:
        self.name = spec.name
        self.limit = batch_limit(spec)
        self._free = asyncio.Semaphore(self.limit)     # FIFO among waiters
        self.in_flight = 0
        self.waiting = 0

    @asynccontextmanager
    async def hold(self, deadline: float | None) -> AsyncIterator[None]:
        """One of the batch places for the block; waits for one until `deadline` (monotonic)."""
        self.waiting += 1
        try:
            if deadline is None:
                await self._free.acquire()
            else:
                try:
                    await asyncio.wait_for(self._free.acquire(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(
                        f"batch request's deadline passed while it waited for endpoint {self.name!r}'s batch share "
                        f"({self.limit} batch requests at once)") from None
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._free.release()

    def status(self) -> dict[str, int]:
        return {"batch_limit": self.limit, "batch_in_flight": self.in_flight, "batch_waiting": self.waiting}
