"""Endpoint: a routing name, its spec, its engine, and a state with explicit transitions."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Callable

from ..engine.protocol import Engine
from ..engine.types import ModelType
from ..errors import EndpointNotReady, InvalidRequest
from ..redact import mask_url_credentials
from ..settings import EndpointSpec


class EndpointState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"       # finishing what it has, taking nothing new (unload, shutdown)
    UNLOADED = "unloaded"       # an admin unloaded it, or the lifecycle did (parked: loads on its next request)
    DELETING = "deleting"       # being deleted: finishing what it has; listed as "model.deleted"
    STOPPED = "stopped"         # the server is stopping, or it was deleted: final

    def can_become(self, other: "EndpointState") -> bool:
        return other in _ALLOWED[self]


_S = EndpointState
# Unload and delete may come in any state but a final one (a load in progress is cancelled).
_ALLOWED = {
    _S.LOADING: {_S.READY, _S.FAILED, _S.UNLOADED, _S.DELETING, _S.STOPPED},
    _S.READY: {_S.DRAINING, _S.FAILED, _S.DELETING, _S.STOPPED},
    _S.FAILED: {_S.LOADING, _S.UNLOADED, _S.DELETING, _S.STOPPED},
    _S.DRAINING: {_S.UNLOADED, _S.DELETING, _S.STOPPED},
    _S.UNLOADED: {_S.LOADING, _S.DELETING, _S.STOPPED},
    _S.DELETING: {_S.STOPPED},
    _S.STOPPED: set(),
}


@dataclass(eq=False)
class Endpoint:
    spec: EndpointSpec
    state: EndpointState = EndpointState.LOADING
    reason: str | None = "loading the model"
    engine: Engine | None = None
    model_path: str | None = None
    # What it serves; None only for a local file whose header is not read yet (registry).
    model_type: ModelType | None = None
    source: str = "config"          # "config" (the TOML file) or "api" (the control plane's store)
    id: str = ""                    # the control plane's id ("config:<name>" for config ones)
    # What an admin asked for (registry's reconciler moves the state there): "loaded",
    # "unloaded" or "deleted"; a new spec waiting to replace the running one; the stored
    # revision applied (a bump while failed means "try again").
    desired: str = "loaded"
    pending_spec: EndpointSpec | None = None
    revision: int = 1
    created_at: int = 0             # unix seconds (the stored row's; config ones: the server's start)
    updated_at: int = 0
    # Bytes fetched / total while the model file is being pulled into the store (else None).
    progress: tuple[int, int] | None = None
    # The lifecycle (registry/lifecycle). `parked`: the lifecycle unloaded it (on demand, idle,
    # evicted): it is served, and loads on its next request. `pending`: requests that asked for
    # it and have not ended (waiting for its load, or being served): while any, it is never
    # unloaded or evicted. `load_done`: what those waiting for a load await (None: no load asked).
    parked: bool = False
    pending: int = 0
    asked_keep_alive: float | None = None   # the longest keep_alive its pending requests sent
    last_used: float | None = None          # unix seconds a request last began or ended
    expires_at: float | None = None         # unix seconds it unloads if still idle (None: never)
    need: int | None = None                 # bytes it needs loaded (local/footprint's estimate)
    resident: int | None = None             # bytes it holds (what llama.cpp allocated); None: none
    load_done: "asyncio.Future[None] | None" = field(default=None, repr=False)
    # counters for /metrics: loads, load seconds, unloads (by why), load waits and their seconds
    counts: dict[str, float] = field(default_factory=dict, repr=False)
    # Called after every state change (registry/events: the admin API's event stream).
    on_change: Callable[["Endpoint"], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.id = self.id or f"config:{self.spec.name}"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model_engine(self) -> str:
        """The platform's `model_engine`, known from the configuration alone."""
        return ENGINE_NAMES[self.spec.engine]

    def require_type(self, wanted: ModelType, route: str) -> None:
        """A 400 when the endpoint is known to serve the other kind (before readiness: the
        request is wrong whatever the endpoint's state)."""
        if self.model_type is not None and self.model_type is not wanted:
            serves = ("/embeddings" if self.model_type is ModelType.EMBEDDINGS
                      else "/completions and /chat/completions")
            raise InvalidRequest(f"model endpoint {self.name!r} is {_a(self.model_type)} endpoint: it serves "
                                 f"{serves}, not {route}", param="model", code="wrong_model_type")

    def become(self, state: EndpointState, reason: str | None = None) -> None:
        assert self.state.can_become(state), f"endpoint {self.name}: {self.state} -> {state}"
        self.state, self.reason = state, reason
        if state is not EndpointState.LOADING:
            self.progress = None
        if self.on_change is not None:
            self.on_change(self)

    @property
    def loaded(self) -> bool:
        """Its model holds memory: an engine, or one still stopping (until its memory is freed)."""
        return self.engine is not None or self.resident is not None

    def count(self, what: str, by: float = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + by

    @property
    def on_demand(self) -> bool:
        """Its requests wait for a load rather than being refused: unloaded by the lifecycle, or
        loading for requests already waiting."""
        return self.desired == "loaded" and (self.parked or self.load_done is not None)

    def serving_reason(self) -> str | None:
        """None when its requests are served (now, or once the load they wait for is done);
        else why not. What /ready and the endpoint lists say."""
        if self.on_demand and self.state in (EndpointState.UNLOADED, EndpointState.LOADING,
                                             EndpointState.DRAINING):
            return None
        return self.not_ready_reason()

    def not_ready_reason(self) -> str | None:
        """None when requests can be served now; else why not (loading, failed, upstream down)."""
        if self.state is not EndpointState.READY:
            return f"{self.state.value}: {self.reason}" if self.reason else self.state.value
        return self.engine.ready_reason() if self.engine is not None else "no engine"

    def not_ready_state(self) -> str | None:
        """None when ready; else the state alone ("loading", "failed", "draining", "unavailable"
        for a ready endpoint whose engine cannot serve): what anyone may be told."""
        if self.state is not EndpointState.READY:
            return self.state.value
        return None if self.not_ready_reason() is None else "unavailable"

    def require_ready(self) -> Engine:
        why = self.not_ready_reason()
        if why is not None:
            # The message says the state; the reason (paths, exception text, upstream hosts) is
            # the detail, shown to trusted callers only (api/errors).
            raise EndpointNotReady(f"model endpoint {self.name!r} is not ready ({self.not_ready_state()})",
                                   param="model", code="model_not_ready", detail=mask_url_credentials(why))
        assert self.engine is not None
        return self.engine


ENGINE_NAMES = {"llamacpp": "LLAMA_CPP", "openai": "OPENAI_PROXY"}


def _a(kind: ModelType) -> str:
    return "an embeddings" if kind is ModelType.EMBEDDINGS else "a completions"
