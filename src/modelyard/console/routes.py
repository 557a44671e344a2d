"""The console's pages and actions under /console: server-rendered, re-rendered after every action.

Reads need a session (any admin token's); a change needs a session, its CSRF token and the admin
role (console/guard's dependencies, checked before a body is read), and is then made through the
admin API in process (console/internal), so the API's own validation, role check and audit log apply. Action answers are fragments htmx swaps in, read
back from server state; messages go to the page's #flash region (out of band).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from ..errors import RateLimited
from ..registry.endpoint import EndpointState
from ..registry.events import endpoint_events
from . import internal, views
from .charts import chart
from .guard import Refusal, changer, leaver, one_of, reader, still_signed_in, who
from .render import render
from .session import COOKIE, SESSION_SECONDS, Session

log = logging.getLogger("modelyard.console")
router = APIRouter(prefix="/console", include_in_schema=False)

SSE_MAX_POLLS = 3600        # quiet polls (registry/events.SNAPSHOT_POLL) before the stream ends; EventSource reconnects


def _state(request: Request):
    return request.app.state.console


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _secure(request: Request) -> bool:
    """Secure cookies except over plain http to a loopback address (where no TLS is expected)."""
    if request.url.scheme == "https":
        return True
    host = (request.url.hostname or "").strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


async def _body(request: Request) -> dict:
    try:
        data = await request.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class FieldError(ValueError):
    pass


def _text(body: dict, name: str, required: bool = False) -> str | None:
    value = body.get(name)
    value = value.strip() if isinstance(value, str) else None
    if not value:
        if required:
            raise FieldError(f"{name} is required")
        return None
    return value


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    raw = _text(body, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise FieldError(f"{name} must be a whole number from {lo} to {hi}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise FieldError(f"{name} must be from {lo} to {hi}, got {value}")
    return value


def _list(body: dict, name: str) -> list[str] | None:
    raw = _text(body, name)
    return [p.strip() for p in raw.replace("\n", ",").split(",") if p.strip()] if raw else None


# -- login, logout -----------------------------------------------------------------------------

@router.get("")
@router.get("/")
async def home(request: Request) -> Response:
    return RedirectResponse("/console/endpoints", status_code=303)


@router.get("/login")
async def login_page(request: Request) -> Response:
    return render(request, "login.html", None)


@router.post("/login")
async def login(request: Request) -> Response:
    state, client = _state(request), _client(request)
    wait = state.throttle.retry_after(client)
    if wait is not None:        # before the token is even compared: guessing is capped per address
        limit = request.app.state.settings.login_failures_per_minute
        raise Refusal(429, f"Too many failed sign-ins from {client}: login_failures_per_minute = {limit}. "
                      f"Try again in {max(1, round(wait))} s.", to_login=False, retry_after=max(1, round(wait)))
    sync = request.app.state.control_sync
    if sync.stale() is not None:
        raise Refusal(503, sync.refusal("console sign-ins"), to_login=False)
    token = (await _body(request)).get("token")
    got = None
    if isinstance(token, str) and len(token) <= 4096:
        got = await asyncio.to_thread(state.sessions.login, token, client)
    else:
        await asyncio.to_thread(state.sessions.store.failed, {"client": client})
    if got is None:
        state.throttle.failed(client)
        log.warning("console: a failed sign-in from %s", client)
        raise Refusal(401, "That is not an admin token of this server.", to_login=False)
    log.info("console: %s signed in from %s", got[0].who, client)
    _, cookie = got
    response = Response(status_code=204, headers={"HX-Redirect": "/console/endpoints"})
    response.set_cookie(COOKIE, cookie, max_age=SESSION_SECONDS, path="/console", httponly=True,
                        samesite="strict", secure=_secure(request))
    return response


@router.post("/logout")
async def logout(request: Request, session: Session = Depends(leaver)) -> Response:
    # the record goes: this cookie, and any copy of it, is refused from now on in every process
    await asyncio.to_thread(_state(request).sessions.logout, session, _client(request))
    response = Response(status_code=204, headers={"HX-Redirect": "/console/login"})
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict", secure=_secure(request))
    return response


# -- endpoints ---------------------------------------------------------------------------------

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


def _sse(event: str, html: str) -> str:
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in html.splitlines()) + "\n"


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
                yield ": keepalive\n\n"
                continue
            polls += kind == "poll"
            if polls >= SSE_MAX_POLLS:
                return
            html = render(request, "_endpoints_table.html", session,
                          **await _endpoints_context(request, session)).body.decode()
            if html != last:
                last = html
                yield _sse("endpoints", html)

    try:         # the session's token shares max_streams_per_token with its admin API streams
        body = request.app.state.stream_slots.stream(who(request, session), events())
    except RateLimited as exc:
        raise Refusal(429, exc.message, to_login=False, retry_after=round(exc.retry_after or 5)) from None
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _endpoint_action(request: Request, session: Session, method: str, path: str, body: Any,
                           done: str) -> Response:
    answer = await internal.call(request.app, who(request, session), method, path, json_body=body)
    flash = ("ok", done) if answer.ok else ("error", f"Refused ({answer.status}): {answer.message()}")
    return render(request, "_endpoints_table.html", session, flash=flash, oob=True,
                  **await _endpoints_context(request, session))


@router.post("/endpoints")
async def create_endpoint(request: Request, session: Session = Depends(changer)) -> Response:
    body = await _body(request)
    try:
        engine = _text(body, "engine") or "llamacpp"
        spec: dict[str, Any] = {"name": _text(body, "name", required=True), "engine": engine}
        if engine == "openai":
            spec.update(urls=_list(body, "urls"), upstream_model=_text(body, "upstream_model"),
                        api_key=_text(body, "api_key"))
            if not spec["urls"]:
                raise FieldError("urls is required for a remote endpoint (engine openai): one or more base URLs")
        else:
            spec["model"] = _text(body, "model", required=True)
        for name, lo, hi in (("context", 16, 1 << 20), ("parallel", 1, 1024), ("threads", 0, 1024)):
            value = _int(body, name, lo, hi)
            if value is not None:
                spec[name] = value
        if _text(body, "kind"):
            spec["kind"] = _text(body, "kind")
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


# -- live --------------------------------------------------------------------------------------

SPAN = 300.0
CHARTS = (("requests", "requests/s", ""), ("tokens", "tokens/s", ""), ("ttft", "TTFT (mean)", "s"),
          ("queue", "queue depth", ""), ("throttled", "429s/s", ""), ("errors", "errors (5xx)/s", ""))


def _charts(request: Request) -> list[dict]:
    sampler = _state(request).sampler
    out = []
    for name in sorted(request.app.state.registry.endpoints):
        series = sampler.series(name)
        out.append({"name": name, "charts": [chart(series[key], title, unit, SPAN) for key, title, unit in CHARTS]})
    return out


@router.get("/live")
async def live_page(request: Request, session: Session = Depends(reader)) -> Response:
    return render(request, "live.html", session, page="live", endpoints=_charts(request))


@router.get("/live/charts")
async def live_charts(request: Request, session: Session = Depends(reader)) -> Response:
    return render(request, "_live_charts.html", session, endpoints=_charts(request))


# -- playground --------------------------------------------------------------------------------

PLAYGROUND_KEY_SECONDS = 3600


@router.get("/playground")
async def playground_page(request: Request, session: Session = Depends(reader)) -> Response:
    eps = [{"name": ep.name, "kind": ep.model_type.value.lower() if ep.model_type else "completions",
            "ready": ep.state is EndpointState.READY}
           for ep in sorted(request.app.state.registry.endpoints.values(), key=lambda e: e.name)]
    return render(request, "playground.html", session, page="playground", endpoints=eps)


@router.post("/playground/key")
async def playground_key(request: Request, session: Session = Depends(changer)) -> Response:
    """A short-lived inference key for the playground (an ordinary stored key: audited, metered,
    revocable), its secret into the page's key field."""
    answer = await internal.call(request.app, who(request, session), "POST", "/api-keys", json_body={
        "name": f"console playground ({session.name})", "expires_at": int(time.time()) + PLAYGROUND_KEY_SECONDS})
    if not answer.ok:
        return render(request, "_playground_key.html", session, secret=None,
                       flash=("error", f"Refused ({answer.status}): {answer.message()}"), oob=True)
    return render(request, "_playground_key.html", session, secret=answer.body["secret"],
                   flash=("ok", f"Key {answer.body['id']} made; it expires in an hour."), oob=True)


