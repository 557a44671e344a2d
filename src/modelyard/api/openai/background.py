"""Background responses (`background: true`): generated detached from the client that asked.

The request is checked and its engine stream primed while the client waits (a bad request is
still its 400, not a failed response), the response is stored `in_progress` and answered at
once, and a task of this process reads the generation to its end and stores the result
(completed, incomplete, failed; `POST /responses/{id}/cancel` makes it cancelled and stops the
task if it runs here). The client may leave: nothing watches its connection.

The request's deadline (`request_timeout`, X-Request-Timeout) applies as to any generation. The
request's ledger (quota/ledger) goes with the task, so the key's in-flight slot is held
until the generation ends rather than given back with the HTTP answer, and its tokens settle as
any request's do.

Never left in progress for ever: the gateway running a response renews its lease every
LEASE / 3 seconds (and stops a run that was cancelled through another gateway sharing the
database), and a response whose lease passed (its gateway died, however) is marked
failed by whichever gateway sweeps next (control/responses.fail_stale: at the store's opening,
and every lease round).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from fastapi import Request

from ...engine.types import EngineRequest, ModelType
from ...periodic import Periodic
from ...quota.ledger import RequestLedger
from .pipeline import check_limits, deadline_for, ledgered, ready_engine, reporter
from .response_object import ResponseWriter
from .streaming import collect, merge, prime_all

log = logging.getLogger("modelyard.responses")
LEASE = 30      # seconds a background response's gateway may go silent before it is failed


class BackgroundRuns:
    """This process's background responses in progress: id -> its task."""

    def __init__(self, responses) -> None:
        self.responses = responses       # control/responses.Responses
        self.tasks: dict[str, asyncio.Task] = {}
        self._lease = Periodic("responses-leases", LEASE / 3, self._renew, log=log,
                               failure="background response lease renewal failed (retried next round)")
        self._leasing = False
        self._stopping = False

    async def _renew(self) -> None:
        store = await self.responses.store()
        await asyncio.to_thread(store.fail_stale)
        if self.tasks:
            ended = await asyncio.to_thread(store.renew, list(self.tasks), int(time.time()) + LEASE)
            for rid in ended:           # cancelled through another gateway: stop generating
                task = self.tasks.get(rid)
                if task is not None:
                    task.cancel()

    async def start(self, request: Request, body, out: ResponseWriter, owner: str | None, items: list[dict],
                    build: Callable[[float | None], list[EngineRequest]],
                    settle: Callable[[ResponseWriter], Awaitable[dict]]) -> dict:
        """Check and prime the generation, store the response in progress, run it detached;
        the stored response as it is now."""
        out.on_done = reporter(request, body.model)
        check_limits(request.app.state.settings.limits, 1, (), None, 1)
        engine = await ready_engine(request, body.model, ModelType.COMPLETIONS)
        events = merge(await prime_all([engine.generate(r) for r in ledgered(request, body.model,
                                                                             build(deadline_for(request)))]))
        ledger: RequestLedger = request.state.ledger
        request.state.ledger = RequestLedger()      # the HTTP answer's end closes this one, not the run's
        now = out.response("in_progress", [], None)
        try:
            await self.responses.run("save", owner, now, items, int(time.time()) + LEASE)
        except BaseException:
            await events.aclose()
            ledger.close()
            raise
        self.tasks[out.id] = asyncio.create_task(self._run(out, events, ledger, settle), name=f"background {out.id}")
        if not self._leasing:
            self._leasing = True
            self._lease.start()
        return now

    async def _run(self, out: ResponseWriter, events, ledger: RequestLedger,
                   settle: Callable[[ResponseWriter], Awaitable[dict]]) -> None:
        try:
            await collect(events, out, settle)
        except asyncio.CancelledError:        # cancelled (stored so already), or the server stopping
            failed = {"code": "server_error", "message": "the gateway running it shut down"}
            await self._end(out.response("failed", [], None, failed) if self._stopping
                            else out.response("cancelled", [], None))
        except Exception as exc:  # noqa: BLE001 - the response says it failed; the log says why
            log.warning("background response %s failed: %s: %s", out.id, type(exc).__name__, exc)
            message = exc.message if hasattr(exc, "message") else f"internal error: {type(exc).__name__}"
            await self._end(out.response("failed", [], None, {"code": "server_error", "message": message}))
        finally:
            await events.aclose()
            ledger.close()
            self.tasks.pop(out.id, None)

    async def _end(self, body: dict) -> None:
        try:
            await self.responses.run("finish", body)
        except Exception:  # noqa: BLE001 - its lease passes, and the sweep fails it
            log.exception("background response %s: its end could not be stored", body["id"])

    async def cancel(self, owner: str | None, response_id: str) -> dict:
        body = await self.responses.run("cancel", owner, response_id)      # 404 / 400 before anything stops
        task = self.tasks.get(response_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return await self.responses.run("get", owner, response_id) if task is not None else body

    async def stop(self) -> None:
        """Shutdown: what runs here is failed now rather than when its lease passes."""
        self._stopping = True
        await self._lease.stop()
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
