"""Every route of the admin API, found in the server's own OpenAPI document (so a new route is
covered the day it is added): no token 401, an inference key 403, a viewer 403 on anything
that changes state; the admin token gets past auth (whatever the route then says)."""

from __future__ import annotations

import re

import httpx
import pytest

from testkit.servers import served
from test_admin_api import ADMIN, INFER, VIEWER, config

pytestmark = pytest.mark.model


def test_every_admin_route_checks_its_caller(tmp_path):
    with served(tmp_path, config(f"sqlite:///{tmp_path / 'control.db'}"), key=INFER) as srv:
        spec = httpx.get(srv.base + "/openapi.json").json()
        routes = [(method.upper(), path) for path, ops in spec["paths"].items() if path.startswith("/api/v1/control")
                  for method in ops]
        assert len(routes) >= 12, routes
        for method, path in routes:
            url = srv.base + re.sub(r"\{[^}]+\}", "nope", path)

            def call(token):
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                with httpx.Client(timeout=30) as c:
                    with c.stream(method, url, headers=headers, json={} if method != "GET" else None) as r:
                        return r.status_code
            assert call(None) == 401, (method, path)
            assert call(INFER) == 403, (method, path)
            if method != "GET":
                assert call(VIEWER) == 403, (method, path)
            assert call(ADMIN) not in (401, 403), (method, path)
