"""Run-time model endpoints in the admin API: /api/v1/control/model-endpoints.

Create (an embedded model from the store, or remote replicas), get, list, patch (the engine
reloads with the new config; new upstream hosts drop the stored api_key, see `same_hosts`), delete (in-flight requests finish; meanwhile the models list
shows "object": "model.deleted"), load/unload, and a server-sent-events stream of each
endpoint's state as full snapshots. Endpoints from the TOML file are listed with
source "config" and cannot be changed here (409 config_managed): the file owns them.

Writes go to the control store first; control/sync.EndpointSync then applies the stored rows to this
process's registry (right away) and every other process's (within the sync bound).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, Iterable, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ...control.endpoints import StoredEndpoint
from ...errors import ConfigError, Conflict, ModelyardError, ObjectNotFound
from ...registry.endpoint import Endpoint
from ...registry.events import endpoint_events
from ...registry.render import endpoint_object
from ...redact import mask_url_credentials
from ..openai.schemas import KeepAlive
from ...settings import (BALANCES, MAX_PREFIX_BLOCKS, MAX_SESSION_HEADER, UPSTREAM_SERVERS, AdminToken,
                          EndpointSpec, endpoint_spec, spec_fields, upstream_refusal)
from .. import sse
from .auth import actor, admin, revision_of, still_valid, viewer

router = APIRouter()
PREFIX = "/model-endpoints"
Limit = Annotated[int, Query(ge=1, le=100)]


class EndpointFields(BaseModel):
    """What an admin may set; every field but `name` may be changed by PATCH (null: the default)."""
    model_config = ConfigDict(extra="forbid")
    engine: Literal["llamacpp", "openai"] | None = None
    model: str | None = Field(None, min_length=1, max_length=1000)
    kind: Literal["completions", "embeddings"] | None = None
    context: int | None = Field(None, ge=16, le=1_048_576)
    parallel: int | None = Field(None, ge=1, le=256)
    threads: int | None = Field(None, ge=0, le=1024)
    batch: int | None = Field(None, ge=1, le=65_536)
    max_queue: int | None = Field(None, ge=0, le=100_000)
    prefix_cache: bool | None = None
    prefix_cache_mib: int | None = Field(None, ge=0, le=1_048_576)
    deterministic: bool | None = None
    convert: Literal["q8_0", "q4_0"] | None = None
    chat_parse_special: bool | None = None
    urls: list[Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2000)]] | None = \
        Field(None, min_length=1, max_length=64)
    upstream_model: str | None = Field(None, min_length=1, max_length=1000)
    upstream_server: Literal[UPSTREAM_SERVERS] | None = None      # type: ignore[valid-type]
    api_key: str | None = Field(None, min_length=1, max_length=4096)
    timeout: float | None = Field(None, ge=0.1, le=86_400)     # seconds; 5e-324 was accepted
    batch_share: float | None = Field(None, gt=0, le=1)        # openai: batch work's share of capacity
    balance: Literal[BALANCES] | None = None      # type: ignore[valid-type]
    balance_abs_threshold: float | None = Field(None, ge=0, le=1_000_000)
    balance_rel_threshold: float | None = Field(None, ge=1, le=1000)
    prefix_blocks: int | None = Field(None, ge=1, le=MAX_PREFIX_BLOCKS)
    session_header: str | None = Field(None, max_length=MAX_SESSION_HEADER, pattern=r"^[A-Za-z0-9_-]*$")
    # the lifecycle (registry/lifecycle): loaded at once or on its first request; seconds idle
    load: Literal["always", "on_demand"] | None = None
    keep_alive: KeepAlive | None = None


class EndpointCreate(EndpointFields):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    desired: Literal["loaded", "unloaded"] = "loaded"


def _invalid(loc: list, value: Any, msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": loc, "input": value, "msg": msg}])


def _spec(fields: dict[str, Any]) -> EndpointSpec:
    """Fields -> a checked spec; what EndpointSpec refuses is a 422 naming it."""
    try:
        # null means the default, on create as on PATCH (an explicit "urls": null was a 500)
        spec = endpoint_spec({k: tuple(v) if k == "urls" else v for k, v in fields.items() if v is not None})
    except ConfigError as exc:
        raise _invalid(["body", exc.param] if exc.param else ["body"], fields.get(exc.param or ""),
                       exc.message) from None
    return spec


def _check_urls(request: Request, spec: EndpointSpec) -> None:
    """A run-time endpoint's upstreams may not be link-local or metadata addresses (settings.
    upstream_refusal) unless the operator allowed them: a 422 naming the URL's index."""
    if request.app.state.settings.allow_private_upstreams:
        return
    for i, url in enumerate(spec.urls):
        why = upstream_refusal(url)
        if why:
            raise _invalid(["body", "urls", i], mask_url_credentials(url), why)