# -- keys --------------------------------------------------------------------------------------

async def _keys_fragment(request: Request, session: Session, status: int = 200, flash=None,
                         secret: dict | None = None) -> Response:
    got = await views.keys(request.app, who(request, session))
    if isinstance(got, internal.Answer):
        return render(request, "_keys.html", session, status=status, keys=[], oob=True, secret=None,
                       flash=("error", f"the keys API answered {got.status}: {got.message()}"))
    return render(request, "_keys.html", session, status=status, keys=got, secret=secret, flash=flash, oob=True)


@router.get("/keys")
async def keys_page(request: Request, session: Session = Depends(reader)) -> Response:
    got = await views.keys(request.app, who(request, session))
    notice = f"the keys API answered {got.status}: {got.message()}" if isinstance(got, internal.Answer) else None
    return render(request, "keys.html", session, page="keys", keys=[] if notice else got, notice=notice,
                   secret=None, endpoint_names=sorted(request.app.state.registry.endpoints))


@router.post("/keys")
async def create_key(request: Request, session: Session = Depends(changer)) -> Response:
    body = await _body(request)
    try:
        fields: dict[str, Any] = {"name": _text(body, "name", required=True),
                                  "rpm": _int(body, "rpm", 1, 10 ** 9), "tpm": _int(body, "tpm", 1, 10 ** 12),
                                  "endpoints": _list(body, "endpoints")}
        hours = _int(body, "expires_hours", 1, 24 * 366)
        if hours is not None:
            fields["expires_at"] = int(time.time()) + hours * 3600
    except FieldError as exc:
        return await _keys_fragment(request, session, status=422, flash=("error", str(exc)))
    answer = await internal.call(request.app, who(request, session), "POST", "/api-keys",
                                 json_body={k: v for k, v in fields.items() if v is not None})
    if not answer.ok:
        return await _keys_fragment(request, session, status=answer.status if answer.status < 500 else 502,
                                    flash=("error", f"Refused ({answer.status}): {answer.message()}"))
    return await _keys_fragment(request, session, flash=("ok", f"Key {answer.body['name']!r} created."),
                                secret={"id": answer.body["id"], "name": answer.body["name"],
                                        "value": answer.body["secret"]})


