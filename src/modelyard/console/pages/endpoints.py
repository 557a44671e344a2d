"""The Endpoints page: the table (live over SSE), the create form, load, unload and delete.

Changes go to the run-time endpoints API in process (console/internal) and answer with the table
re-rendered, a flash out of band. The live table is `registry/events.endpoint_events`, the stream
the admin API serves too, re-rendered at each change and each quiet poll (its rates move); the
stream counts against its token's `max_streams_per_token` and ends with its session, at shutdown,
or after SSE_MAX_POLLS quiet polls (EventSource reconnects).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ...errors import RateLimited
from ...api import sse
from ...registry.events import endpoint_events
from .. import internal, views
from ..forms import FieldError, json_body, listed, text, whole
from ..guard import Refusal, changer, one_of, reader, still_signed_in, who
from ..render import render
from ..session import Session

router = APIRouter(prefix="/console", include_in_schema=False)

SSE_MAX_POLLS = 3600        # quiet polls (registry/events.SNAPSHOT_POLL) before the stream ends; EventSource reconnects


async def _endpoints_context(request: Request, session: Session) -> dict:
    rows, notice = await views.endpoints(request.app, who(request, session))
    return {"rows": rows, "notice": notice}


@router.get("/endpoints")
async def endpoints_page(request: Request, session: Session = Depends(reader)) -> Response:
    models = [ep.spec.model for ep in request.app.state.registry.endpoints.values() if ep.spec.engine == "llamacpp"]
    return render(request, "endpoints.html", session, page="endpoints", store_models=sorted(set(models)),
                  **await _endpoints_context(request, session))


@router.get("/endpoints/table")
async def endpoints_table(request: Request, session: Session = Depends(reader)) -> Response:
    return render(request, "_endpoints_table.html", session, **await _endpoints_context(request, session))


@router.get("/endpoints/stream")
async def endpoints_stream(request: Request, session: Session = Depends(reader)) -> Response:
    """The endpoints table as server-sent events: a fresh render whenever an endpoint changed
    (registry/events, the stream the admin API serves too) or, at each quiet poll, its rates did."""

    async def alive() -> bool:
        # the session checked again at each poll: logout, a revoked token or a silent control
        # database end the stream within a poll (plus the sync bound)
        return not request.app.state.shutting_down and await still_signed_in(request)

    async def events():
        last, polls = None, 0
        state = request.app.state
        async for kind, _ in endpoint_events(state.registry, state.started, alive=alive, polls=True):
            if kind == "keepalive":
                yield sse.KEEPALIVE
                continue
            polls += kind == "poll"
            if polls >= SSE_MAX_POLLS:
                return
            html = render(request, "_endpoints_table.html", session,
                          **await _endpoints_context(request, session)).body.decode()
            if html != last:
                last = html
                yield sse.event("endpoints", html)

    try:         # the session's token shares max_streams_per_token with its admin API streams
        body = request.app.state.stream_slots.stream(who(request, session), events())
    except RateLimited as exc:
        raise Refusal(429, exc.message, to_login=False, retry_after=round(exc.retry_after or 5)) from None
    return sse.response(body)


async def _endpoint_action(request: Request, session: Session, method: str, path: str, body: Any,
                           done: str) -> Response:
    answer = await internal.call(request.app, who(request, session), method, path, json_body=body)
    flash = ("ok", done) if answer.ok else ("error", f"Refused ({answer.status}): {answer.message()}")
    return render(request, "_endpoints_table.html", session, flash=flash, oob=True,
                  **await _endpoints_context(request, session))


@router.post("/endpoints")
async def create_endpoint(request: Request, session: Session = Depends(changer)) -> Response:
    body = await json_body(request)
    try:
        engine = text(body, "engine") or "llamacpp"
        spec: dict[str, Any] = {"name": text(body, "name", required=True), "engine": engine}
        if engine == "openai":
            spec.update(urls=listed(body, "urls"), upstream_model=text(body, "upstream_model"),
                        api_key=text(body, "api_key"))
            if not spec["urls"]:
                raise FieldError("urls is required for a remote endpoint (engine openai): one or more base URLs")
        else:
            spec["model"] = text(body, "model", required=True)
        for name, lo, hi in (("context", 16, 1 << 20), ("parallel", 1, 1024), ("threads", 0, 1024)):
            value = whole(body, name, lo, hi)
            if value is not None:
                spec[name] = value
        if text(body, "kind"):
            spec["kind"] = text(body, "kind")
    except FieldError as exc:
        return render(request, "_endpoints_table.html", session, status=422, flash=("error", str(exc)), oob=True,
                      **await _endpoints_context(request, session))
    spec = {k: v for k, v in spec.items() if v is not None}
    return await _endpoint_action(request, session, "POST", views.ENDPOINTS_API, spec,
                                  f"Endpoint {spec['name']!r} created.")


@router.post("/endpoints/{endpoint_id}/{action}")
async def endpoint_action(endpoint_id: str, request: Request,
                          action: str = Depends(one_of("endpoint", "load", "unload", "delete")),
                          session: Session = Depends(changer)) -> Response:
    if action == "delete":
        return await _endpoint_action(request, session, "DELETE", f"{views.ENDPOINTS_API}/{endpoint_id}", None,
                                      f"Deleting {endpoint_id}.")
    return await _endpoint_action(request, session, "POST", f"{views.ENDPOINTS_API}/{endpoint_id}/{action}", {},
                                  f"{action.capitalize()} requested for {endpoint_id}.")
