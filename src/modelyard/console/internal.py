"""The console's calls to the admin API, in process: the real routes, their checks and audit log.

Every console action is an admin API call made through the whole ASGI app (middleware, the
route's validation, its role check), as the signed-in admin token: the scope carries the
`AdminToken` under `api/scope.CONSOLE_CALLER`, which `api/admin/auth.caller` honours. A scope key cannot be
sent over the network, so this is no new way in; the console holds no admin secret.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator
from urllib.parse import quote, urlencode

from ..api.scope import CONSOLE_CALLER
from ..settings import AdminToken

PREFIX = "/api/v1/control"


@dataclass
class Answer:
    status: int
    body: Any          # parsed JSON, or the text when it is not JSON

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def message(self) -> str:
        """The error's message, as the API worded it (validation errors: field and reason)."""
        body = self.body
        if isinstance(body, dict):
            if isinstance(body.get("error"), dict):
                return str(body["error"].get("message"))
            if isinstance(body.get("detail"), list):
                return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}"
                                 for d in body["detail"] if isinstance(d, dict))
            if "detail" in body:
                return str(body["detail"])
        return f"HTTP {self.status}: {str(body)[:300]}"


def _scope(app, who: AdminToken, method: str, path: str, query: dict | None, body: bytes) -> dict:
    qs = urlencode({k: v for k, v in (query or {}).items() if v is not None}).encode()
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": PREFIX + path, "raw_path": quote(PREFIX + path).encode(), "query_string": qs,
            "root_path": "", "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "extensions": {},
            "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            CONSOLE_CALLER: who}


async def stream(app, who: AdminToken, method: str, path: str, *, query: dict | None = None,
                 json_body: Any = None) -> AsyncIterator[tuple[int, bytes]]:
    """(status, body chunk) as the route sends them; the first item may carry an empty chunk."""
    body = json.dumps(json_body).encode() if json_body is not None else b""
    scope = _scope(app, who, method, path, query, body)
    out: asyncio.Queue = asyncio.Queue()
    sent = False
    done = asyncio.Event()

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()                           # then: the console's caller went away
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run(), name=f"console:{method} {path}")
    status = 500
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                status = message["status"]
                yield status, b""
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield status, message["body"]
                if not message.get("more_body"):
                    break
    finally:
        done.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def call(app, who: AdminToken, method: str, path: str, *, query: dict | None = None,
               json_body: Any = None) -> Answer:
    status, chunks = 500, []
    async for status, chunk in stream(app, who, method, path, query=query, json_body=json_body):
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", "replace")
    return Answer(status, body)


async def list_all(app, who: AdminToken, path: str, *, bound: int = 50,
                   query: dict | None = None) -> list[dict] | Answer:
    """Every object of a paged list (at most `bound` pages of 100), or the failed answer."""
    data: list[dict] = []
    after = None
    for _ in range(bound):
        answer = await call(app, who, "GET", path, query={**(query or {}), "limit": 100, "after": after})
        if not answer.ok:
            return answer
        if isinstance(answer.body, list):
            return answer.body
        data += answer.body.get("data", [])
        if not answer.body.get("has_more"):
            break
        after = answer.body.get("last_id")
    return data
