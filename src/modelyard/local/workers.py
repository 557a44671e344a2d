"""Workers: a small, bounded pool of threads of one kind of work, awaited from the event loop.

asyncio.to_thread runs everything on the loop's one default pool (cpu + 4 threads): a kind of
work that piles up there (long prompts to tokenize, grammars to compile) held every thread, and
unrelated work queued behind it (the control plane's sync and database calls use that pool
too). Each kind gets its own pool instead, and a bound on what may wait for it: past the bound
the caller gets a 503 with Retry-After at once, never a wait behind work it has no part in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, TypeVar

from ..errors import QueueFull

T = TypeVar("T")

THREADS = 2          # one per core of the machines this was measured on; the GIL is dropped in llama.cpp
WAITING = 64         # jobs queued or running at once; one more is a 503


class Workers:
    def __init__(self, name: str, threads: int = THREADS, waiting: int = WAITING) -> None:
        self.name = name
        self.limit = waiting
        self.pending = 0                 # submitted, not finished (the event loop's count)
        # never shut down: a job arriving after its engine stopped reaches the engine's own
        # check (EngineError), and the threads end with the pool when the engine is dropped
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on one of these threads; QueueFull if `limit` jobs are already waiting."""
        if self.pending >= self.limit:
            raise QueueFull(f"{self.name}: {self.pending} jobs are waiting for its threads (the limit); "
                            "retry shortly", retry_after=1.0)
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.pending -= 1
