"""The one long-lived engine thread both embedded engines run (LocalEngine, EmbeddingEngine):
started with a load future, fed through an inbox, stopped with what reached the inbox too late
refused. One home, so the two cannot drift apart.

ggml's OpenMP workers meet at a barrier about a thousand times per token; calling llama_decode
from changing threads makes them sleep and wake at every barrier (up to 3x per token). So one
thread, created here, ever touches the llama context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Callable

from ..errors import EndpointNotReady, EngineError, ModelyardError

STOP = object()             # the inbox item that ends the thread
STOPPED = "the endpoint is stopped"


class EngineThread:
    """Mixed into an engine: `_main(started)` runs on the thread and sets `started` once loaded;
    `_refuse(item)` ends an "add" item that reached the inbox after the stop."""

    def _init_thread(self) -> None:
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    _main: Callable[[concurrent.futures.Future], None]
    _refuse: Callable[[object], None]

    async def _start_thread(self, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(started,), name=f"engine-{name}", daemon=True)
        self._thread.start()
        loaded = asyncio.wrap_future(started)
        try:
            await asyncio.shield(loaded)
        except asyncio.CancelledError:
            # Stopped while loading: the thread finishes loading (a C call cannot be cut), then
            # reads the stop and closes what it made. Waiting for that keeps nothing leaking.
            await self.stop()
            if loaded.done() and not loaded.cancelled():
                loaded.exception()      # a load that failed after all needs no "never retrieved"
            raise

    async def stop(self) -> None:
        """Ends the engine thread (requests in flight end with an error); later requests are
        refused at once. Safe to call twice, and while the model is still loading."""
        self._stopped = True
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put((STOP, None))
            await asyncio.to_thread(self._thread.join)
        # Items that reached the inbox after the stop was read never reach a step: end them.
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._refuse(arg)

    def _check_running(self) -> None:
        if self._stopped or self._thread is None or not self._thread.is_alive():
            raise self._not_running()

    def _not_running(self) -> ModelyardError:
        """What a request gets when its engine is stopped, or stops under it (an unload, a delete,
        a reload, a shutdown): the endpoint is not ready, as it is for a request that arrives
        then (400 model_not_ready), never a 500: nothing broke."""
        if self._stopped:
            return EndpointNotReady(f"{STOPPED} (unloaded, deleted, reloaded or the server is shutting down): "
                                    "retry once it is ready", param="model", code="model_not_ready")
        return EngineError("the engine is not running")
