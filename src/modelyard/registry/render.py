"""What the outside sees of an endpoint: the one place an Endpoint becomes JSON.

Two views, one exit:

- `endpoint_object`: the platform's `model_endpoint` (the admin API's get/list, its SSE
  snapshots, the console's Endpoints table, for configured and run-time endpoints alike);
- `status`: the data plane's `/api/v1/endpoints` (state and engine counters).

Both leave through `_shown`, which masks URL credentials in every string in them: a reason is
free text (an upstream's error, a replica's URL), so no field is trusted to be clean. Cache
counters (CACHE_COUNTERS) say whether someone's prompt was cached; they are in `status` only
when the caller may see every tenant's traffic (api/auth.may_see_cache).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..redact import mask_url_credentials
from ..settings import EndpointSpec, spec_fields
from .endpoint import ENGINE_NAMES, Endpoint, EndpointState
from .lifecycle import mib

# Engine status fields that move when a prompt shares a prefix with one cached earlier: a
# tenant who sends a guessed prompt and reads them learns whether another tenant sent it.
CACHE_COUNTERS = frozenset({
    "cached_tokens", "prefix_reused_tokens", "host_cache_entries", "host_cache_bytes",
    "host_cache_hits", "host_cache_hit_tokens", "host_cache_evictions"})
# The same, of each of a remote endpoint's replicas: routing's prefix-hit estimates.
REPLICA_CACHE_COUNTERS = frozenset({"prefix_hit_blocks", "prefix_hit_chars"})


# What the admin API and the console show of each replica (proxy/replicas.Replica.as_dict)
REPLICA_FIELDS = ("index", "healthy", "load", "in_flight", "requests", "overload_spills", "dropped")


class Wanted(Protocol):
    """What an admin asked for (control/endpoints.StoredEndpoint): the stored row."""
    id: str
    spec: EndpointSpec
    desired: str
    created_at: int
    updated_at: int
    revision: int


def shown_spec(spec: EndpointSpec) -> dict[str, Any]:
    """A spec as the API and the audit log show it: URL credentials masked, no api_key."""
    fields = spec_fields(spec)
    fields["api_key_set"] = fields.pop("api_key") is not None
    del fields["name"]
    return _shown(fields)


def endpoint_object(ep: Endpoint | None, wanted: Wanted | None = None, *, state: EndpointState | None = None,
                    reason: str | None = None, started: int = 0) -> dict[str, Any]:
    """The `model_endpoint` object. `wanted` (stored endpoints) says what is wanted, `ep` (this
    process's registry) what is; `state`/`reason` override the endpoint's (an event's moment)."""
    assert ep is not None or wanted is not None
    spec = wanted.spec if wanted is not None else ep.spec
    status = ep.engine.status() if ep is not None and ep.engine is not None else {}
    replicas = None
    if spec.engine == "openai":
        listed = status.get("replicas")
        replicas = ({"healthy": sum(1 for r in listed if r.get("healthy")), "total": len(listed),
                     # each replica by its index in config.urls: its load and what routing sent it
                     "each": [{k: r[k] for k in REPLICA_FIELDS} for r in listed], "balance": status.get("balance")}
                    if listed is not None else {"healthy": 0, "total": len(spec.urls)})
    if ep is None:      # stored, not applied in this process yet (within the sync bound)
        state_value, why = ("unloaded" if wanted.desired == "unloaded" else "loading"), "not applied in this process yet"
    else:
        state_value = (state or ep.state).value
        why = reason if state is not None else (ep.not_ready_reason() if ep.state is EndpointState.READY else ep.reason)
    progress = {"completed": ep.progress[0], "total": ep.progress[1]} if ep is not None and ep.progress else None
    model_type = ep.model_type.value.lower() if ep is not None and ep.model_type else spec.kind
    # the latest failure worth showing: a failed state's reason, else a replica's last error
    last_error = why if state_value == "failed" and why else next(
        (f"{r['url']}: {r['last_error']}" for r in status.get("replicas") or ()
         if r.get("last_error") and r["last_error"] != "not probed yet"), None)
    return _shown({
        "id": wanted.id if wanted is not None else ep.id, "object": "model_endpoint", "name": spec.name,
        "source": "api" if wanted is not None else ep.source, "engine": spec.engine,
        "model_engine": ENGINE_NAMES[spec.engine],
        "kind": model_type, "model": spec.model if spec.engine == "llamacpp" else spec.upstream_model,
        "config": shown_spec(spec), "desired": wanted.desired if wanted is not None else ep.desired,
        "state": state_value, "reason": why, "last_error": last_error, "progress": progress, "replicas": replicas,
        # whether requests are served now: a ready remote endpoint with no healthy replica is not
        "serving": ep is not None and (((state or ep.state) is EndpointState.READY and ep.not_ready_reason() is None)
                                       or (state is None and ep.serving_reason() is None)),
        "in_flight": int(status.get("in_flight", 0)), "queued": int(status.get("queue_depth", 0)),
        "created_at": wanted.created_at if wanted is not None else (ep.created_at or started),
        "updated_at": wanted.updated_at if wanted is not None else (ep.updated_at or started),
        "revision": wanted.revision if wanted is not None else ep.revision,
        **(lifecycle(ep) if ep is not None else {"loaded": False})})


def lifecycle(ep: Endpoint) -> dict[str, Any]:
    """Ollama's `/api/ps` in modelyard's shape: whether its model is loaded, what it holds
    (MiB: what llama.cpp allocated) and needs (the GGUF's estimate), when it unloads if still
    idle and when it was last used (unix seconds; null: never / not yet)."""
    return {"load": ep.spec.load, "keep_alive": ep.spec.keep_alive, "loaded": ep.loaded,
            "resident_mib": mib(ep.resident), "need_mib": mib(ep.need),
            "expires_at": _seconds(ep.expires_at), "last_used": _seconds(ep.last_used),
            "pending": ep.pending}


def _seconds(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


def status(ep: Endpoint, detail: bool = False, cache: bool = False) -> dict[str, Any]:
    """State and counters; with `detail` (trusted callers) also the reason, the model ref, its
    file and the replicas; with `cache` the cache counters (see CACHE_COUNTERS)."""
    engine = ep.engine.status() if ep.engine is not None and ep.state is EndpointState.READY else {}
    if not detail:     # counters only: replica lists name upstream hosts
        engine = {k: v for k, v in engine.items() if isinstance(v, (int, float, bool))}
    if not cache:
        engine = {k: v for k, v in engine.items() if k not in CACHE_COUNTERS}
        if "replicas" in engine:
            engine["replicas"] = [{k: v for k, v in r.items() if k not in REPLICA_CACHE_COUNTERS}
                                  for r in engine["replicas"]]
    out = {"name": ep.name, "state": ep.state.value, "ready": ep.serving_reason() is None,
           "engine": ep.spec.engine, "model_type": ep.model_type.value if ep.model_type else None,
           "model_engine": ep.model_engine, **lifecycle(ep), **engine}
    if detail:
        model = ep.spec.model if ep.spec.engine == "llamacpp" else ep.spec.upstream_model
        out.update(reason=ep.not_ready_reason(), model=model, model_path=ep.model_path)
    return _shown(out)


def _shown(value):
    """`value` (JSON-like) with URL credentials masked in every string in it, keys included."""
    if isinstance(value, str):
        return mask_url_credentials(value)
    if isinstance(value, dict):
        return {_shown(k): _shown(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    return value
