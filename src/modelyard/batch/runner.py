"""`BatchRunner`: this gateway's share of every batch's work (docs/batches.md).

Every gateway on the database runs one. Each round (`[server] batch_lease_seconds` / 3 apart, or
at once when a line ends or a batch is created here) it:

- renews the leases of the lines it runs, and aborts those of a batch that stopped being in
  progress (cancelled or expired through any gateway);
- takes a batch's one-gateway phase if one is due (control/batches.take): fails a batch whose
  validating gateway died, finalizes one whose lines are all done, ends a cancelled one once no
  line of it runs anywhere, expires one past its 24 h;
- leases open lines up to `[server] batch_concurrency` in flight here, and runs each.

A line runs through the whole app in process, as the key that created the batch (the scope's
`api/scope.BATCH_CALLER`): the same route, pipeline, engine and accounting as the online request,
so its body is the one the online request gets, its tokens are the key's (marked as batch in
usage), and its engine requests run at batch priority (api/openai/pipeline.ledgered). A line the
server could not run yet (the key's rate limit or in-flight bound: 429, an endpoint not ready, a
stale control store: 503) is released to be retried, not stored as failed; one refused for the
key's budget is stored with that 429 (docs/batches.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from typing import Any

from ..api.scope import BATCH_CALLER, BATCH_LINE
from ..control.batches import BatchStore, Line

log = logging.getLogger("modelyard.batches")
RETRY = 2                # seconds before a line refused for now (429, not ready) is tried again
RETRIED_CODES = ("model_not_ready", "control_store_unavailable")


class BatchRunner:
    def __init__(self, app: Any, responses: Any, settings: Any) -> None:
        self.app, self.responses = app, responses
        self.lease = max(2, int(settings.batch_lease_seconds))
        self.concurrency = settings.batch_concurrency
        # who holds a lease: this process (host, pid, a random part: a restarted one is another)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.running: dict[tuple[str, int], tuple[Line, asyncio.Task]] = {}
        self._store: BatchStore | None = None
        self._open_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task | None = None
        self._renewed = 0.0
        self.stopping = False
        self.lines_run = 0          # lines this process stored (tests, logs)

    async def store(self) -> BatchStore:
        """The store, opened on first use (the responses' database: control/responses), and
        this gateway's rounds started with it."""
        if self._store is None:
            async with self._open_lock:
                if self._store is None:
                    self._store = BatchStore(await self.responses.database())
                    self._loop = asyncio.create_task(self._rounds(), name="batch-runner")
        return self._store

    def wake(self) -> None:
        self._wake.set()

    async def _rounds(self) -> None:
        while not self.stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.lease / 3)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._round()
            except Exception:  # noqa: BLE001 - the next round runs; the log says why
                log.exception("batch runner round failed (retried next round)")

    async def _round(self) -> None:
        store = self._store
        now = time.monotonic()
        if self.running and now - self._renewed >= self.lease / 3:
            self._renewed = now
            keys = list(self.running)
            stopped = await asyncio.to_thread(store.renew, self.token, keys, int(time.time()) + self.lease)
            for batch_id in stopped:
                await self.stop_batch(batch_id)
        phase = await asyncio.to_thread(store.take, self.lease)
        if phase is not None:
            await self._phase(*phase)
            self.wake()              # there may be more
        free = self.concurrency - len(self.running)
        # draining (SIGTERM: server.py): the lines in flight finish, no new one starts here
        if free > 0 and not self.stopping and not getattr(self.app.state, "shutting_down", False):
            for line in await asyncio.to_thread(store.lease_lines, self.token, free, self.lease):
                task = asyncio.create_task(self._run(line), name=f"batch {line.batch_id}:{line.line}")
                self.running[(line.batch_id, line.line)] = (line, task)
            if not self._renewed:
                self._renewed = now

    async def _phase(self, batch_id: str, what: str) -> None:
        store = self._store
        log.info("batch %s: %s", batch_id, what)
        if what == "validate":
            await asyncio.to_thread(store.fail_validation, batch_id)
        else:
            ending = {"finalize": "completed", "cancel": "cancelled", "expire": "expired"}[what]
            await asyncio.to_thread(store.finalize, batch_id, ending)

    async def _run(self, line: Line) -> None:
        store = self._store
        stored = False
        try:
            status, body = await self.call(line)
            code = body["error"].get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) \
                else None
            # a budget spent is the line's answer (it would not reset within the window, or
            # not soon); a rate limit, the key's in-flight bound or an endpoint not ready pass
            retry = (status in (429, 503) and code != "budget_exceeded") or code in RETRIED_CODES
            if not retry:
                result = {"id": f"batch_req_{line.batch_id[6:]}_{line.line}", "custom_id": line.custom_id,
                          "response": {"status_code": status, "request_id": f"req_{secrets.token_hex(12)}",
                                       "body": body}, "error": None}
                stored = True
                if await asyncio.to_thread(store.finish_line, line, 200 <= status < 300, result):
                    self.lines_run += 1
            else:
                await asyncio.to_thread(store.release_line, line, self.token, int(time.time()) + RETRY)
                stored = True
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - the line is tried again later; the log says why
            log.exception("batch %s line %d could not be run or stored (tried again in %ss)", line.batch_id,
                          line.line, RETRY)
            try:
                await asyncio.to_thread(store.release_line, line, self.token, int(time.time()) + RETRY)
                stored = True
            except Exception:  # noqa: BLE001 - released below, or its lease passes
                pass
        finally:
            self.running.pop((line.batch_id, line.line), None)
            if not stored:               # aborted (cancel, shutdown) or broken: open again now
                try:
                    await asyncio.shield(asyncio.to_thread(store.release_line, line, self.token, None))
                except BaseException:  # noqa: BLE001 - its lease passes instead
                    pass
            self.wake()

    async def call(self, line: Line) -> tuple[int, Any]:
        """The line's request through the whole app, in process, as the batch's key."""
        body = json.dumps({**line.body, "stream": False} if line.endpoint != "/v1/embeddings" else line.body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": line.endpoint, "raw_path": line.endpoint.encode(), "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "extensions": {},
                 "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 BATCH_CALLER: line.key_id, BATCH_LINE: {"batch_id": line.batch_id, "line": line.line}}
        sent = False
        ended = asyncio.Event()

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await ended.wait()
            return {"type": "http.disconnect"}
        status, chunks = 500, []

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
        try:
            await self.app(scope, receive, send)
        except Exception:
            # Starlette re-raises a route's unexpected error after its 500 went out: that 500 is
            # the line's answer, as it would be the online request's
            if not chunks:
                raise
        finally:
            ended.set()
        raw = b"".join(chunks)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    async def stop_batch(self, batch_id: str) -> None:
        """Abort this gateway's lines of `batch_id` (cancelled): released, not stored."""
        tasks = [task for (b, _), (_, task) in list(self.running.items()) if b == batch_id]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.wake()

    async def stop(self) -> None:
        """Shutdown: no more rounds; the lines running here are released for another gateway."""
        self.stopping = True
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        tasks = [task for _, task in self.running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