ROTATE_GRACE = {"rotate": 3600, "rotate-now": 0}     # seconds the old secret keeps working


@router.post("/keys/{key_id}/{action}")
async def key_action(key_id: str, request: Request,
                     action: str = Depends(one_of("key", "revoke", "rotate", "rotate-now")),
                     session: Session = Depends(changer)) -> Response:
    # rotate: the old secret keeps working for an hour (clients switch without an outage);
    # rotate-now: grace 0, for a secret that leaked, which must stop working at once
    body = {"grace_seconds": ROTATE_GRACE[action]} if action in ROTATE_GRACE else None
    answer = await internal.call(request.app, who(request, session), "POST",
                                 f"/api-keys/{key_id}/{action.removesuffix('-now')}", json_body=body)
    if not answer.ok:
        return await _keys_fragment(request, session, flash=("error", f"Refused ({answer.status}): {answer.message()}"))
    if action in ROTATE_GRACE:
        after = "the old secret works for an hour" if ROTATE_GRACE[action] else "the old secret no longer works"
        return await _keys_fragment(
            request, session, flash=("ok", f"Key {answer.body['name']!r} rotated; {after}."),
            secret={"id": answer.body["id"], "name": answer.body["name"], "value": answer.body["secret"]})
    return await _keys_fragment(request, session, flash=("ok", f"Key {answer.body['name']!r} revoked."))


# -- usage -------------------------------------------------------------------------------------

def _usage_query(request: Request) -> tuple[str, int]:
    granularity = request.query_params.get("granularity", "day")
    if granularity not in ("hour", "day"):
        granularity = "day"
    try:
        days = min(max(int(request.query_params.get("days", "7")), 1), 90)
    except ValueError:
        days = 7
    return granularity, days


@router.get("/usage")
async def usage_page(request: Request, session: Session = Depends(reader)) -> Response:
    granularity, days = _usage_query(request)
    rows, notice = await views.usage(request.app, who(request, session), granularity, days)
    return render(request, "usage.html", session, page="usage", rows=rows, notice=notice,
                   granularity=granularity, days=days)


