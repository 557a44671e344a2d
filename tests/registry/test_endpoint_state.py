"""Endpoint states move only along allowed transitions; not-ready reasons say why."""

from __future__ import annotations

import asyncio

import pytest

from modelyard.errors import EndpointNotReady, ModelNotFound
from modelyard.registry.endpoint import Endpoint, EndpointState
from modelyard.registry.registry import Registry
from modelyard.settings import EndpointSpec, Settings


def test_illegal_transition_is_rejected():
    ep = Endpoint(EndpointSpec(name="a"))
    with pytest.raises(AssertionError):
        ep.become(EndpointState.DRAINING)      # loading cannot drain
    ep.become(EndpointState.READY)
    ep.become(EndpointState.STOPPED)
    with pytest.raises(AssertionError):
        ep.become(EndpointState.READY)         # stopped is final


def test_not_ready_reason_and_400():
    ep = Endpoint(EndpointSpec(name="a"))
    with pytest.raises(EndpointNotReady, match="'a' is not ready \\(loading"):
        ep.require_ready()
    ep.become(EndpointState.FAILED, "StoreError: no such file /x.gguf")
    with pytest.raises(EndpointNotReady) as err:
        ep.require_ready()
    # The path is the detail (trusted callers only), not the message anyone may see.
    assert err.value.status == 400 and "/x.gguf" not in err.value.message and "failed" in err.value.message
    assert "/x.gguf" not in str(err.value.body()) and "/x.gguf" in err.value.body(detail=True)["error"]["message"]


class FakeEngine:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.stopped = False

    async def start(self) -> None:
        if self.fail:
            raise RuntimeError("cannot start")

    async def stop(self) -> None:
        self.stopped = True

    def ready_reason(self):
        return None

    def status(self):
        return {"in_flight": 0}


def test_one_failing_endpoint_does_not_stop_the_others(tmp_path):
    settings = Settings(store_dir=tmp_path, endpoints=(
        EndpointSpec(name="good", engine="openai", urls=("http://127.0.0.1:9/v1",)),
        EndpointSpec(name="bad", engine="openai", urls=("http://127.0.0.1:9/v1",))))
    engines = {}

    def factory(spec, path):
        engines[spec.name] = FakeEngine(fail=spec.name == "bad")
        return engines[spec.name]

    async def scenario():
        reg = Registry(settings, engine_factory=factory)
        reg.start()
        await reg.wait_loaded()
        assert reg.get("good").require_ready() is engines["good"]
        assert reg.get("bad").state is EndpointState.FAILED
        assert "cannot start" in reg.get("bad").reason
        with pytest.raises(ModelNotFound, match="'nope'.*bad, good"):
            reg.get("nope")
        await reg.stop()
        assert engines["good"].stopped
        assert reg.get("good").state is EndpointState.STOPPED

    asyncio.run(scenario())
