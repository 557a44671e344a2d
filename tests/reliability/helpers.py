"""Helpers for the reliability tests: a `modelyard serve` subprocess (tests/servers.py) with a
config of the test's own (small queue, quotas, short grace period...), SSE reading and error-body
checks.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Iterator

from servers import MODEL, ServerProcess, served

KEY = "test-key"


def config(*, parallel: int = 2, context: int = 256, max_queue: int = 4, batch: int = 64,
           api_keys: tuple[str, ...] = (KEY,), server: str = "", extra: str = "") -> str:
    """A TOML config with one endpoint (the default model, one thread: the machine is shared) and whatever `server`
    lines and `extra` tables ([limits], [[keys]]) the test adds."""
    keys = ", ".join(json.dumps(k) for k in api_keys)
    return (f"[server]\napi_keys = [{keys}]\nlog_level = \"info\"\n{server}\n"
            f"[[endpoints]]\nname = \"{MODEL}\"\nmodel = \"{MODEL}\"\ncontext = {context}\n"
            f"parallel = {parallel}\nmax_queue = {max_queue}\nbatch = {batch}\nthreads = 1\n\n{extra}\n")


def live_server(directory: Path, cfg: str, *, key: str | None = KEY) -> AbstractContextManager[ServerProcess]:
    """`modelyard serve` with this config, ready, stopped by its PID on leaving; it uses `key` (by
    default the one `config` lists)."""
    return served(directory, cfg, key=key)


# -- bodies -------------------------------------------------------------------------------

def assert_openai_error(body: object, type_: str | None = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}` with a non-empty message; the error."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    assert err["param"] is None or isinstance(err["param"], str), body
    assert err["code"] is None or isinstance(err["code"], str), body
    if type_ is not None:
        assert err["type"] == type_, body
    return err


def assert_validation_error(body: object) -> list:
    """FastAPI's `{"detail": [{"loc", "msg", "type", ...}]}`; the details."""
    assert isinstance(body, dict) and "detail" in body, body
    detail = body["detail"]
    assert isinstance(detail, list) and detail, body
    for d in detail:
        assert isinstance(d, dict) and {"loc", "msg", "type"} <= set(d), body
        assert isinstance(d["loc"], list) and isinstance(d["msg"], str) and isinstance(d["type"], str), body
    return detail


def sse_events(lines: Iterator[str]) -> list[object]:
    """The `data:` payloads of an SSE stream: JSON objects, and the string "[DONE]"."""
    events: list[object] = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_stream_end(events: list[object]) -> str:
    """A stream must end with [DONE] after either a finish_reason chunk per choice or an error
    event; returns "finished" or "error" (never a silent cut)."""
    assert events and events[-1] == "[DONE]", f"stream not ended by [DONE]: {events[-3:]}"
    assert events.count("[DONE]") == 1, events
    body = [e for e in events[:-1]]
    if body and isinstance(body[-1], dict) and "error" in body[-1]:
        assert_openai_error(body[-1])
        return "error"
    finished = [c for e in body if isinstance(e, dict)
                for c in e.get("choices", []) if c.get("finish_reason")]
    assert finished, f"stream ended without a finish_reason or an error event: {events[-3:]}"
    return "finished"