@router.get("/usage.csv")
async def usage_csv(request: Request, session: Session = Depends(reader)) -> Response:
    granularity, days = _usage_query(request)
    rows, notice = await views.usage(request.app, who(request, session), granularity, days)
    if notice:
        raise Refusal(502, notice)
    return Response(views.usage_csv(rows), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="modelyard-usage-{granularity}-{days}d.csv"'})


# -- models ------------------------------------------------------------------------------------

MAX_PULLS = 20          # pull jobs remembered (finished ones are dropped first)


@router.get("/models")
async def models_page(request: Request, session: Session = Depends(reader)) -> Response:
    models, notice = await views.models(request.app, who(request, session))
    return render(request, "models.html", session, page="models", models=models, notice=notice,
                   pulls=list(_state(request).pulls.values()))


@router.get("/models/table")
async def models_table(request: Request, session: Session = Depends(reader)) -> Response:
    models, notice = await views.models(request.app, who(request, session))
    return render(request, "_models_table.html", session, models=models, notice=notice)


async def _models_fragment(request: Request, session: Session, flash, status: int = 200) -> Response:
    models, notice = await views.models(request.app, who(request, session))
    return render(request, "_models_table.html", session, status=status, models=models, notice=notice,
                   flash=flash, oob=True)


async def _run_pull(app, who, job: dict) -> None:
    """Reads the models API's NDJSON pull stream (Ollama's shape) into the job the page polls."""
    buffer = b""
    try:
        async for status, chunk in internal.stream(app, who, "POST", views.MODELS_API + "/pull",
                                                   json_body={"model": job["ref"]}):
            job["http_status"] = status
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                _progress(job, line)
        _progress(job, buffer)
        if job["state"] == "pulling":
            job["state"] = "failed" if job.get("http_status", 200) >= 400 else "done"
    except Exception as exc:  # noqa: BLE001 - the page shows why the pull stopped
        job.update(state="failed", error=f"{type(exc).__name__}: {exc}")


def _progress(job: dict, line: bytes) -> None:
    if not line.strip():
        return
    try:
        event = json.loads(line)
    except ValueError:
        job.update(state="failed", error=line.decode("utf-8", "replace")[:300])
        return
    if not isinstance(event, dict):
        return
    error = event.get("error")
    if error or isinstance(event.get("detail"), list):       # an error line, or a 4xx body before the stream
        message = error.get("message") if isinstance(error, dict) else error
        job.update(state="failed", error=str(message) if message else
                   internal.Answer(job.get("http_status", 400), event).message())
        return
    job["status"] = str(event.get("status", ""))
    if isinstance(event.get("total"), int) and event["total"] > 0:
        job["total"] = event["total"]
        job["completed"] = int(event.get("completed") or 0)
    if event.get("status") == "success":
        job["state"] = "done"


@router.post("/models/pull")
async def pull_model(request: Request, session: Session = Depends(changer)) -> Response:
    body = await _body(request)
    ref = _text(body, "ref")
    if ref is None:
        return await _models_fragment(request, session, ("error", "ref is required: a model reference to pull"), 422)
    state = _state(request)
    job = {"id": f"pull{next(state.pull_ids)}", "ref": ref, "state": "pulling", "status": "starting",
           "completed": 0, "total": None, "error": None}
    for old in [j for j in state.pulls.values() if j["state"] != "pulling"][:max(0, len(state.pulls) - MAX_PULLS + 1)]:
        state.pulls.pop(old["id"], None)
    state.pulls[job["id"]] = job
    task = asyncio.create_task(_run_pull(request.app, who(request, session), job), name=f"console-pull:{ref}")
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    return render(request, "_pull.html", session, job=job)


@router.get("/models/pulls/{job_id}")
async def pull_progress(job_id: str, request: Request, session: Session = Depends(reader)) -> Response:
    job = _state(request).pulls.get(job_id)
    if job is None:
        raise Refusal(404, f"no pull {job_id!r} (the console forgets finished pulls after a while)")
    response = render(request, "_pull.html", session, job=job)
    if job["state"] != "pulling":
        response.headers["HX-Trigger"] = "models-changed"
    return response


@router.post("/models/delete")
async def delete_model(request: Request, session: Session = Depends(changer)) -> Response:
    body = await _body(request)
    ref = _text(body, "ref")
    if ref is None:
        return await _models_fragment(request, session, ("error", "ref is required: the model reference to delete"), 422)
    answer = await internal.call(request.app, who(request, session), "DELETE", f"{views.MODELS_API}/{ref}")
    flash = ("ok", f"Deleted {ref}.") if answer.ok else ("error", f"Refused ({answer.status}): {answer.message()}")
    return await _models_fragment(request, session, flash)
