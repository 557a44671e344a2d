"""Endpoint: a routing name, its spec, its engine, and a state with explicit transitions."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..engine.protocol import Engine
from ..errors import EndpointNotReady
from ..settings import EndpointSpec


class EndpointState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    STOPPED = "stopped"

    def can_become(self, other: "EndpointState") -> bool:
        return other in _ALLOWED[self]


_ALLOWED = {
    EndpointState.LOADING: {EndpointState.READY, EndpointState.FAILED, EndpointState.STOPPED},
    EndpointState.READY: {EndpointState.DRAINING, EndpointState.FAILED, EndpointState.STOPPED},
    EndpointState.FAILED: {EndpointState.LOADING, EndpointState.STOPPED},
    EndpointState.DRAINING: {EndpointState.STOPPED},
    EndpointState.STOPPED: set(),
}


@dataclass(eq=False)
class Endpoint:
    spec: EndpointSpec
    state: EndpointState = EndpointState.LOADING
    reason: str | None = "loading the model"
    engine: Engine | None = None
    model_path: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def become(self, state: EndpointState, reason: str | None = None) -> None:
        assert self.state.can_become(state), f"endpoint {self.name}: {self.state} -> {state}"
        self.state, self.reason = state, reason

    def not_ready_reason(self) -> str | None:
        """None when requests can be served now; else why not (loading, failed, upstream down)."""
        if self.state is not EndpointState.READY:
            return f"{self.state.value}: {self.reason}" if self.reason else self.state.value
        return self.engine.ready_reason() if self.engine is not None else "no engine"

    def require_ready(self) -> Engine:
        why = self.not_ready_reason()
        if why is not None:
            raise EndpointNotReady(f"model endpoint {self.name!r} is not ready ({why})",
                                   param="model", code="model_not_ready")
        assert self.engine is not None
        return self.engine

    def describe(self) -> dict:
        engine = self.engine.status() if self.engine is not None and self.state is EndpointState.READY else {}
        return {"name": self.name, "state": self.state.value, "ready": self.not_ready_reason() is None,
                "reason": self.not_ready_reason(), "engine": self.spec.engine,
                "model": self.spec.model if self.spec.engine == "llamacpp" else self.spec.upstream_model,
                "model_path": self.model_path, **engine}
