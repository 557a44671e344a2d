"""Upstream failures as modelyard's errors: an error response or an exception from a replica
becomes one error of the tree (errors.py) with the status the client should see; the upstream's
text passes on cleaned (redact.upstream_error_text), never our key.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx

from ..errors import DeadlineExceeded, ModelyardError, Upstream4xx, UpstreamError, UpstreamTimeout
from ..redact import upstream_error_text

# Upstream answers that blame our configuration (its key, its model name, its URL), not the
# client's request: passing them on would tell the client that ITS key or model is wrong.
# They are 502s saying what the upstream said. Other 4xx (400, 413, 422, 429) are about the
# request and keep their status.
MISCONFIGURED = {401: "rejected this endpoint's API key", 402: "refused payment", 403: "forbade the request",
                 404: "does not know the model or route", 405: "does not allow the method",
                 407: "wants proxy credentials"}


def map_error(url: str, failure: httpx.Response | BaseException,
              deadline: float | None = None, secret: str | None = None) -> ModelyardError:
    """The one translation of an upstream failure (an error response or an exception) to ours.
    `secret`, the key we send upstream, never appears in what we pass on."""
    if isinstance(failure, httpx.Response):
        try:
            body = failure.json()
        except ValueError:
            body = None
        status = failure.status_code
        message = upstream_error_text(error_message(body) or failure.text.strip()[:500] or f"HTTP {status}", secret)
        if status in MISCONFIGURED:
            return UpstreamError(f"upstream {url} {MISCONFIGURED[status]} (HTTP {status}): {message}; "
                                 "check this endpoint's configuration", code="upstream_misconfigured")
        if 400 <= status < 500:
            retry = failure.headers.get("retry-after", "")   # e.g. an upstream 429
            return Upstream4xx(message, upstream_status=status,
                               retry_after=float(retry) if retry.isdigit() else None)
        return UpstreamError(f"upstream {url} answered {status}: {message}")
    if isinstance(failure, httpx.TimeoutException):
        if deadline is not None and time.monotonic() >= deadline:
            return DeadlineExceeded("request deadline passed while waiting for the upstream")
        return UpstreamTimeout(f"upstream {url} timed out ({reason(failure)})")
    return UpstreamError(f"upstream {url} failed: {upstream_error_text(reason(failure), secret)}")


def error_message(body: Any) -> str:
    """The message in an OpenAI ({"error": {...}}), TGI ({"error": "..."}) or FastAPI ({"detail"}) body."""
    if not isinstance(body, dict):
        return ""
    err = body.get("error", body)
    if isinstance(err, str):
        return err
    if isinstance(err, dict):
        for key in ("message", "detail"):
            value = err.get(key)
            if value:
                return value if isinstance(value, str) else json.dumps(value)[:500]
    return ""


def reason(exc: BaseException) -> str:
    """A short why for ready_reason and messages (httpx's own texts are often vague or empty)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timed out"
    cause: BaseException | None = exc
    for _ in range(8):   # the OS error (e.g. "connection refused") sits a few causes down
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
        cause = cause.__cause__ or cause.__context__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
