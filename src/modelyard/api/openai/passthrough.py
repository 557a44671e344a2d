"""Routes the upstream engines serve and modelyard does not implement, passed through to a remote
endpoint's replicas: `/rerank` and `/score` (vLLM, TEI's rerank, SGLang), `/classify` and
`/pooling` (vLLM, at its root), `/audio/speech`, and the multipart uploads
`/audio/transcriptions` and `/audio/translations` (OpenAI's, vLLM's Whisper).

Each is an API route like the others: the key checked before the body is read (api/auth), the
body bounded by the server's max_body_bytes (api/middleware/body_limits), the body's `model`
picks the endpoint among the key's (unknown: 404), an embedded endpoint answers 400 naming what
it serves, the replica chosen and failed over as any request's (proxy/replicas), the upstream's
errors mapped (proxy/errors), and the request charged in its ledger by the usage the upstream
reports (`usage.prompt_tokens`/`total_tokens`, or `input_tokens`/`output_tokens`; none: 0 tokens,
the request still counted). Any other path stays a 404.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from ...errors import InvalidRequest, UpstreamError
from ...proxy.errors import map_error
from ...settings import MAX_NAME
from ..auth import find_endpoint
from ..errors import limit_error
from ...engine.types import ModelType
from .pipeline import deadline_for, ready_engine

router = APIRouter()

# our path -> (the upstream's path, whether it is at the URL's root rather than under /v1)
JSON_ROUTES = {"/rerank": ("/rerank", False), "/score": ("/score", False), "/audio/speech": ("/audio/speech", False),
               "/classify": ("/classify", True), "/pooling": ("/pooling", True)}
MULTIPART_ROUTES = {"/audio/transcriptions": "/audio/transcriptions", "/audio/translations": "/audio/translations"}
MAX_ANSWER_BYTES = 16_000_000       # a JSON answer is read whole (to read its usage): bounded
MAX_FORM_FIELDS = 64


def _model(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest("`model` is required: the name of a remote model endpoint", param="model")
    if len(value) > MAX_NAME:
        raise limit_error("model", len(value), MAX_NAME, "the length of model")
    return value


async def _remote(request: Request, name: str, route: str):
    """The endpoint's remote engine: 404 unknown (or not the key's), 400 embedded, 400 not ready;
    held as the pipeline's routes hold theirs (ready_engine: an on-demand endpoint woken first)."""
    endpoint = find_endpoint(request, name)
    if endpoint.spec.engine != "openai":
        raise InvalidRequest(f"model endpoint {name!r} is served by modelyard's embedded engine, which does not "
                             f"serve {route}; it is passed through only to remote (engine = \"openai\") endpoints",
                             param="model", code="unsupported_route")
    return endpoint, await ready_engine(request, name, ModelType.COMPLETIONS)


def _usage(answer: Any) -> tuple[int, int]:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return 0, 0

    def count(*keys: str) -> int:
        for key in keys:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return 0
    completion = count("completion_tokens", "output_tokens")
    prompt = count("prompt_tokens", "input_tokens") or max(0, count("total_tokens") - completion)
    return prompt, completion


async def _pass(request: Request, endpoint, engine, route: str, path: str, root: bool, **send: Any) -> Response:
    name = endpoint.name
    ledger = request.state.ledger
    ledger.endpoint = name
    [entry] = ledger.entries_for(1)
    await entry.reserve(0)      # its size is the upstream's to count: charged by what it reports
    prompt = completion = 0
    try:
        forwarded = await engine.forward(path, deadline_for(request), root=root, **send)
    except BaseException:
        entry.settle(0, 0)
        raise
    resp = forwarded.resp
    ctype = resp.headers.get("content-type", "application/octet-stream")
    if not ctype.startswith("application/json"):
        # audio and other bytes: streamed through as they come
        async def relay():
            try:
                async for chunk in resp.aiter_bytes():
                    yield chunk
            finally:
                entry.settle(0, 0)
                await forwarded.close()
        # the task closes it too should the body never be iterated (close is idempotent)
        return StreamingResponse(relay(), status_code=resp.status_code, media_type=ctype,
                                 background=BackgroundTask(forwarded.close))
    try:
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise UpstreamError(f"model endpoint {name!r}: the upstream's answer to {route} is above "
                                    f"{MAX_ANSWER_BYTES} bytes")
            chunks.append(chunk)
        content = b"".join(chunks)
        try:
            prompt, completion = _usage(json.loads(content))
        except ValueError:
            pass
        return Response(content, status_code=resp.status_code, media_type="application/json")
    except httpx.HTTPError as exc:
        raise map_error(forwarded.replica.url, exc, deadline_for(request), secret=endpoint.spec.api_key) from exc
    finally:
        entry.settle(prompt, completion)
        await forwarded.close()


def _json_route(route: str, upstream: str, root: bool):
    async def passthrough(request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            raise InvalidRequest(f"the body of {route} must be a JSON object", param=None) from None
        if not isinstance(body, dict):
            raise InvalidRequest(f"the body of {route} must be a JSON object", param=None)
        name = _model(body.get("model"))
        endpoint, engine = await _remote(request, name, route)
        body = {**body, "model": endpoint.spec.upstream_model or endpoint.spec.name}
        return await _pass(request, endpoint, engine, route, upstream, root, body=body)
    passthrough.__name__ = "passthrough_" + route.strip("/").replace("/", "_")
    return passthrough


def _multipart_route(route: str, upstream: str):
    async def passthrough(request: Request) -> Response:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise InvalidRequest(f"{route} takes a multipart/form-data body (OpenAI's file upload), not "
                                 f"{ctype.split(';')[0] or 'none'!r}", param="file")
        try:
            form = await request.form(max_files=4, max_fields=MAX_FORM_FIELDS)
        except Exception as exc:      # starlette's MultiPartException, a malformed form
            raise InvalidRequest(f"{route}: the multipart body could not be read: {exc}", param="file") from None
        name = _model(form.get("model"))
        endpoint, engine = await _remote(request, name, route)
        data: dict[str, list[str]] = {}
        files: list[tuple[str, tuple[str | None, bytes, str | None]]] = []
        for key, value in form.multi_items():
            if isinstance(value, str):
                data.setdefault(key, []).append(endpoint.spec.upstream_model or endpoint.spec.name
                                                if key == "model" else value)
            else:
                files.append((key, (value.filename, await value.read(), value.content_type)))
        await form.close()
        # re-encoded by httpx (a fresh boundary), the model renamed as for every upstream
        built = httpx.Request("POST", "http://upstream", data=data, files=files)
        return await _pass(request, endpoint, engine, route, upstream, False, content=built.read(),
                           headers={"content-type": built.headers["content-type"]})
    passthrough.__name__ = "passthrough_" + route.strip("/").replace("/", "_")
    return passthrough


for _route, (_upstream, _root) in JSON_ROUTES.items():
    router.add_api_route(_route, _json_route(_route, _upstream, _root), methods=["POST"],
                         summary=f"{_route} of a remote endpoint's engine, passed through")
for _route, _upstream in MULTIPART_ROUTES.items():
    router.add_api_route(_route, _multipart_route(_route, _upstream), methods=["POST"],
                         summary=f"{_route} of a remote endpoint's engine, passed through (multipart)")
