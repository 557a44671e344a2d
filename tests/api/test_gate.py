"""api/middleware/credentials: every route of the app's own OpenAPI document (so a route is covered the day it is
added) is checked before its body is read, except the open probes; and the gate runs exactly the
checks the route declares. No server: the app is built in process and asked, route by route."""

from __future__ import annotations

import re
from pathlib import Path

from modelyard.api import probes
from modelyard.api.admin import auth as admin_auth
from modelyard.api.app import create_app
from modelyard.api.auth import require_key
from modelyard.api.middleware.credentials import CredentialGate, GatedRoutes
from modelyard.settings import AdminToken, EndpointSpec, Settings

OPEN = {("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")}


def _app(tmp_path: Path):
    settings = Settings(api_keys=("sk-gate",), admin_tokens=(AdminToken("ops", "adm-gate"),), store_dir=tmp_path,
                        endpoints=(EndpointSpec(name="remote", engine="openai", urls=("http://127.0.0.1:9/v1",)),))
    return create_app(settings)


def _gated(app) -> GatedRoutes:
    [gate] = [m for m in app.user_middleware if m.cls is CredentialGate]
    return gate.kwargs["routes"]


def test_every_route_but_the_probes_is_checked_before_its_body(tmp_path):
    app = _app(tmp_path)
    gated = _gated(app)
    seen = 0
    for path, ops in app.openapi()["paths"].items():
        for method in ops:
            method = method.upper()
            scope = {"type": "http", "method": method, "path": re.sub(r"\{[^}]+\}", "x", path),
                     "root_path": "", "headers": []}
            checks = gated.checks(scope)
            if (method, path) in OPEN:
                assert checks == (), (method, path)
                continue
            seen += 1
            if path.startswith("/api/v1/control/"):
                # the route's own role: a change needs admin, a read a viewer or better (but a
                # customer's file: its bytes are the admin role's, api/admin/batches)
                read = method == "GET" and path != "/api/v1/control/files/{file_id}/content"
                assert checks == ((admin_auth.viewer,) if read else (admin_auth.admin,)), (method, path)
            elif path.startswith("/api/v1/endpoints"):
                # an admin token (the operator's view) or else an inference key
                assert checks == (probes.key_or_admin,), (method, path)
            else:
                assert checks == (require_key,), (method, path)
    assert seen >= 25, seen


def test_an_unknown_path_or_method_has_no_checks(tmp_path):
    gated = _gated(_app(tmp_path))
    for method, path in (("GET", "/nope"), ("PUT", "/v1/completions"), ("PATCH", "/api/v1/control/api-keys")):
        assert gated.checks({"type": "http", "method": method, "path": path, "root_path": "", "headers": []}) == ()