def _check_model(request: Request, spec: EndpointSpec) -> None:
    """Before a spec is stored: its model ref can be fetched, and this process can run it with
    the kernels it chose (409 otherwise: stored, it would fail in every process like this one)."""
    if spec.engine != "llamacpp":
        return
    request.app.state.registry.check_kernels(spec)
    try:
        request.app.state.registry.store.check(spec.model)
    except ModelyardError as exc:
        raise _invalid(["body", "model"], spec.model, exc.message) from None


def _config_managed(ep: Endpoint) -> Conflict:
    if ep.source != "config":
        return Conflict(f"model endpoint {ep.name!r} is being deleted", param="id", code="endpoint_deleting")
    return Conflict(f"model endpoint {ep.name!r} comes from the server's config file: change it there and "
                    "restart (the API changes only endpoints it created)", param="id", code="config_managed")


async def _row(request: Request, endpoint_id: str) -> tuple[Endpoint | None, StoredEndpoint | None]:
    registry = request.app.state.registry
    ep = next((e for e in registry.endpoints.values() if e.id == endpoint_id), None)
    if ep is not None and ep.source == "config":
        return ep, None
    try:
        row = await asyncio.to_thread(request.app.state.endpoint_store.get, endpoint_id)
    except ObjectNotFound:
        if ep is not None and ep.desired == "deleted":     # still draining here: shown until gone
            return ep, None
        raise
    return ep, row


async def _apply(request: Request) -> None:
    """This process applies what it just wrote at once (the others within the sync bound)."""
    await request.app.state.control_sync.refresh()


def _answer(request: Request, response: Response, ep: Endpoint | None, row: StoredEndpoint | None) -> dict:
    body = endpoint_object(ep, row, started=request.app.state.started)
    response.headers["ETag"] = f'"{body["revision"]}"'
    return body


def _here(request: Request, row: StoredEndpoint) -> Endpoint | None:
    ep = request.app.state.registry.endpoints.get(row.name)
    return ep if ep is not None and ep.id == row.id else None


@router.post(PREFIX, status_code=201, summary="Create a model endpoint (it loads in the background)")
async def create_endpoint(body: EndpointCreate, request: Request, response: Response,
                          who: AdminToken = Depends(admin)) -> dict:
    fields = {k: v for k, v in body.model_dump(exclude={"desired"}).items() if k in body.model_fields_set or k == "name"}
    spec = _spec(fields)
    _check_urls(request, spec)
    _check_model(request, spec)
    registry = request.app.state.registry
    if spec.name in registry.endpoints and registry.endpoints[spec.name].source == "config":
        raise Conflict(f"model endpoint {spec.name!r} is served from this server's config file", param="name",
                       code="endpoint_exists")
    row = await asyncio.to_thread(request.app.state.endpoint_store.create, actor(who), spec, body.desired)
    await _apply(request)
    return _answer(request, response, _here(request, row), row)


@router.get(PREFIX, summary="Model endpoints (config ones first), by id")
async def list_endpoints(request: Request, limit: Limit = 20, after: str | None = None,
                         _: AdminToken = Depends(viewer)) -> dict:
    started = request.app.state.started
    config = sorted((ep for ep in request.app.state.registry.endpoints.values() if ep.source == "config"),
                    key=lambda e: e.id)
    data = [endpoint_object(ep, started=started) for ep in config if ep.id > (after or "")][:limit + 1]
    if len(data) <= limit:
        cursor = max(after or "", data[-1]["id"] if data else "")
        rows = await asyncio.to_thread(request.app.state.endpoint_store.page, limit + 1 - len(data), cursor)
        data += [endpoint_object(_here(request, r), r, started=started) for r in rows]
    page = data[:limit]
    return {"object": "list", "data": page, "has_more": len(data) > limit,
            "last_id": page[-1]["id"] if page else None}


@router.get(PREFIX + "/events", summary="Server-sent events: every endpoint's state as it changes")
async def all_events(request: Request, who: AdminToken = Depends(viewer)) -> StreamingResponse:
    return stream(request, who, endpoint_events(request.app.state.registry, request.app.state.started, None,
                                             _async(still_valid(request.app, who))))


@router.get(PREFIX + "/{endpoint_id}", summary="One model endpoint")
async def get_endpoint(endpoint_id: str, request: Request, response: Response,
                       _: AdminToken = Depends(viewer)) -> dict:
    ep, row = await _row(request, endpoint_id)
    return _answer(request, response, ep, row)


@router.get(PREFIX + "/{endpoint_id}/events", summary="Server-sent events: one endpoint's state as it changes")
async def one_endpoint_events(endpoint_id: str, request: Request,
                              who: AdminToken = Depends(viewer)) -> StreamingResponse:
    await _row(request, endpoint_id)          # 404 for an unknown id, before the stream starts
    return stream(request, who, endpoint_events(request.app.state.registry, request.app.state.started, endpoint_id,
                                             _async(still_valid(request.app, who))))


