"""Every request body bounded before it is read: 413 naming the limit and the size on any method
(Content-Length refused unread, chunked cut at the limit), `Connection: close` after an answer
that left a body unread, and JSON POST bodies whatever their Content-Type."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send



# Routes whose bodies are multipart forms (api/openai/passthrough: OpenAI's audio uploads), the
# only POSTs whose Content-Type is kept: a form's boundary is in it.
MULTIPART_PATHS = ("/audio/transcriptions", "/audio/translations")


# An unread body of at most this many bytes (by its Content-Length) is read and dropped after an
# early answer, and the connection kept; a longer or chunked one ends the connection.
DISCARD_BYTES = 1024 * 1024


def _multipart(scope: Scope) -> bool:
    ctype = dict(scope["headers"]).get(b"content-type", b"")
    return scope["path"].endswith(MULTIPART_PATHS) and ctype.lower().startswith(b"multipart/form-data")


class BodyLimits:
    """Rejects bodies above `max_bytes` with 413 before reading them into memory, whatever the
    method (a PATCH or DELETE body is read by FastAPI as much as a POST one), and treats every
    POST body as JSON: `curl -d` sends form-urlencoded, and OpenAI's API accepts it too (the
    multipart forms of the Files upload, `uploads`, and the audio uploads, MULTIPART_PATHS, excepted).
    (A browser's POST must say application/json: api/middleware/browser_guard.BrowserGuard refuses it before.)

    A Content-Length above the limit is refused before any byte of the body is read; a chunked
    body is counted as it streams in and refused at the first message past the limit, so at
    most the limit plus one message (uvicorn hands over at most ~64 KiB at a time) is held.
    Either way the rest of the body is not read: the 413 says `Connection: close`, as does any
    answer given before the body was read to its end (api/middleware/credentials's 401, a 404, a 405): uvicorn
    would otherwise read and discard the rest of it to keep the connection, for as long as the
    client cared to send (connections.py closes such a connection without resetting it).
    Except a body whose Content-Length is at most DISCARD_BYTES: its rest is read and dropped
    (never held) and the connection is kept, as nginx discards a small unread body. A JSON
    body sent with a wrong key is the common case, and closing on it would cost the client its
    kept-alive connection, and a reset race for nothing: the body is on its way already."""

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[str, tuple[int, str]] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # POST paths that take a multipart upload (the Files API): path -> (their own limit, the
        # setting that names it). Only these keep their Content-Type and get the larger bound.
        self.uploads = uploads or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = self.uploads.get(scope["path"]) if scope["method"] == "POST" else None
        limit, setting = upload or (self.max_bytes, "[limits] max_body_bytes")
        if scope["method"] == "POST" and upload is None and not _multipart(scope):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope = {**scope, "headers": headers}
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(send, int(length), limit, setting)
        seen = 0
        too_large: int | None = None
        body_read = not has_body(scope)
        # An early answer keeps the connection when the unread rest is known and small.
        discardable = length is not None and length.isdigit() and int(length) <= min(limit, DISCARD_BYTES)

        async def limited() -> Message:
            nonlocal seen, too_large, body_read
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = seen
                    raise TooLarge(seen)
                body_read = body_read or not message.get("more_body", False)
            return message

        async def guarded(message: Message) -> None:
            # FastAPI turns any exception raised while it reads the body into its own 400
            # ("There was an error parsing the body"): once the limit is hit, that answer is
            # dropped and the 413 below goes out instead.
            if too_large is not None:
                return
            if message["type"] == "http.response.start" and not body_read and not discardable:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except TooLarge:
            pass
        if too_large is not None:
            await self._too_large(send, too_large, limit, setting)

    async def _too_large(self, send: Send, size: int, limit: int, setting: str) -> None:
        body = json.dumps({"error": {
            "message": f"request body is {size} bytes, above this server's limit of {limit} bytes ({setting})",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        # Connection: close: the rest of the body stays unread, and uvicorn would otherwise read
        # and discard all of it to keep the connection.
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def has_body(scope: Scope) -> bool:
    """Whether the client said a body follows the head (a length above 0, or chunks)."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" 0")):
            return True
    return False


class TooLarge(Exception):
    pass
