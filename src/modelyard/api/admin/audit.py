"""The admin API's audit log: every admin action, who, what and when (ids, never secrets)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from ...settings import AdminToken
from .auth import Limit, viewer

router = APIRouter()


@router.get("/audit-log", summary="Every admin action: who, what, when (ids, never secrets)")
async def audit_log(request: Request, limit: Limit = 20, after: str | None = None,
                    _: AdminToken = Depends(viewer)) -> dict:
    return await asyncio.to_thread(request.app.state.key_store.audit, limit, after)
