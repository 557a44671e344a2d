"""create_app(settings): the FastAPI application; its lifespan starts and stops the endpoints."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from ..control.records import server_secret
from ..control.responses import Responses
from ..metrics import Metrics
from ..quota.keys import KeyChecker
from ..registry.registry import Registry
from ..settings import Settings
from . import errors, probes
from .anthropic import messages as anthropic_messages
from .admin import audit, auth as admin_auth, endpoints as admin_endpoints, keys, models as admin_models, usage
from .admin import batches as admin_batches, responses as admin_responses
from .openai.background import BackgroundRuns
from .openai import (batches, chat, completions, conversations, embeddings, files, models, passthrough, responses,
                     tokenizer)
from ..batch.runner import BatchRunner
from .middleware.body_limits import BodyLimits
from .middleware.browser_guard import BrowserGuard, allowed_origin_keys
from .middleware.credentials import CredentialGate, GatedRoutes
from .middleware.disconnect import CancelOnDisconnect
from .middleware.ledger import CloseLedger
from .middleware.request_log import RequestLog
from .auth import require_key

OPENAI_PREFIX = "/api/v1/compatibility/openai/v1"
ANTHROPIC_PREFIX = "/api/v1/compatibility/anthropic/v1"
KEY_ID_SECRET = "config_key_ids"      # control/records.server_secret: the configured keys' ids


def create_app(settings: Settings, registry: Registry | None = None) -> FastAPI:
    allowed_origin_keys(settings.allowed_origins)      # a bad origin is a ConfigError now
    registry = registry or Registry(settings)
    registry.check_budget()         # a model that could never fit the memory budget: ConfigError now

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sync = usage = book = db = None
        if settings.control_enabled:
            from ..control.db import open_database
            from ..control.endpoints import EndpointStore
            from ..control.keys import KeyStore
            from ..control.notify import ChangeFeed
            from ..control.sync import ControlSync, EndpointSync
            from ..control.usage import UsageRecorder, rename_keys
            db = await asyncio.to_thread(open_database, settings.database)
            from ..control.admin_tokens import AdminTokenStore, StoredAdmins
            app.state.key_store, app.state.admin_tokens = KeyStore(db), StoredAdmins(AdminTokenStore(db))
            app.state.endpoint_store = EndpointStore(db)
            endpoints = EndpointSync(app.state.endpoint_store, registry)
            app.state.control_sync = sync = ControlSync(
                app.state.key_store, app.state.keys, feed=ChangeFeed(db, settings.database_url),
                also=(lambda: asyncio.to_thread(app.state.admin_tokens.refresh), endpoints.refresh),
                fail_closed_after=settings.control_fail_closed_after)
            app.state.keys.sync = app.state.metrics.control_sync = sync
            app.state.usage = usage = UsageRecorder(db, settings.usage_flush_interval)
            # configured keys' ids under the database's secret (quota/keys), before any request
            # records usage; rows under their old ids (the start of the key's sha256) move over
            renamed = app.state.keys.name_configured(await asyncio.to_thread(server_secret, db, KEY_ID_SECRET))
            await asyncio.to_thread(rename_keys, db, renamed)
            if settings.quota_backend != "redis":     # Redis keeps budgets itself (quota/redis)
                from ..control.budget import BudgetBook
                app.state.keys.book = book = BudgetBook(db, usage)
            await sync.start()        # stored endpoints join the registry before it starts loading
            await usage.start()
            if book is not None:
                await book.start()
        # stored responses: the control plane's database when it is on, else settings.database,
        # opened on the first /responses request (control/responses says why)
        def name_keys(opened) -> None:        # a control plane named them already (above)
            app.state.keys.name_configured(server_secret(opened, KEY_ID_SECRET))
        app.state.responses = Responses(settings.database, settings.responses_retention_days, db, name_keys)
        app.state.background = BackgroundRuns(app.state.responses)
        # Files and batches (batch/runner): in the same database, opened with it. A gateway
        # whose database exists (or is shared: a control plane, PostgreSQL) starts its runner
        # now, so batches in progress resume after a restart; else on the first /files or
        # /batches request (control/responses says why a database is not made unasked).
        app.state.batches = BatchRunner(app, app.state.responses, settings)
        if db is not None or settings.database.startswith(("postgresql://", "postgres://")) or \
                Path(settings.database.removeprefix("sqlite:///")).expanduser().exists():
            await app.state.batches.store()
        await app.state.keys.backend.prepare()      # postgres: its table
        registry.start()
        try:
            yield
        finally:
            app.state.shutting_down = True
            await app.state.batches.stop()      # its lines released for another gateway
            registry.drain()
            await registry.stop()
            await app.state.background.stop()
            await app.state.responses.close()
            if sync is not None:
                await sync.stop()
                if book is not None:
                    await book.stop()
                await usage.stop()          # the last flush, after the last request
                await asyncio.to_thread(app.state.key_store.db.close)
            # Redis: stops renewing leases (none are left); PG: its connection; every backend: the
            # settles and releases still under way
            await app.state.keys.backend.close()

    # The interactive docs and the OpenAPI document are a map of the API for whoever can reach
    # it, and /docs loads its page from a CDN: served on loopback only (README, "Configuration").
    docs = settings.loopback
    app = FastAPI(title="modelyard", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible model endpoints",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.settings = settings
    app.state.registry = registry
    shared = None
    if settings.quota_backend == "redis":
        from ..quota.redis import RedisQuotas
        shared = RedisQuotas(settings.redis_url, settings.quota_processes)
    elif settings.quota_backend == "postgres":
        from ..quota.postgres import PostgresQuotas
        shared = PostgresQuotas(settings.database_url, settings.quota_processes)
    app.state.keys = KeyChecker(settings.all_keys, control=settings.control_enabled, shared=shared)
    app.state.started = int(time.time())
    app.state.stream_slots = admin_auth.StreamSlots(settings.max_streams_per_token)
    app.state.shutting_down = False
    errors.install(app)
    # Outermost last: RequestLog sees every answer, BrowserGuard refuses web pages before any
    # work, BodyLimits bounds every body and closes the connection after any answer that left
    # one unread, CredentialGate refuses a caller without credentials before its body is read
    # (inside CloseLedger, which closes the request's ledger its key check opens), CancelOnDisconnect
    # watches the whole request.
    app.add_middleware(CancelOnDisconnect)
    gated = GatedRoutes()       # filled by include() below, before the first request
    app.add_middleware(CredentialGate, routes=gated)
    # the Files API's upload alone takes a file's size ([server] max_file_bytes), multipart
    upload = (files.upload_limit(settings.max_file_bytes), "[server] max_file_bytes")
    app.add_middleware(BodyLimits, max_bytes=settings.limits.max_body_bytes,
                       uploads={OPENAI_PREFIX + "/files": upload, "/v1/files": upload})
    app.add_middleware(CloseLedger)      # outside CancelOnDisconnect: runs once the app's task has ended
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BrowserGuard, settings=settings, keyless=not (settings.all_keys or settings.control_enabled))
    app.add_middleware(RequestLog)

    def include(router: APIRouter, prefix: str = "", dependencies: tuple = (), **kwargs) -> None:
        # One statement of what a route needs: its Depends, which CredentialGate reads too.
        app.include_router(router, prefix=prefix, dependencies=list(dependencies), **kwargs)
        gated.add(router, prefix, dependencies)

    auth = (Depends(require_key),)
    routes: list[str] = []      # every route template we serve: the only route labels of metrics
    for prefix, documented in ((OPENAI_PREFIX, True), ("/v1", False)):
        for router in (completions.router, chat.router, embeddings.router, models.router, responses.router,
                       conversations.router, files.router, batches.router, passthrough.router):
            include(router, prefix, auth, include_in_schema=documented)
            routes += [prefix + r.path for r in router.routes]
    # Anthropic's client appends /v1/messages to its base URL: the server's root, or this prefix
    for prefix, documented in ((ANTHROPIC_PREFIX, True), ("/v1", False)):
        include(anthropic_messages.router, prefix, auth, include_in_schema=documented)
        routes += [prefix + r.path for r in anthropic_messages.router.routes]
    include(probes.admin, "/api/v1", (Depends(probes.key_or_admin),))
    include(probes.probes)
    include(tokenizer.router, "", auth)     # vLLM's place for them: the root
    if settings.control_enabled:    # admin tokens, not inference keys (api/admin/auth)
        for router in (keys.router, audit.router, usage.router, admin_endpoints.router, admin_models.router,
                       admin_responses.router, admin_batches.router):
            include(router, "/api/v1/control")
            routes += ["/api/v1/control" + r.path for r in router.routes]
        from ..console import mount       # the web console at /console (console/)
        mount(app)
    routes += ["/api/v1" + r.path for r in probes.admin.routes] + [r.path for r in probes.probes.routes]
    routes += [r.path for r in tokenizer.router.routes]
    app.state.metrics = Metrics(registry, routes)
    app.state.metrics.quotas = shared
    return app
