"""What the server and its endpoints are doing: /health and /ready (open: load balancers and
orchestrators call them), /metrics (open, less the prefix-cache series), and /api/v1/endpoints
(an inference key's view, or an admin token's with the cache counters)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..redact import mask_url_credentials
from ..registry import render
from .auth import find_endpoint, may_see_cache, may_see_reasons, require_key, seen_endpoints
from .admin.auth import admin_or_none
from .middleware.credentials import before_body

admin = APIRouter()         # /api/v1/endpoints, behind key_or_admin
probes = APIRouter()        # /health and /ready, open (load balancers and orchestrators call them)


@before_body
async def key_or_admin(request: Request) -> None:
    """/api/v1/endpoints' dependency: an admin token (the operator's view, with the cache
    counters; no quota counted) or else an inference key (api/auth.require_key)."""
    request.state.admin = admin_or_none(request)
    if request.state.admin is None:
        await require_key(request)


def _views(request: Request) -> tuple[bool, bool]:
    return request.state.admin is not None or may_see_reasons(request), may_see_cache(request)


@admin.get("/endpoints", summary="Model endpoints and their state")
async def list_endpoints(request: Request) -> dict:
    detail, cache = _views(request)
    return {"endpoints": [render.status(ep, detail, cache) for ep in seen_endpoints(request)]}


@admin.get("/endpoints/{name}", summary="One model endpoint")
async def get_endpoint(name: str, request: Request) -> dict:
    return render.status(find_endpoint(request, name), *_views(request))


@probes.get("/health", summary="The process is up and accepting requests")
async def health() -> dict:
    return {"status": "ok"}


@probes.get("/ready", summary="Every endpoint that should be loaded can serve; 503 listing those that cannot")
async def ready(request: Request) -> JSONResponse:
    """Open (probes send no key): it lists the states of the endpoints that cannot serve; their
    reasons only to trusted callers (a valid key, or a keyless loopback server)."""
    app = request.app.state
    detail = may_see_reasons(request)
    # An endpoint an admin unloaded or is deleting is not wanted: it does not make the server unready.
    # One the lifecycle unloaded serves too: its requests wait for its load (registry/lifecycle).
    not_ready = {ep.name: mask_url_credentials(ep.not_ready_reason()) if detail else ep.not_ready_state()
                 for ep in app.registry.endpoints.values()
                 if ep.desired == "loaded" and ep.serving_reason() is not None}
    if app.shutting_down:
        return JSONResponse({"status": "shutting down", "not_ready": not_ready}, status_code=503)
    if not_ready:
        return JSONResponse({"status": "not ready", "not_ready": not_ready}, status_code=503)
    return JSONResponse({"status": "ready"})


@probes.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    """Open (scrapers send no key), less the prefix-cache series: those only for an admin token
    or where `[server] public_cache_counters = true` (api/auth.may_see_cache)."""
    request.state.admin = admin_or_none(request)
    return Response(request.app.state.metrics.render(cache=may_see_cache(request)), media_type=CONTENT_TYPE_LATEST)
