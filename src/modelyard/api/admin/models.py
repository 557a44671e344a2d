"""The store's models in the admin API (/api/v1/control/models): list, get, pull with streamed
progress, delete (409 while an endpoint uses the model). Same auth as api/admin/auth: a viewer
reads, an admin changes, an inference key is refused.

A pull streams NDJSON in the shape of Ollama's `POST /api/pull`
(https://github.com/ollama/ollama/blob/main/docs/api.md#pull-a-model, docs.ollama.com/api/pull):
    {"status": "pulling manifest"}
    {"status": "downloading <what>", "digest": "sha256:<hex>", "total": N, "completed": M}  (repeated)
    {"status": "verifying sha256 digest"}
    {"status": "success"}
and a failure after the first line is one {"error": "..."} line, as Ollama's is; `"stream": false`
answers one object at the end. Errors found before the stream starts (a bad or unknown ref) are
plain HTTP errors. The pull runs on a worker thread; the store lets one pull of a name run at a
time (a second one waits, then finds the first one's result).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ...control.records import audit
from ...errors import Conflict, ModelyardError, ObjectNotFound, StoreError
from ...redact import mask_url_credentials
from ...settings import AdminToken
from ...store import HF_PREFIX, KNOWN, ModelStore, PullProgress, StoredModel
from .auth import Limit, actor, admin, viewer

router = APIRouter()


def _store(request: Request) -> ModelStore:
    return request.app.state.registry.store


def _used_by(request: Request, model: StoredModel) -> list[str]:
    """Embedded endpoints whose model is this one (by ref, store name or file)."""
    store, names = _store(request), []
    for name, ep in list(request.app.state.registry.endpoints.items()):
        if ep.spec.engine != "llamacpp":
            continue
        try:
            stored_as = store.name_of(ep.spec.model)
        except StoreError:
            continue
        if stored_as == model.name or (stored_as is None and _same_file(ep.spec.model, model.path)):
            names.append(name)
    return sorted(names)


def _same_file(ref: str, path: Path) -> bool:
    try:
        return Path(ref).expanduser().resolve() == path.resolve()
    except OSError:
        return False


def _model_type(model: StoredModel) -> str | None:
    known = KNOWN.get(model.name)
    if known is not None:
        return known.model_type.value
    from ...local.gguf_header import model_type
    try:
        return model_type(model.path).value
    except Exception:  # noqa: BLE001 - a header we cannot read: the type is unknown, the entry still listed
        return None


def _public(request: Request, model: StoredModel) -> dict:
    return {"id": model.name, "object": "stored_model", "size": model.size, "sha256": model.sha256,
            "model_type": _model_type(model), "created_at": model.created_at, "used_by": _used_by(request, model)}


def _stored(request: Request, ref: str) -> StoredModel:
    store = _store(request)
    try:
        name = store.name_of(ref)
    except StoreError:
        name = None
    found = store.entry(name) if name else None
    if found is None:
        raise ObjectNotFound(f"no model {ref!r} in the store", param="ref", code="model_not_found")
    return found


def _audit(request: Request, who: AdminToken, action: str, object_id: str) -> None:
    db = request.app.state.key_store.db
    with db.transaction():
        audit(db, actor(who), action, object_id, {})


@router.get("/models", summary="The models in the store, by id, with the endpoints that use each")
async def list_models(request: Request, limit: Limit = 20, after: str | None = None,
                      _: AdminToken = Depends(viewer)) -> dict:
    models = [m for m in await asyncio.to_thread(_store(request).list) if m.name > (after or "")]
    data = [await asyncio.to_thread(_public, request, m) for m in models[:limit]]
    return {"object": "list", "data": data, "has_more": len(models) > limit,
            "last_id": data[-1]["id"] if data else None}


@router.get("/models/{ref:path}", summary="One stored model (a known name, a store name or an hf:// ref)")
async def get_model(ref: str, request: Request, _: AdminToken = Depends(viewer)) -> dict:
    return await asyncio.to_thread(lambda: _public(request, _stored(request, ref)))


@router.delete("/models/{ref:path}", summary="Remove a model from the store (409 while an endpoint uses it)")
async def delete_model(ref: str, request: Request, who: AdminToken = Depends(admin)) -> dict:
    model = await asyncio.to_thread(_stored, request, ref)
    users = _used_by(request, model)
    if users:
        raise Conflict(f"model {model.name!r} is used by model endpoint(s) {', '.join(users)}: delete or change "
                       "them first", param="ref", code="model_in_use")
    await asyncio.to_thread(_store(request).delete, model.name)
    await asyncio.to_thread(_audit, request, who, "model.delete", model.name)
    return {"id": model.name, "object": "stored_model.deleted", "deleted": True}


class Pull(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=1000)
    stream: bool = True


def _pull_name(store: ModelStore, ref: str) -> str:
    """The store name a pull of `ref` fills; 422 for a ref that cannot be pulled, 404 unknown."""
    def invalid(msg: str):
        return RequestValidationError([{"type": "value_error", "loc": ["body", "model"], "input": ref, "msg": msg}])
    try:
        name = store.name_of(ref)
    except StoreError as exc:
        raise invalid(str(exc)) from None
    if name is None:
        raise invalid("a path to a .gguf file is used in place, not pulled; pull a known model name "
                      f"({', '.join(KNOWN)}) or hf://org/repo/file.gguf")
    if not ref.startswith(HF_PREFIX) and ref not in KNOWN and store.entry(name) is None:
        raise ObjectNotFound(f"unknown model {ref!r}: pull one of {', '.join(KNOWN)} or hf://org/repo/file.gguf",
                             param="model", code="model_not_found")
    return name


def _line(step: PullProgress) -> dict:
    if step.stage == "verifying":
        return {"status": "verifying sha256 digest"}
    if step.stage == "converting":
        return {"status": f"converting {step.what} to GGUF"}
    line: dict = {"status": f"downloading {step.what}"}
    if step.digest:
        line["digest"] = f"sha256:{step.digest}"
    return {**line, "total": step.total, "completed": step.completed}


async def _pulled(store: ModelStore, ref: str, out: asyncio.Queue) -> None:
    """Runs the pull on a worker thread; its steps, then None (done) or the error, go to `out`."""
    loop = asyncio.get_running_loop()

    def listen(step: PullProgress) -> None:
        loop.call_soon_threadsafe(out.put_nowait, _line(step))
    try:
        await asyncio.to_thread(store.pull, ref, listen)
    except Exception as exc:  # noqa: BLE001 - a stream's failure is its last line
        await out.put(exc)
    else:
        await out.put(None)


async def _lines(store: ModelStore, ref: str, running: set[asyncio.Task]) -> AsyncIterator[bytes]:
    out: asyncio.Queue = asyncio.Queue()
    # A client that leaves does not stop the pull (a thread cannot be cancelled, and the file is
    # wanted): the task is kept in `running` until it ends, so it is not collected meanwhile.
    task = asyncio.create_task(_pulled(store, ref, out), name=f"pull-{ref}")
    running.add(task)
    task.add_done_callback(running.discard)
    yield b'{"status": "pulling manifest"}\n'
    while (item := await out.get()) is not None:
        if isinstance(item, Exception):
            message = str(item) if isinstance(item, ModelyardError) else f"{type(item).__name__}: {item}"
            yield (json.dumps({"error": mask_url_credentials(message)}) + "\n").encode()
            return
        yield (json.dumps(item) + "\n").encode()
    yield b'{"status": "success"}\n'


@router.post("/models/pull", summary="Fetch a model into the store; NDJSON progress in Ollama's shape")
async def pull_model(body: Pull, request: Request, who: AdminToken = Depends(admin)):
    store = _store(request)
    name = await asyncio.to_thread(_pull_name, store, body.model)
    await asyncio.to_thread(_audit, request, who, "model.pull", name)
    if not body.stream:
        await asyncio.to_thread(store.pull, body.model)
        return {"status": "success"}
    if not hasattr(request.app.state, "pulls"):
        request.app.state.pulls = set()
    return StreamingResponse(_lines(store, body.model, request.app.state.pulls), media_type="application/x-ndjson")
