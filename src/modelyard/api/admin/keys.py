"""The admin API's inference keys: /api/v1/control/api-keys (create with the secret in that
answer only, list, get with ETag, PATCH with If-Match, rotate with a grace period, revoke)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from ...settings import AdminToken
from .auth import Limit, actor, admin, revision_of, viewer, with_etag, write_through

router = APIRouter()


class KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=100)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    endpoints: list[str] | None = None
    expires_at: int | None = Field(None, ge=0)
    max_parallel: int | None = Field(None, ge=1)      # requests in flight at once
    budget_tokens: int | None = Field(None, ge=1)     # tokens per budget_period (UTC calendar)
    budget_period: Literal["day", "month"] | None = None


class KeyCreate(KeyFields):
    name: str = Field(min_length=1, max_length=100)


def _check_budget(budget_tokens: int | None, budget_period: str | None) -> None:
    """A budget needs its period (the key's as it will be once changed)."""
    if budget_tokens is not None and budget_period is None:
        raise RequestValidationError([{"type": "value_error", "loc": ["body", "budget_period"], "input": None,
                                       "msg": f"budget_tokens = {budget_tokens} needs budget_period "
                                              "('day' or 'month', UTC calendar)"}])


def _check_fields(request: Request, body: KeyFields) -> None:
    known = request.app.state.registry.endpoints
    for i, name in enumerate(body.endpoints or ()):
        if name not in known:
            raise RequestValidationError([{"type": "value_error", "loc": ["body", "endpoints", i], "input": name,
                                           "msg": f"unknown model endpoint {name!r}; this server serves: "
                                                  f"{', '.join(sorted(known))}"}])
    if body.expires_at is not None and body.expires_at <= time.time():
        raise RequestValidationError([{"type": "value_error", "loc": ["body", "expires_at"], "input": body.expires_at,
                                       "msg": "expires_at must be in the future (unix seconds)"}])














@router.post("/api-keys", status_code=201, summary="Create an API key (its secret is in this answer only)")
async def create_key(body: KeyCreate, request: Request, response: Response,
                     who: AdminToken = Depends(admin)) -> dict:
    _check_fields(request, body)
    _check_budget(body.budget_tokens, body.budget_period)
    store = request.app.state.key_store
    record, secret = await write_through(request, store.create, actor(who), name=body.name, rpm=body.rpm, tpm=body.tpm,
                                  endpoints=body.endpoints, expires_at=body.expires_at, max_parallel=body.max_parallel,
                                  budget_tokens=body.budget_tokens, budget_period=body.budget_period)
    return {**with_etag(record, response), "secret": secret}


@router.get("/api-keys", summary="API keys, oldest first")
async def list_keys(request: Request, limit: Limit = 20, after: str | None = None,
                    _: AdminToken = Depends(viewer)) -> dict:
    return await asyncio.to_thread(request.app.state.key_store.list, limit, after)


@router.get("/api-keys/{key_id}", summary="One API key")
async def get_key(key_id: str, request: Request, response: Response, _: AdminToken = Depends(viewer)) -> dict:
    return with_etag(await asyncio.to_thread(request.app.state.key_store.get, key_id), response)


@router.patch("/api-keys/{key_id}", summary="Change a key's name or limits (null resets a limit)")
async def patch_key(key_id: str, body: KeyFields, request: Request, response: Response,
                    if_match: Annotated[str | None, Header()] = None, who: AdminToken = Depends(admin)) -> dict:
    _check_fields(request, body)
    changes = {k: getattr(body, k) for k in body.model_fields_set}
    if changes.get("name", "") is None:
        raise RequestValidationError([{"type": "value_error", "loc": ["body", "name"], "input": None,
                                       "msg": "a key's name cannot be reset"}])
    if {"budget_tokens", "budget_period"} & set(changes):
        current = await asyncio.to_thread(request.app.state.key_store.get, key_id)
        merged = {**current, **changes}
        _check_budget(merged["budget_tokens"], merged["budget_period"])
    record = await write_through(request, request.app.state.key_store.patch, actor(who), key_id, changes, revision_of(if_match))
    return with_etag(record, response)


class Rotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_seconds: int = Field(3600, ge=0, le=30 * 86400)   # how long the old secret keeps working


@router.post("/api-keys/{key_id}/rotate", summary="A new secret for a key; the old one works for grace_seconds")
async def rotate_key(key_id: str, request: Request, response: Response, body: Rotate | None = None,
                     who: AdminToken = Depends(admin)) -> dict:
    grace = (body or Rotate()).grace_seconds
    record, secret = await write_through(request, request.app.state.key_store.rotate, actor(who), key_id, grace)
    return {**with_etag(record, response), "secret": secret}


@router.post("/api-keys/{key_id}/revoke", summary="Revoke a key (final; every process refuses it within 2 s)")
async def revoke_key(key_id: str, request: Request, response: Response, who: AdminToken = Depends(admin)) -> dict:
    return with_etag(await write_through(request, request.app.state.key_store.revoke, actor(who), key_id), response)
