"""Server-sent events from an upstream, decoded incrementally into JSON objects.

OpenAI-compatible servers (vLLM, TGI, SGLang, llama-server, modelyard) stream
`data: {json}` events separated by blank lines and end with `data: [DONE]`. We follow
the parts of the SSE rules that matter for them: fields accumulate until a blank line
dispatches the event, `:` lines are comments (keep-alives), several `data:` lines join
with "\\n", and `event: error` marks the payload as an error.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

DONE = "[DONE]"


class SSEError(ValueError):
    """The upstream sent an event that is not a JSON object (the engine maps it)."""


class SSEDecoder:
    """Feed it lines without their line endings; it returns (event, data) when one completes."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        # `id:` and `retry:` only matter to reconnecting browsers, not a one-shot stream.
        return None

    def flush(self) -> tuple[str, str] | None:
        """The pending event, if any (also used at end of stream when the last blank line is missing)."""
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        return (event, "\n".join(data)) if data else None


def decode(event: str, data: str) -> dict | None:
    """One event's JSON object; None for the [DONE] sentinel."""
    if data.strip() == DONE:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        raise SSEError(f"upstream sent an event that is not JSON: {data[:200]!r}") from None
    if not isinstance(obj, dict):
        raise SSEError(f"upstream sent an event that is not a JSON object: {data[:200]!r}")
    if event == "error" and "error" not in obj:
        obj = {"error": obj}
    return obj


async def json_events(lines: AsyncIterator[str]) -> AsyncIterator[dict]:
    """JSON objects from an SSE line stream, up to [DONE] or the end of the stream.

    Ending without [DONE] is not an error here: whether the stream was complete is the
    engine's call (it knows which choices still lack a finish_reason).
    """
    decoder = SSEDecoder()
    async for line in lines:
        pending = decoder.feed(line)
        if pending is None:
            continue
        obj = decode(*pending)
        if obj is None:
            # Read the body to its end: only a fully read response gives its connection back
            # to the pool (closing it here cost a new upstream connection per request).
            async for _ in lines:
                pass
            return
        yield obj
    pending = decoder.flush()
    if pending is not None:
        obj = decode(*pending)
        if obj is not None:
            yield obj
