"""The one server-sent-events writer: what every event stream modelyard serves is made of (the
completions' data-only chunks and `[DONE]`, the admin API's named JSON events, the console's
HTML fragments) and the one set of headers that keeps a proxy from holding events back or
storing them (a stream of another key's tokens, or of the admin plane, is no one's cache)."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
KEEPALIVE = ": keepalive\n\n"       # a comment: proxies close streams that stay quiet too long


def data(payload: dict | str) -> str:
    """A data-only event (OpenAI's chunks): compact JSON, or a literal such as "[DONE]"."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def event(name: str, payload: dict | str) -> str:
    """A named event; text of several lines goes as several data lines (the SSE rule)."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"event: {name}\n" + "".join(f"data: {line}\n" for line in text.splitlines() or [""]) + "\n"


def response(lines: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(lines, media_type="text/event-stream", headers=HEADERS)
