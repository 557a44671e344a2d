"""Runs the app under uvicorn with modelyard's shutdown: on SIGTERM/SIGINT /ready turns 503 at
once and endpoints stop admitting, while the server keeps answering (so load balancers see the
503, not a refused connection); requests in flight get `grace_period` seconds to finish, then
end with an error event (never a silent cut); the process exits 0. A second signal exits at once.
Each connection is bounded by connections.py ([server] header_timeout, max_connections, ...)."""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn
from fastapi import FastAPI

from .connections import protocol
from .settings import Settings

log = logging.getLogger("modelyard.server")


class Server(uvicorn.Server):
    def __init__(self, app: FastAPI, settings: Settings) -> None:
        # The h11 protocol with a request-head deadline and a connection cap (connections.py),
        # whatever HTTP parser happens to be installed.
        super().__init__(uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                                        log_level=settings.log_level, timeout_graceful_shutdown=5,
                                        http=protocol(settings.header_timeout, settings.max_connections,
                                                      settings.max_header_bytes),
                                        timeout_keep_alive=settings.keep_alive_timeout))  # type: ignore[arg-type]
        self.app = app
        self.grace = settings.grace_period
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        state = self.app.state
        if state.shutting_down:
            log.warning("second signal: exiting now")
            self.should_exit = self.force_exit = True
            return
        log.info("signal %s: draining; in-flight requests have %.0fs to finish", sig, self.grace)
        state.shutting_down = True
        state.registry.drain()
        self._drain = asyncio.get_event_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        registry = self.app.state.registry
        deadline = time.monotonic() + self.grace
        while registry.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if registry.in_flight:
            log.warning("grace period over: ending %d requests still in flight", registry.in_flight)
            await registry.stop()          # each ends with an error event
            await asyncio.sleep(0.2)       # let their last chunks go out
        self.should_exit = True
