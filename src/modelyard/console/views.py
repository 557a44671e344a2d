"""What the pages show, read from server state at every render (never cached in the browser).

Everything through the admin API, in process (console/internal): the console is mounted only
with the control plane's routers, so the endpoints and models APIs are always there. Endpoints:
the run-time endpoints API's objects (should it fail, the registry's endpoints rendered by the same
function, registry/render, under a notice), joined with the sampler's tokens/s and TTFT. Keys and usage: the
keys API and the usage rollups (never request logs). Models: the store's API.
"""

from __future__ import annotations

import csv
import io
import time

from ..registry.render import endpoint_object
from ..settings import AdminToken
from . import internal

ENDPOINTS_API = "/model-endpoints"
MODELS_API = "/models"


async def endpoints(app, who: AdminToken) -> tuple[list[dict], str | None]:
    """(rows, a notice when the run-time endpoints API failed: then the registry's own)."""
    notice = None
    got = await internal.list_all(app, who, ENDPOINTS_API)
    if isinstance(got, internal.Answer):
        notice = f"the endpoints API answered {got.status}: {got.message()}"
        objects = [endpoint_object(ep) for ep in app.state.registry.endpoints.values()]
    else:
        objects = got
    sampler = app.state.console.sampler
    rows = []
    for obj in sorted(objects, key=lambda o: o.get("name", "")):
        rows.append({**obj, **sampler.summary(obj.get("name", ""))})
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
    # every page, up to list_all's bound (5,000 buckets): the page shows a bounded table
    buckets = await internal.list_all(app, who, "/usage", query={"granularity": granularity, "start": start})
    if isinstance(buckets, internal.Answer):
        return [], buckets.message()
    names = {}
    got = await internal.list_all(app, who, "/api-keys")
    if not isinstance(got, internal.Answer):
        names = {k["id"]: k["name"] for k in got}
    rows = [{**b, "key_name": names.get(b["key_id"], "")} for b in buckets]
    return sorted(rows, key=lambda r: (-r["start"], r["key_name"], r["endpoint"])), None


CSV_FIELDS = ("start_utc", "granularity", "key_id", "key_name", "endpoint", "requests", "prompt_tokens",
              "completion_tokens", "total_tokens")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")     # OWASP's list for CSV injection


def usage_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_FIELDS)
    for r in rows:
        cells = [utc(r["start"])] + [r[f] for f in CSV_FIELDS[1:]]
        # a cell starting with = + - @ (or a tab or carriage return, which spreadsheets skip
        # before reading one of those) is a formula to a spreadsheet: key names are user text
        writer.writerow(["'" + c if isinstance(c, str) and c[:1] in FORMULA_STARTS else c for c in cells])
    return out.getvalue()


def utc(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) + " UTC" if ts else "–"


async def models(app, who: AdminToken) -> tuple[list[dict], str | None]:
    got = await internal.list_all(app, who, MODELS_API)
    if isinstance(got, internal.Answer):
        return [], f"the models API answered {got.status}: {got.message()}"
    return got, None


BATCHES_API = "/batches"        # the control plane's every-key listing (OpenAI's batch objects + owner)
BATCH_ENDED = ("completed", "failed", "expired", "cancelled")


async def batches(app, who: AdminToken) -> tuple[list[dict], str | None]:
    """Every key's batches, newest first, each with its progress (lines done of total, percent)."""
    got = await internal.list_all(app, who, BATCHES_API)
    if isinstance(got, internal.Answer):
        return [], f"the batches API answered {got.status}: {got.message()}"
    for b in got:
        c = b.get("request_counts") or {}
        total, done = c.get("total") or 0, (c.get("completed") or 0) + (c.get("failed") or 0)
        b["progress"] = {"done": done, "total": total, "percent": done * 100 // total if total else 0}
        b["ended"] = b.get("status") in BATCH_ENDED
    return sorted(got, key=lambda b: -(b.get("created_at") or 0)), None
