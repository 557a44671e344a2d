"""Helpers for the reliability tests: a `modelyard serve` subprocess (testkit/servers.py) with a
config of the test's own (small queue, quotas, short grace period...), SSE reading and error-body
checks.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Iterator

from testkit.servers import MODEL, ServerProcess, served

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


def assert_anthropic_error(body: object, type_: str | None = None) -> dict:
    """Anthropic's `{"type": "error", "error": {"type", "message"}}` with a non-empty message."""
    assert isinstance(body, dict) and body.get("type") == "error" and set(body) == {"type", "error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"type", "message"}, body
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), body
    if type_ is not None:
        assert err["type"] == type_, body
    return err


ANTHROPIC_ENDS = ("message_stop",)


def check_anthropic_stream(text: str) -> str:
    """An Anthropic stream: named events from message_start to message_stop, or an `error`
    event last; "finished" or "error", never a silent cut."""
    names = [line[len("event: "):] for line in text.splitlines() if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert names and len(names) == len(data), text[-300:]
    assert all(d.get("type") == n for n, d in zip(names, data)), text[-300:]
    if names[-1] == "error":
        assert_anthropic_error(data[-1])
        assert data[-1]["error"]["type"] != "api_error", f"internal error in stream: {text[-300:]}"
        return "error"
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    assert names[-2] == "message_delta", names
    return "finished"


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


RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")


def check_stream_end(events: list[object]) -> str:
    """A stream must end with [DONE] after either a finish_reason chunk per choice or an error
    event; returns "finished" or "error" (never a silent cut). The Responses API's named events
    (api/openai/response_object) have no [DONE]: they end with the response's final event, an
    `error` event before a failed one, every sequence_number one more than the last."""
    if events and isinstance(events[0], dict) and str(events[0].get("type", "")).startswith("response."):
        assert [e.get("sequence_number") for e in events] == list(range(len(events))), events[-3:]
        assert events[-1]["type"] in RESPONSE_ENDS, f"stream not ended by a response's final event: {events[-3:]}"
        if events[-1]["type"] != "response.failed":
            return "finished"
        assert events[-2]["type"] == "error", events[-3:]
        return "error"
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


def check_response(response, ok: tuple[int, ...] = (200,)) -> None:
    """A schemathesis response holds the API's shape whatever was sent: no 5xx but a 503 with
    Retry-After and OpenAI's body, a 422 in FastAPI's shape, other 4xx in OpenAI's, a success
    status from `ok`, and a 200 event stream that ends properly."""
    status = response.status_code
    ctype = ",".join(response.headers.get("content-type", []))
    text = response.content.decode("utf-8", errors="replace")
    where = f"{response.request.method} {response.request.url} -> {status}: {text[:500]}"
    anthropic = response.request.url.split("?")[0].endswith(("/v1/messages", "/v1/messages/count_tokens"))
    if status >= 500:
        assert status == 503, f"server error: {where}"
        retry = response.headers.get("retry-after", [])
        assert retry and retry[0].isdigit() and int(retry[0]) >= 1, f"503 without Retry-After: {where}"
        if anthropic:
            assert_anthropic_error(json.loads(text), "overloaded_error")
        else:
            assert_openai_error(json.loads(text), "server_overloaded")
        return
    if 400 <= status < 500:
        body = json.loads(text)     # every error is JSON
        if anthropic:               # Anthropic's routes answer in Anthropic's shape, a bad body 400
            assert status != 422, f"a 422 on Anthropic's API: {where}"
            assert_anthropic_error(body)
        elif status == 422:
            assert_validation_error(body)
        else:
            assert_openai_error(body)
        return
    assert status in ok, f"unexpected status: {where}"
    if "text/event-stream" in ctype and anthropic:
        assert not response.stream_cut_short, where
        check_anthropic_stream(text)
    elif "text/event-stream" in ctype:
        assert not response.stream_cut_short, where
        lines = text.splitlines()
        events = [line[5:].strip() for line in lines if line.startswith("data:")]
        parsed = [e if e == "[DONE]" else json.loads(e) for e in events]
        how = check_stream_end(parsed)
        if how == "error" and "error" in parsed[-2]:
            assert parsed[-2]["error"]["type"] != "server_error", f"internal error in stream: {where}"
        elif how == "error":        # a Responses stream's error event
            assert parsed[-2]["code"] != "server_error", f"internal error in stream: {where}"
    elif "application/json" in ctype:
        json.loads(text)
