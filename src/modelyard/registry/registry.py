"""Registry: routing name -> Endpoint. Starts every endpoint in the background, so the server
answers /health at once and one endpoint that fails to load does not stop the others.

Endpoints of the control plane come and go at run time (`add`, `update`, `delete`). Each change
sets what the endpoint should be (`desired`: loaded, unloaded or deleted; a pending spec) and
kicks the endpoint's one reconciler task, which moves it there step by step: drain what is in
flight (up to the grace period), stop the engine, load again. One task per endpoint acts, so
changes that arrive while it works (an unload during a load, a delete during a drain) are
simply the next step, never a race between two tasks on one engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Collection

from ..engine.protocol import Engine
from ..engine.types import ModelType
from ..errors import Conflict, ConfigError, ModelNotFound, QueueFull
from ..redact import mask_url_credentials
from ..settings import EndpointSpec, Settings
from ..store import KNOWN, ModelStore
from .endpoint import Endpoint, EndpointState
from .lifecycle import SWEEP_INTERVAL, Lifecycle, mib

log = logging.getLogger("modelyard.registry")

EngineFactory = Callable[[EndpointSpec, "Path | None"], Engine]
DRAIN_POLL = 0.05          # seconds between looks at a draining engine's in-flight count
S = EndpointState
PARKED = "not loaded: loads on its next request"


def default_engine_factory(spec: EndpointSpec, model_path: Path | None) -> Engine:
    """`spec.kind` is resolved (never None) when the registry calls this."""
    if spec.engine == "openai":
        from ..proxy.engine import ProxyEngine
        return ProxyEngine(spec)
    assert model_path is not None
    if spec.kind == "embeddings":
        from ..local.embeddings import EmbeddingEngine
        return EmbeddingEngine(spec, model_path)
    from ..local.engine import LocalEngine
    return LocalEngine(spec, model_path)


def declared_type(spec: EndpointSpec) -> ModelType | None:
    """What an endpoint serves, as far as is known before loading: its `kind`, else the store's
    known model, else (remote) completions; None for a local file until its header is read."""
    if spec.kind is not None:
        return ModelType(spec.kind.upper())
    if spec.engine == "openai":
        return ModelType.COMPLETIONS
    known = KNOWN.get(spec.model)
    return known.model_type if known is not None else None


def checked_type(spec: EndpointSpec, found: ModelType) -> ModelType:
    """`found` (what the store or the GGUF's header says a local model is), which a configured
    `kind` must agree with: ConfigError otherwise, so the endpoint fails saying so rather than
    generating from an encoder or failing obscurely in the engine."""
    if spec.kind is not None and ModelType(spec.kind.upper()) is not found:
        raise ConfigError(f"endpoint {spec.name!r} has kind = {spec.kind!r}, but its model {spec.model!r} is "
                          f"{'an embedding' if found is ModelType.EMBEDDINGS else 'a completions'} model")
    return found


def needs_process_kernels(spec: EndpointSpec) -> bool:
    """Whether `spec` needs the process-wide kernel switch (local/ffi.choose_kernels): a
    deterministic llama.cpp endpoint whose engine thread cannot pin ggml's fixed-order kernels
    to itself: an embeddings engine (it runs the tiled flash attention, local/embeddings), one
    whose kind is not known before its file is read, or any where this llama.cpp build lacks
    them (ffi.use_fixed_order_kernels). A deterministic completions engine pins them to its own
    thread, so it runs beside deterministic = false endpoints without touching theirs."""
    if spec.engine != "llamacpp" or not spec.deterministic:
        return False
    from ..local.ffi import fixed_order_kernels
    return declared_type(spec) is not ModelType.COMPLETIONS or not fixed_order_kernels()


class Registry:
    def __init__(self, settings: Settings, store: ModelStore | None = None,
                 engine_factory: EngineFactory = default_engine_factory) -> None:
        self.store = store or ModelStore(settings.store_dir, progress=False)
        self._factory = engine_factory
        self.grace = settings.grace_period
        self.endpoints: dict[str, Endpoint] = {}
        self._tasks: dict[str, asyncio.Task] = {}       # name -> its reconciler (or first load)
        self._listeners: list[Callable[[Endpoint], None]] = []
        self._started = False
        self.lifecycle = Lifecycle(settings)
        self._sweeper: asyncio.Task | None = None
        self._draining = False
        for spec in settings.endpoints:
            ep = Endpoint(spec, model_type=declared_type(spec))
            if spec.load == "on_demand" and spec.engine == "llamacpp":     # a remote one: proxy/lifecycle
                ep.state, ep.reason, ep.parked = S.UNLOADED, PARKED, True
            self._put(ep)

    def _put(self, ep: Endpoint) -> None:
        ep.on_change = self._changed
        self.endpoints[ep.name] = ep

    def get(self, name: str, visible: Collection[str] | None = None) -> Endpoint:
        """The endpoint named `name`, or ModelNotFound listing the names the caller may see.
        `visible` (a key limited to some endpoints; None: all): any other name is answered as
        unknown, with the same words, so the answer never confirms that an endpoint exists."""
        ep = self.endpoints.get(name)
        if ep is not None and (visible is None or name in visible):
            return ep
        known = ", ".join(sorted(n for n in self.endpoints if visible is None or n in visible)) or "none"
        # the name is the client's: echoed only in part (request bodies bound it to
        # MAX_NAME, a path segment is bounded only by the server's line length)
        shown = repr(name) if len(name) <= 80 else f"{name[:80]!r}... ({len(name)} characters)"
        raise ModelNotFound(f"unknown model endpoint {shown}; this server serves: {known}",
                            param="model", code="model_not_found")

    # ---- change notification (the admin API's event stream) --------------------------------

    def listen(self, callback: Callable[[Endpoint], None]) -> Callable[[], None]:
        """`callback(endpoint)` after every state change, and once when an endpoint is removed
        (its state is then STOPPED and it is no longer in `endpoints`); returns the unsubscribe."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def _changed(self, ep: Endpoint) -> None:
        for callback in list(self._listeners):
            callback(ep)

    # ---- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Begin loading every endpoint that should be loaded; returns at once."""
        local = [ep.spec for ep in self.endpoints.values() if ep.spec.engine == "llamacpp"]
        if local:
            from ..local.ffi import choose_kernels
            # Any deterministic endpoint: off for the whole process, as before fixed-order
            # kernels, so that a deterministic embeddings endpoint can still be added later.
            choose_kernels(deterministic=any(spec.deterministic for spec in local))
        self._started = True
        for ep in self.endpoints.values():
            if ep.state is S.LOADING:
                self._tasks[ep.name] = asyncio.create_task(self._first_load(ep), name=f"load-{ep.name}")
        self._sweeper = asyncio.create_task(self._sweep(), name="lifecycle-sweep")

    def check_budget(self) -> None:
        """ConfigError naming the first configured endpoint whose model, already in the store,
        could never fit the memory budget even alone (at start, before serving)."""
        if not self.lifecycle.budget:
            return
        from ..local.footprint import estimate
        from ..local.gguf_header import model_type
        for ep in self.endpoints.values():
            if ep.spec.engine != "llamacpp" or ep.spec.convert:
                continue
            known = KNOWN.get(ep.spec.model)
            stored = self.store.entry(ep.spec.model)
            path = stored.path if stored is not None else Path(ep.spec.model).expanduser()
            if not path.is_file():
                continue        # checked when it loads (then the endpoint fails, saying so)
            embeddings = (known.model_type if known else model_type(path)) is ModelType.EMBEDDINGS
            self.lifecycle.check_fits(ep, estimate(path, ep.spec, embeddings).total)

    # ---- the lifecycle: on demand, keep-alive, budget (registry/lifecycle) ------------------

    async def serve(self, ep: Endpoint, keep_alive: float | None = None) -> Engine:
        """The engine of `ep` for one request, holding the endpoint (never unloaded or evicted)
        until `done(ep)`, which the caller owes once the response has ended. An endpoint the
        lifecycle unloaded is loaded first (its reconciler does it; concurrent requests wait for
        the same load), up to `[server] load_timeout`."""
        self.lifecycle.hold(ep, keep_alive)
        try:
            if ep.on_demand and not self._draining:     # shutting down: nothing new is loaded
                await self._wait_load(ep)
            return ep.require_ready()
        except BaseException:
            self.done(ep)
            raise

    def done(self, ep: Endpoint) -> None:
        self.lifecycle.release(ep)

    async def _wait_load(self, ep: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        if ep.load_done is None:
            ep.load_done = loop.create_future()
        ep.parked = False
        self._kick(ep)
        started = loop.time()
        ep.count("load_waits")
        ep.count("waiting")
        try:
            await asyncio.wait_for(asyncio.shield(ep.load_done), self.lifecycle.load_timeout)
        except asyncio.TimeoutError:
            raise QueueFull(f"model endpoint {ep.name!r} is still loading after {self.lifecycle.load_timeout:g} s "
                            "([server] load_timeout)", param="model", code="load_timeout",
                            retry_after=self.lifecycle.load_timeout) from None
        finally:
            ep.count("waiting", -1)
            ep.count("load_wait_seconds", loop.time() - started)

    @staticmethod
    def _settle(ep: Endpoint, error: BaseException | None = None) -> None:
        """Those waiting for `ep`'s load learn how it ended (its state, or `error`)."""
        done, ep.load_done = ep.load_done, None
        if done is None or done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
            done.exception()            # retrieved: waiters that timed out are not warned about

    async def _sweep(self) -> None:
        """Park the endpoints idle past their keep_alive; their reconcilers unload them."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            for ep in self.lifecycle.expired(list(self.endpoints.values()), time.time()):
                log.info("endpoint %s idle past its keep_alive: unloading", ep.name)
                ep.count("idle_unloads")
                self._park(ep)

    def _park(self, ep: Endpoint) -> None:
        ep.parked = True
        self._kick(ep)

    async def _make_room(self, ep: Endpoint, need: int) -> None:
        """Evict (least recently used idle first) until `ep` fits; QueueFull when nothing can.
        Holds the lifecycle's lock (the caller's): no other load counts the same room."""
        loop = asyncio.get_running_loop()
        for _ in range(3):          # a victim a request took back meanwhile: plan again
            victims = self.lifecycle.plan(ep, need, list(self.endpoints.values()))
            if not victims:
                return
            for victim in victims:
                log.info("endpoint %s evicted (least recently used, idle) to load %s", victim.name, ep.name)
                victim.count("evictions")
                self._park(victim)
            deadline = loop.time() + self.grace + 30
            while any(v.resident is not None and v.parked for v in victims) and loop.time() < deadline:
                await asyncio.sleep(DRAIN_POLL)
        victims = self.lifecycle.plan(ep, need, list(self.endpoints.values()))
        if victims:
            raise QueueFull(f"model endpoint {ep.name!r}: the endpoints evicted for it were asked for again; "
                            "retry", param="model", code="memory_budget_exceeded", retry_after=1.0)

    async def wait_loaded(self) -> None:
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _first_load(self, ep: Endpoint) -> None:
        await self._load(ep)
        await self._reconcile(ep)

    # ---- run-time changes (control plane) ----------------------------------------------------

    def add(self, spec: EndpointSpec, *, id: str, desired: str = "loaded", revision: int = 1) -> Endpoint:
        """A new endpoint from the control plane's store; loads in the background."""
        if spec.name in self.endpoints:
            raise Conflict(f"a model endpoint named {spec.name!r} exists already in this process "
                           f"({self.endpoints[spec.name].source})", param="name", code="endpoint_exists")
        self.check_kernels(spec, choose=True)
        unloaded = desired != "loaded"
        parked = not unloaded and spec.load == "on_demand" and spec.engine == "llamacpp"
        ep = Endpoint(spec, model_type=declared_type(spec), source="api", id=id, desired=desired, revision=revision,
                      state=S.UNLOADED if unloaded or parked else S.LOADING,
                      reason="unloaded" if unloaded else PARKED if parked else "loading the model", parked=parked)
        self._put(ep)
        self._changed(ep)
        if not unloaded and not parked:
            self._kick(ep, first=True)
        return ep

    def update(self, name: str, spec: EndpointSpec, *, desired: str, revision: int) -> Endpoint:
        """The stored endpoint changed (its spec, what it should be, or only its revision: a
        failed endpoint then tries again)."""
        ep = self.get(name)
        if spec != ep.spec:
            self.check_kernels(spec, choose=True)
            ep.pending_spec = spec
        retry = revision != ep.revision and desired == "loaded" and ep.state is S.FAILED
        if desired != "loaded" or (revision != ep.revision and spec == ep.spec):
            # an admin's unload holds until an admin's load, and a load (the revision moved, the
            # spec did not: not a PATCH) loads now, parked or not
            ep.parked = False
        ep.desired, ep.revision = desired, revision
        if retry and ep.pending_spec is None:
            ep.pending_spec = ep.spec           # try again with the same spec
        if desired == "unloaded" and ep.state is S.READY:
            ep.become(S.DRAINING, "unloading: finishing the requests in flight")    # refuse new ones now
        self._kick(ep)
        return ep

    def delete(self, name: str) -> Endpoint:
        """Refuses new requests at once (not ready: deleting; the models list says model.deleted),
        lets those in flight finish (up to the grace period), then stops and removes it."""
        ep = self.get(name)
        ep.desired = "deleted"
        if ep.state not in (S.DELETING, S.STOPPED):
            ep.become(S.DELETING, "being deleted: finishing the requests in flight")
        self._kick(ep)
        return ep

    def check_kernels(self, spec: EndpointSpec, choose: bool = False) -> None:
        """Some kernels are chosen once per process (local/ffi.choose_kernels): a deterministic
        endpoint that needs that choice (needs_process_kernels) cannot join a process whose
        contexts already run the non-invariant kernels (Conflict). The admin API asks before it
        stores a spec; `choose`: make the choice now."""
        if not needs_process_kernels(spec):
            return
        from ..local.ffi import choose_kernels, tiled_kquant_matmul
        if not tiled_kquant_matmul():
            return
        if any(ep.engine is not None and ep.spec.engine == "llamacpp" for ep in self.endpoints.values()):
            raise Conflict(f"endpoint {spec.name!r} asks deterministic = true, but this process already runs "
                           "llama.cpp endpoints with deterministic = false (the kernel choice is process-wide); "
                           "set deterministic = false or serve it from another process", param="deterministic",
                           code="kernel_conflict")
        if choose:
            choose_kernels(deterministic=True)

    def _kick(self, ep: Endpoint, first: bool = False) -> None:
        task = self._tasks.get(ep.name)
        if task is not None and not task.done():
            return           # the running reconciler reads `desired` again after each step
        if not self._started:                # start() will load it
            return
        work = self._first_load(ep) if first else self._reconcile(ep)
        self._tasks[ep.name] = asyncio.create_task(work, name=f"reconcile-{ep.name}")

    async def _reconcile(self, ep: Endpoint) -> None:
        """Move `ep` to what it should be, one step at a time, reading `desired` again after
        every step (it may change during any await); returns when the state matches it. Those
        waiting for its load learn the outcome when it returns (or is cancelled: a stop)."""
        try:
            await self._reconcile_steps(ep)
        finally:
            self._settle(ep)

    async def _reconcile_steps(self, ep: Endpoint) -> None:
        while True:
            if ep.desired == "deleted":
                await self._release(ep, S.DELETING, "being deleted: finishing the requests in flight")
                if self.endpoints.get(ep.name) is ep:
                    del self.endpoints[ep.name]
                self._tasks.pop(ep.name, None)
                ep.become(S.STOPPED, "deleted")     # listeners see it gone from `endpoints`
                log.info("endpoint %s deleted", ep.name)
                return
            if ep.desired == "unloaded":
                ep.parked = False
                if ep.state is not S.UNLOADED:
                    await self._release(ep, S.DRAINING, "unloading: finishing the requests in flight")
                    if ep.desired != "unloaded":
                        continue
                    ep.become(S.UNLOADED, "unloaded")
                self._apply_pending(ep)        # the next load uses it
                return
            # desired: loaded
            if ep.pending_spec is not None:
                if ep.engine is not None or ep.state in (S.READY, S.DRAINING):
                    await self._release(ep, S.DRAINING, "reloading with a new configuration")
                    if ep.desired != "loaded":
                        continue
                    ep.become(S.UNLOADED, PARKED if ep.parked else "reloading with a new configuration")
                self._apply_pending(ep)
                if ep.parked:
                    continue
            elif ep.parked:         # idle past its keep_alive, or evicted: unload, drained first
                if ep.state not in (S.READY, S.DRAINING):
                    return
                await self._release(ep, S.DRAINING, "unloading (idle or evicted)")
                if ep.desired == "loaded" and ep.state is S.DRAINING:
                    ep.become(S.UNLOADED, PARKED)
                continue
            elif ep.state is not S.UNLOADED:
                return                          # ready, or failed until someone asks again
            ep.become(S.LOADING, "loading the model")
            await self._load(ep)

    @staticmethod
    def _apply_pending(ep: Endpoint) -> None:
        if ep.pending_spec is not None:
            ep.spec, ep.pending_spec = ep.pending_spec, None
            ep.model_type = declared_type(ep.spec)

    async def _release(self, ep: Endpoint, state: EndpointState, reason: str) -> None:
        """Refuse new requests (`state`), let those in flight finish for up to the grace period,
        then stop the engine (what is left ends with an error event)."""
        if ep.state is not state and ep.state.can_become(state):
            ep.become(state, reason)
        engine, ep.engine = ep.engine, None
        if engine is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while engine.status().get("in_flight", 0) and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)
        try:
            await engine.stop()
            if ep.spec.engine == "llamacpp":
                from ..local.footprint import give_back
                await asyncio.to_thread(give_back)      # what the engine freed, back to the system
        finally:
            ep.resident = ep.expires_at = None
            ep.count("unloads")

    async def _load(self, ep: Endpoint) -> None:
        engine = None
        try:
            path = None
            known = KNOWN.get(ep.spec.model) if ep.spec.engine == "llamacpp" else None
            if known is not None:       # before any download
                ep.model_type = checked_type(ep.spec, known.model_type)
            if ep.spec.engine == "llamacpp":
                loop = asyncio.get_running_loop()

                def progress(step) -> None:     # the pull's thread -> the endpoint, on the loop
                    if step.total:
                        loop.call_soon_threadsafe(setattr, ep, "progress", (step.completed, step.total))
                path = await asyncio.to_thread(self.store.resolve, ep.spec.model, progress)
                if ep.spec.convert:
                    from ..local.convert import converted
                    path = await asyncio.to_thread(converted, path, ep.spec.convert,
                                                   self.store.root / "converted", ep.spec.n_threads)
                ep.model_path = str(path)
            if ep.spec.engine == "llamacpp" and known is None:     # a file: its header says
                from ..local.gguf_header import model_type
                ep.model_type = checked_type(ep.spec, await asyncio.to_thread(model_type, path))
            spec = dataclasses.replace(ep.spec, kind=ep.model_type.value.lower())
            if ep.spec.engine == "llamacpp":
                ep.need = await self._need(ep, spec, path)
            if ep.spec.engine == "llamacpp" and self.lifecycle.bounded:
                async with self.lifecycle.lock:         # room made, then taken: by one load at a time
                    await self._make_room(ep, ep.need)
                    engine = self._factory(spec, path)
                    await self._start_engine(ep, engine)
            else:
                engine = self._factory(spec, path)
                if getattr(engine, "sleeper", None) is not None:     # a remote endpoint on demand
                    engine.sleeper.hold_timeout = self.lifecycle.load_timeout
                    # asleep after its keep_alive as the registry counts it (requests' own too)
                    engine.sleeper.expires_at = lambda ep=ep: None if ep.pending else ep.expires_at
                await self._start_engine(ep, engine)
            if ep.state is S.LOADING:       # not unloaded or deleted meanwhile (the reconciler goes on)
                ep.become(S.READY)
            log.info("endpoint %s ready (%s)", ep.name, mask_url_credentials(str(ep.model_path or list(ep.spec.urls))))
        except asyncio.CancelledError:
            if engine is not None and ep.engine is None:
                await asyncio.shield(engine.stop())
            raise
        except QueueFull as exc:        # no room under the budget now: not loaded, its waiters told why
            if ep.state is S.LOADING:
                ep.parked = True
                ep.become(S.UNLOADED, f"{PARKED} ({exc})")
            self._settle(ep, exc)
            log.warning("endpoint %s not loaded: %s", ep.name, exc)
        except Exception as exc:  # noqa: BLE001 - any failure is this endpoint's state, not the server's
            if ep.state is S.LOADING:
                ep.become(S.FAILED, mask_url_credentials(f"{type(exc).__name__}: {exc}"))
            log.error("endpoint %s failed: %s", ep.name, mask_url_credentials(f"{type(exc).__name__}: {exc}"))

    async def _need(self, ep: Endpoint, spec: EndpointSpec, path: Path) -> int | None:
        """The bytes `ep` needs loaded (local/footprint). Under a budget a model that cannot be
        sized, or could never fit, fails its endpoint; without one the figure is only shown."""
        from ..local.footprint import estimate
        try:
            need = (await asyncio.to_thread(estimate, path, spec, ep.model_type is ModelType.EMBEDDINGS)).total
        except Exception:  # noqa: BLE001 - llama.cpp may still load what the estimate cannot read
            if self.lifecycle.bounded:
                raise
            log.warning("endpoint %s: its memory could not be estimated from %s", ep.name, path, exc_info=True)
            return None
        self.lifecycle.check_fits(ep, need)
        return need

    async def _start_engine(self, ep: Endpoint, engine: Engine) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await engine.start()
        ep.engine = engine
        ep.count("loads")
        ep.count("load_seconds", loop.time() - started)
        reported = getattr(engine, "footprint", None)
        ep.resident = reported.total if reported is not None else ep.need
        if reported is not None and ep.need is not None and reported.total > ep.need * 1.1:
            log.warning("endpoint %s: llama.cpp allocated %s MiB, above the %s MiB estimated from its GGUF",
                        ep.name, mib(reported.total), mib(ep.need))
        self.lifecycle.loaded(ep)

    @property
    def in_flight(self) -> int:
        return sum(ep.engine.status().get("in_flight", 0) for ep in self.endpoints.values() if ep.engine)

    def drain(self) -> None:
        self._draining = True
        for ep in self.endpoints.values():
            if ep.state is S.READY:
                ep.become(S.DRAINING, "the server is shutting down")

    async def stop(self) -> None:
        """Ends every endpoint (requests in flight end with an error). Safe to call twice."""
        self._started = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ep in self.endpoints.values():
            if ep.engine is not None:
                await ep.engine.stop()
                ep.engine = None
            if ep.state is not S.STOPPED:
                ep.become(S.STOPPED, "stopped")
            self._settle(ep)
