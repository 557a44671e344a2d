"""A remote endpoint's upstream under the same keep_alive policy as an embedded model's (issue 24).

For an endpoint with `load = "on_demand"` (engine "openai"), `UpstreamSleeper`:

- holds each request, up to `hold_timeout` (the server's `load_timeout`), while no replica can
  serve it (all asleep, scaled to zero, down), instead of a 400 at once; then a 503 with
  Retry-After. Concurrent requests share one wake;
- wakes the upstream on the first request after idle (and on the first request at all, which
  asks: a router may start with the model unloaded), where it can be woken: vLLM's sleep mode
  (`POST /wake_up`, up when `GET /is_sleeping` says false) and llama-server's router mode
  (`POST /models/load {"model": upstream_model}`, up when its `GET /models` lists it "loaded");
- puts it to sleep after `keep_alive` seconds idle (`POST /sleep?level=1`; `POST /models/unload`),
  never with a request held or in flight; -1 never. A request's own `keep_alive` (Ollama's field)
  counts as on an embedded endpoint: the registry holds every endpoint from `serve` to `done`
  and keeps its `expires_at` (registry/lifecycle: the longest a pending request asked, else the
  spec's), which it hands to the sleeper as `expires_at`.

Those paths are at the server's root: a replica URL's trailing /v1 is cut. Other upstreams are
only held for (an autoscaler brings their replicas up: docs/scaling.md). What it holds and for
how long is in `status()`, which /metrics exports per endpoint (registry/lifecycle's series).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import httpx

from ..errors import QueueFull
from ..settings import NEVER, EndpointSpec
from .replicas import ReplicaPool

log = logging.getLogger("modelyard.proxy")

SLEEPERS = ("vllm", "llama-server")     # upstream_server values that can be put to sleep and woken
POLL = 0.2                               # seconds between looks at a waking upstream
CALL_TIMEOUT = 30.0                      # one wake/sleep call


def root(url: str) -> str:
    return url[:-3] if url.endswith("/v1") else url


class UpstreamSleeper:
    def __init__(self, spec: EndpointSpec, pool: ReplicaPool, hold_timeout: float = 300.0) -> None:
        self.spec, self.pool, self.hold_timeout = spec, pool, hold_timeout
        self.can_sleep = spec.upstream_server in SLEEPERS
        # whether the upstream sleeps: None until a request finds out (a router may start with the
        # model unloaded, or unload it by its own LRU); True once we put it to sleep
        self.asleep: bool | None = None
        self.held = 0                       # requests between before() and after()
        self.last_used = time.monotonic()
        self._waking: asyncio.Task | None = None
        self._idle: asyncio.Task | None = None
        # When it may sleep (time.time(); None: never): the registry's endpoint's expires_at,
        # which counts requests' keep_alive; alone (no registry), its spec's after the last use.
        self.expires_at: Callable[[], float | None] = self._own_expiry
        self.counts = {"wakes": 0, "sleeps": 0, "waiting": 0, "wait_seconds": 0.0}

    # ---- a request's life --------------------------------------------------------------------

    async def before(self) -> None:
        """Until a replica can serve (waking the upstream if it sleeps), up to hold_timeout."""
        self.held += 1
        self.last_used = time.monotonic()
        try:
            if self.asleep is not False or self.pool.ready_reason() is not None:
                await self._wait_up()
        except BaseException:
            self.after()
            raise

    def after(self) -> None:
        self.held -= 1
        self.last_used = time.monotonic()

    async def _wait_up(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.counts["waiting"] += 1
        try:
            if self._waking is None or self._waking.done():
                self._waking = asyncio.create_task(self._wake(), name=f"wake:{self.spec.name}")
            await asyncio.wait_for(asyncio.shield(self._waking), self.hold_timeout)
        except asyncio.TimeoutError:
            raise QueueFull(f"model endpoint {self.spec.name!r}: no replica came up within {self.hold_timeout:g} s "
                            "([server] load_timeout)", param="model", code="upstream_not_up",
                            retry_after=self.hold_timeout) from None
        finally:
            self.counts["waiting"] -= 1
            self.counts["wait_seconds"] += loop.time() - started

    async def _wake(self) -> None:
        """Until a replica serves: probe them, ask the healthy ones whether the model is up (vLLM
        awake, the router's model loaded), and wake them once if none is."""
        woken = False
        while True:
            await self.pool.probe_all()
            healthy = [r for r in self.pool.replicas if r.healthy]
            if any(await asyncio.gather(*(self._is_up(r.url) for r in healthy))):
                self.asleep = False
                return
            if self.can_sleep and healthy and not woken:
                await asyncio.gather(*(self._call(r.url, wake=True) for r in healthy), return_exceptions=True)
                self.counts["wakes"] += 1
                woken = True
            await asyncio.sleep(POLL)

    # ---- idle: sleep after keep_alive ---------------------------------------------------------

    def _own_expiry(self) -> float | None:
        keep = self.spec.keep_alive
        return None if keep == NEVER else time.time() - (time.monotonic() - self.last_used) + keep

    def start(self) -> None:
        # Even with keep_alive -1: a request may ask for less.
        if self.can_sleep:
            self._idle = asyncio.create_task(self._sleep_when_idle(), name=f"sleep:{self.spec.name}")

    async def stop(self) -> None:
        for task in (self._idle, self._waking):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._idle, self._waking) if t is not None), return_exceptions=True)

    async def _sleep_when_idle(self) -> None:
        while True:
            keep = self.spec.keep_alive
            await asyncio.sleep(min(1.0, max(0.1, keep / 4)) if keep != NEVER else 0.25)
            expires = self.expires_at()
            idle = time.monotonic() - self.last_used
            busy = self.held or self.pool.status()["in_flight"] or (self._waking and not self._waking.done())
            if self.asleep is not True and not busy and expires is not None and time.time() >= expires:
                self.asleep = True          # from here, a request wakes it first
                await asyncio.gather(*(self._call(r.url, wake=False) for r in self.pool.replicas),
                                     return_exceptions=True)
                self.counts["sleeps"] += 1
                log.info("endpoint %s: upstream put to sleep after %g s idle", self.spec.name, idle)

    # ---- the upstreams' dialects --------------------------------------------------------------

    async def _call(self, url: str, wake: bool) -> None:
        client, base = self.pool.client(), root(url)
        if self.spec.upstream_server == "vllm":
            resp = await client.post(base + ("/wake_up" if wake else "/sleep"), params=None if wake else {"level": 1},
                                     timeout=CALL_TIMEOUT)
        else:   # llama-server's router
            resp = await client.post(base + ("/models/load" if wake else "/models/unload"),
                                     json={"model": self.spec.upstream_model}, timeout=CALL_TIMEOUT)
        if not resp.is_success:
            log.warning("endpoint %s: %s %s answered HTTP %d", self.spec.name, "wake" if wake else "sleep",
                        base, resp.status_code)

    async def _is_up(self, url: str) -> bool:
        if not self.can_sleep:
            return True                     # healthy is all there is to know
        client, base = self.pool.client(), root(url)
        try:
            if self.spec.upstream_server == "vllm":
                resp = await client.get(base + "/is_sleeping", timeout=CALL_TIMEOUT)
                return resp.is_success and resp.json().get("is_sleeping") is False
            resp = await client.get(base + "/models", timeout=CALL_TIMEOUT)
            listed = {m.get("id"): m for m in resp.json().get("data", [])} if resp.is_success else {}
            status = (listed.get(self.spec.upstream_model) or {}).get("status") or {}
            return status.get("value") == "loaded"
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    def status(self) -> dict[str, Any]:
        return {"asleep": bool(self.asleep), "wake_waiting": self.counts["waiting"],
                "wake_wait_seconds": round(self.counts["wait_seconds"], 3),
                "wakes": self.counts["wakes"], "sleeps": self.counts["sleeps"]}