@router.patch(PREFIX + "/{endpoint_id}", summary="Change an endpoint's config (it reloads); null resets a field; "
              "new upstream hosts drop the stored api_key unless it is set too")
async def patch_endpoint(endpoint_id: str, body: EndpointFields, request: Request, response: Response,
                         if_match: Annotated[str | None, Header()] = None, who: AdminToken = Depends(admin)) -> dict:
    ep, row = await _row(request, endpoint_id)
    if row is None:
        raise _config_managed(ep)
    fields = spec_fields(row.spec)
    default = EndpointSpec(name=row.name)
    for key in body.model_fields_set:
        value = getattr(body, key)
        fields[key] = spec_fields(default)[key] if value is None else value
    if "api_key" not in body.model_fields_set and not same_hosts(row.spec.urls, fields["urls"]):
        fields["api_key"] = None        # the key was given for the old hosts, not for these
    spec = _spec(fields)
    _check_urls(request, spec)
    _check_model(request, spec)
    row = await asyncio.to_thread(request.app.state.endpoint_store.update, actor(who), endpoint_id,
                                  revision_of(if_match), spec=spec)
    await _apply(request)
    return _answer(request, response, _here(request, row), row)


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the default port spelled out; credentials and path aside."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:           # not a port: the URL is refused when the spec is checked
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(parts.scheme.lower())


def same_hosts(old: Iterable[str], new: Iterable[str]) -> bool:
    """Whether every URL in `new` goes to a scheme, host and port that one in `old` went to: an
    upstream api_key stored for the old ones is kept only then (a PATCH of `urls` alone must not
    send it to a host it was never meant for)."""
    before = {_origin(u) for u in old}
    return all(_origin(u) in before for u in new)


async def _desire(request: Request, response: Response, endpoint_id: str, desired: str, who: AdminToken,
                  if_match: str | None) -> dict:
    ep, row = await _row(request, endpoint_id)
    if row is None:
        raise _config_managed(ep)
    row = await asyncio.to_thread(request.app.state.endpoint_store.update, actor(who), endpoint_id,
                                  revision_of(if_match), desired=desired, action=f"model_endpoint.{desired[:-2]}")
    await _apply(request)
    response.status_code = 202
    return _answer(request, response, _here(request, row), row)


@router.post(PREFIX + "/{endpoint_id}/load", status_code=202, summary="Load it (a failed one tries again)")
async def load_endpoint(endpoint_id: str, request: Request, response: Response,
                        if_match: Annotated[str | None, Header()] = None, who: AdminToken = Depends(admin)) -> dict:
    return await _desire(request, response, endpoint_id, "loaded", who, if_match)


@router.post(PREFIX + "/{endpoint_id}/unload", status_code=202,
             summary="Unload it: in-flight requests finish, new ones get 400 until it is loaded again")
async def unload_endpoint(endpoint_id: str, request: Request, response: Response,
                          if_match: Annotated[str | None, Header()] = None, who: AdminToken = Depends(admin)) -> dict:
    return await _desire(request, response, endpoint_id, "unloaded", who, if_match)


@router.delete(PREFIX + "/{endpoint_id}", status_code=202,
               summary="Delete it: in-flight requests finish (listed as model.deleted meanwhile), then it is gone")
async def delete_endpoint(endpoint_id: str, request: Request, response: Response,
                          if_match: Annotated[str | None, Header()] = None, who: AdminToken = Depends(admin)) -> dict:
    ep, row = await _row(request, endpoint_id)
    if row is None:
        raise _config_managed(ep)
    await asyncio.to_thread(request.app.state.endpoint_store.delete, actor(who), endpoint_id, revision_of(if_match))
    await _apply(request)
    ep = _here(request, row)
    started = request.app.state.started
    if ep is not None:     # its own state and reason, which the renderer redacts like any other
        body = endpoint_object(ep, row, state=ep.state, reason=ep.reason, started=started)
    else:
        body = {**endpoint_object(None, row, started=started), "state": "deleting", "reason": "being deleted"}
    return {**body, "desired": "deleted"}


# ---- the event stream ----------------------------------------------------------------------------

def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def alive() -> bool:
        return check()
    return alive


def stream(request: Request, who: AdminToken, events: AsyncIterator[tuple[str, dict]]) -> StreamingResponse:
    """The stream, counted against `who`'s open streams (api/admin/auth.StreamSlots: 429 past it)."""
    async def lines() -> AsyncIterator[str]:
        async for name, payload in events:
            yield sse.KEEPALIVE if name == "keepalive" else sse.event(name, payload)
    return sse.response(request.app.state.stream_slots.stream(who, lines()))
