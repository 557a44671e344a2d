"""What the pages show, read from server state at every render (never cached in the browser).

Endpoints: the run-time endpoints API (`/model-endpoints`, its contract objects) when this server
has it, else the registry's configured endpoints in the same shape; joined with the sampler's
tokens/s and TTFT. Keys and usage: the admin API (usage from its rollups, never request logs).
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any

from ..redact import redact
from ..settings import AdminToken
from . import internal

ENDPOINTS_API = "/model-endpoints"
MODELS_API = "/models"


def _registry_object(ep) -> dict[str, Any]:
    """A configured endpoint in the run-time API's shape (endpoints_contract), from the registry."""
    status = ep.engine.status() if ep.engine is not None else {}
    replicas = status.get("replicas")
    why = ep.not_ready_reason()
    return {"id": f"config:{ep.name}", "name": ep.name, "source": "config", "engine": ep.spec.engine,
            "kind": ep.model_type.value.lower() if ep.model_type else None,
            "model": ep.spec.model if ep.spec.engine == "llamacpp" else ep.spec.upstream_model,
            # a ready endpoint whose replicas are all down says so ("unavailable"), with why
            "state": ep.not_ready_state() or "ready", "reason": redact(why) if why else None,
            "replicas": {"healthy": sum(1 for r in replicas if r.get("healthy")), "total": len(replicas)}
            if replicas is not None else None,
            "in_flight": int(status.get("in_flight", 0)), "queued": int(status.get("queue_depth", 0)),
            "desired": "loaded", "progress": None}


def _last_error(app, obj: dict) -> str | None:
    """The latest failure worth showing: a failed state's reason, else a replica's last error."""
    if obj.get("state") == "failed" and obj.get("reason"):
        return obj["reason"]
    ep = app.state.registry.endpoints.get(obj.get("name"))
    if ep is not None and ep.engine is not None:
        for replica in ep.engine.status().get("replicas") or ():
            if replica.get("last_error") and replica.get("last_error") != "not probed yet":
                return redact(f"{replica['url']}: {replica['last_error']}")
    return None


async def endpoints(app, who: AdminToken) -> tuple[list[dict], str | None]:
    """(rows, a notice when the run-time endpoints API is absent or failed)."""
    notice = None
    if internal.has_route(app, ENDPOINTS_API):
        got = await internal.list_all(app, who, ENDPOINTS_API)
        if isinstance(got, internal.Answer):
            notice = f"the endpoints API answered {got.status}: {got.message()}"
            objects = [_registry_object(ep) for ep in app.state.registry.endpoints.values()]
        else:
            objects = got
    else:
        notice = ("Run-time endpoints (create, load, unload, delete) need the model-endpoints API, "
                  "which this server does not have; configured endpoints are shown.")
        objects = [_registry_object(ep) for ep in app.state.registry.endpoints.values()]
    sampler = app.state.console.sampler
    rows = []
    for obj in sorted(objects, key=lambda o: o.get("name", "")):
        rows.append({**obj, **sampler.summary(obj.get("name", "")), "last_error": _last_error(app, obj)})
    return rows, notice


async def keys(app, who: AdminToken) -> list[dict] | internal.Answer:
    """Every key with its status; its last use and last-24-hour usage are the API's own
    (`last_used_at`, `usage_24h`: from the rollups, control/keys)."""
    got = await internal.list_all(app, who, "/api-keys")
    if isinstance(got, internal.Answer):
        return got
    now = int(time.time())
    for key in got:
        key["status"] = ("revoked" if key.get("revoked_at") else
                         "expired" if key.get("expires_at") and key["expires_at"] <= now else "active")
    return list(reversed(got))             # newest first


async def usage(app, who: AdminToken, granularity: str, days: int) -> tuple[list[dict], str | None]:
    start = int(time.time()) - days * 86400
    answer = await internal.call(app, who, "GET", "/usage", query={"granularity": granularity, "start": start})
    if not answer.ok:
        return [], answer.message()
    names = {}
    got = await internal.list_all(app, who, "/api-keys")
    if not isinstance(got, internal.Answer):
        names = {k["id"]: k["name"] for k in got}
    rows = [{**b, "key_name": names.get(b["key_id"], "")} for b in answer.body["data"]]
    return sorted(rows, key=lambda r: (-r["start"], r["key_name"], r["endpoint"])), None


CSV_FIELDS = ("start_utc", "granularity", "key_id", "key_name", "endpoint", "requests", "prompt_tokens",
              "completion_tokens", "total_tokens")


def usage_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_FIELDS)
    for r in rows:
        cells = [utc(r["start"])] + [r[f] for f in CSV_FIELDS[1:]]
        # a cell starting with = + - @ is a formula to a spreadsheet: key names are user text
        writer.writerow(["'" + c if isinstance(c, str) and c[:1] in "=+-@" else c for c in cells])
    return out.getvalue()


def utc(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) + " UTC" if ts else "–"


async def models(app, who: AdminToken) -> tuple[list[dict], str | None]:
    if not internal.has_route(app, MODELS_API):
        return [], ("The model store API (list, pull, delete) is not on this server; "
                    "`modelyard models` and `modelyard pull` manage the store from a shell.")
    got = await internal.list_all(app, who, MODELS_API)
    if isinstance(got, internal.Answer):
        return [], f"the models API answered {got.status}: {got.message()}"
    return got, None
