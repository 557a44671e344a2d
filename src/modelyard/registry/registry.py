"""Registry: routing name -> Endpoint. Starts every endpoint in the background, so the server
answers /health at once and one endpoint that fails to load does not stop the others."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Callable

from ..engine.protocol import Engine
from ..engine.types import ModelType
from ..errors import ConfigError, ModelNotFound
from ..redact import redact
from ..settings import EndpointSpec, Settings
from ..store import KNOWN, ModelStore
from .endpoint import Endpoint, EndpointState

log = logging.getLogger("modelyard.registry")

EngineFactory = Callable[[EndpointSpec, "Path | None"], Engine]


def default_engine_factory(spec: EndpointSpec, model_path: Path | None) -> Engine:
    """`spec.kind` is resolved (never None) when the registry calls this."""
    if spec.engine == "openai":
        from ..proxy.engine import ProxyEngine
        return ProxyEngine(spec)
    assert model_path is not None
    if spec.kind == "embeddings":
        from ..local.embed import EmbeddingEngine
        return EmbeddingEngine(spec, model_path)
    from ..local.loop import LocalEngine
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


class Registry:
    def __init__(self, settings: Settings, store: ModelStore | None = None,
                 engine_factory: EngineFactory = default_engine_factory) -> None:
        self.store = store or ModelStore(settings.store_dir, progress=False)
        self._factory = engine_factory
        self.endpoints = {spec.name: Endpoint(spec, model_type=declared_type(spec)) for spec in settings.endpoints}
        self._tasks: list[asyncio.Task] = []

    def get(self, name: str) -> Endpoint:
        try:
            return self.endpoints[name]
        except KeyError:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise ModelNotFound(f"unknown model endpoint {name!r}; this server serves: {known}",
                                param="model", code="model_not_found") from None

    def start(self) -> None:
        """Begin loading every endpoint; returns at once."""
        local = [ep.spec for ep in self.endpoints.values() if ep.spec.engine == "llamacpp"]
        if local:
            from ..local.ffi import choose_kernels
            choose_kernels(deterministic=any(spec.deterministic for spec in local))
        self._tasks = [asyncio.create_task(self._load(ep), name=f"load-{ep.name}")
                       for ep in self.endpoints.values()]

    async def wait_loaded(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _load(self, ep: Endpoint) -> None:
        try:
            path = None
            known = KNOWN.get(ep.spec.model) if ep.spec.engine == "llamacpp" else None
            if known is not None:       # before any download
                ep.model_type = checked_type(ep.spec, known.model_type)
            if ep.spec.engine == "llamacpp":
                path = await asyncio.to_thread(self.store.resolve, ep.spec.model)
                if ep.spec.convert:
                    from ..local.convert import converted
                    path = await asyncio.to_thread(converted, path, ep.spec.convert,
                                                   self.store.root / "converted", ep.spec.n_threads)
                ep.model_path = str(path)
            if ep.spec.engine == "llamacpp" and known is None:     # a file: its header says
                from ..local.gguf_header import model_type
                ep.model_type = checked_type(ep.spec, await asyncio.to_thread(model_type, path))
            engine = self._factory(dataclasses.replace(ep.spec, kind=ep.model_type.value.lower()), path)
            await engine.start()
            ep.engine = engine
            ep.become(EndpointState.READY)
            log.info("endpoint %s ready (%s)", ep.name, redact(str(ep.model_path or list(ep.spec.urls))))
        except Exception as exc:  # noqa: BLE001 - any failure is this endpoint's state, not the server's
            ep.become(EndpointState.FAILED, redact(f"{type(exc).__name__}: {exc}"))
            log.error("endpoint %s failed: %s", ep.name, ep.reason)

    @property
    def in_flight(self) -> int:
        return sum(ep.engine.status().get("in_flight", 0) for ep in self.endpoints.values() if ep.engine)

    def drain(self) -> None:
        for ep in self.endpoints.values():
            if ep.state is EndpointState.READY:
                ep.become(EndpointState.DRAINING, "the server is shutting down")

    async def stop(self) -> None:
        """Ends every endpoint (requests in flight end with an error). Safe to call twice."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ep in self.endpoints.values():
            if ep.engine is not None:
                await ep.engine.stop()
                ep.engine = None
            if ep.state is not EndpointState.STOPPED:
                ep.become(EndpointState.STOPPED, "stopped")
