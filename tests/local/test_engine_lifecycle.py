"""LocalEngine's lifecycle on the real default model: a stop while the model is still loading
ends the engine thread cleanly (no exception in it, the context closed), and a request after a
stop is refused at once with a clear error instead of waiting for a thread that is gone."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from modelyard import settings as settings_mod
from modelyard.engine.types import EngineRequest, SamplingParams
from modelyard.errors import EndpointNotReady, EngineError
from modelyard.local.engine import LocalEngine
from modelyard.settings import EndpointSpec
from modelyard.store import ModelStore

pytestmark = pytest.mark.model

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def model_path():
    return ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False).resolve(MODEL)


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that end a thread (threading.excepthook), which a daemon thread would only print."""
    seen: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    return seen


def _engine(model_path) -> LocalEngine:
    return LocalEngine(EndpointSpec(name=MODEL, model=MODEL, context=256, parallel=2, threads=1), model_path)


def _request() -> EngineRequest:
    return EngineRequest(request_id="r1", prompt="Hello", sampling=SamplingParams(), n=1, max_tokens=2)


async def _first(engine: LocalEngine):
    return await engine.generate(_request()).__anext__()


def test_stop_while_loading_ends_the_thread_cleanly(model_path, thread_errors):
    engine = _engine(model_path)

    async def main() -> None:
        start = asyncio.ensure_future(engine.start())
        await asyncio.sleep(0)          # the thread is loading the model now
        start.cancel()                  # what the registry does on shutdown
        with pytest.raises(asyncio.CancelledError):
            await start
        with pytest.raises(EndpointNotReady, match="stopped"):   # a 400 model_not_ready, not a 500
            await asyncio.wait_for(_first(engine), 30)

    asyncio.run(main())
    assert engine._thread is not None
    engine._thread.join(30)
    assert not engine._thread.is_alive()
    assert thread_errors == []


def test_generate_after_stop_is_refused_at_once(model_path, thread_errors):
    engine = _engine(model_path)

    async def main() -> None:
        await engine.start()
        out = await _first(engine)          # it serves...
        assert out is not None
        await engine.stop()                 # ...then stops
        await engine.stop()                 # twice is fine
        # wait_for only bounds a hang that would be the bug; the error comes at once.
        with pytest.raises(EndpointNotReady, match="the endpoint is stopped"):
            await asyncio.wait_for(_first(engine), 30)

    asyncio.run(main())
    assert thread_errors == []


def test_tokenizing_and_chat_rendering_run_off_the_event_loop(model_path):
    """A long prompt's tokenizing (or a chat template's rendering) on the event loop would stall
    every other stream meanwhile: they run on a worker thread, never on the loop's."""
    engine = _engine(model_path)
    seen: list[tuple[str, threading.Thread]] = []

    async def main() -> None:
        await engine.start()
        loop_thread = threading.current_thread()
        model = engine.model
        tokenize, render = model.tokenize, engine._chat.render
        model.tokenize = lambda *a, **k: seen.append(("tokenize", threading.current_thread())) or tokenize(*a, **k)
        engine._chat.render = lambda *a, **k: seen.append(("render", threading.current_thread())) or render(*a, **k)
        try:
            await _first(engine)
            chat = EngineRequest(request_id="r2", prompt="", messages=({"role": "user", "content": "Hi"},),
                                 sampling=SamplingParams(), n=1, max_tokens=2)
            await engine.generate(chat).__anext__()
        finally:
            await engine.stop()
        assert {what for what, _ in seen} == {"tokenize", "render"}, seen
        assert all(t is not loop_thread and t is not engine._thread for _, t in seen), seen

    asyncio.run(main())


def test_a_consumer_that_falls_behind_is_aborted_not_buffered(model_path, monkeypatch):
    """Nobody reads the stream after its first event (a client that reads too slowly): once
    MAX_PENDING steps of output wait for it, the request is aborted (its slot is freed, the engine
    never waits), and the reader's next event is the error, ahead of the stale output."""
    from modelyard.local import engine as engine_mod
    monkeypatch.setattr(engine_mod, "MAX_PENDING", 8, raising=False)
    engine = _engine(model_path)

    async def main() -> None:
        await engine.start()
        try:
            stream = engine.generate(EngineRequest(
                request_id="slow", prompt="Once upon a time", n=1, max_tokens=200,
                sampling=SamplingParams(logit_bias={0: -100.0, 1: -100.0, 2: -100.0})))
            await stream.__anext__()
            for _ in range(600):        # until the engine has let go of it (bounded: 60 s)
                status = engine.status()
                if status["running"] == 0 and status["queue_depth"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert status["running"] == 0 and status["slots_used"] == 0, status
            with pytest.raises(EngineError, match="reads too slowly"):
                async for _ in stream:
                    pass
            assert engine.status()["in_flight"] == 0
        finally:
            await engine.stop()

    asyncio.run(main())
