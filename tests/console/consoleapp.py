"""Helpers for the console's in-process tests: an app with the control plane on (a SQLite file),
two admin tokens and a remote endpoint whose replica is down (nothing to load); signing in."""

from __future__ import annotations

import re
from fastapi.testclient import TestClient

from modelyard.settings import AdminToken, EndpointSpec, Settings

ADMIN, VIEWER = "console-admin-token", "console-viewer-token"
BASE = "http://127.0.0.1:8000"


def make_settings(tmp_path) -> Settings:
    return Settings(store_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'control.db'}",
                    admin_tokens=(AdminToken("ops", ADMIN), AdminToken("audit", VIEWER, role="viewer")),
                    endpoints=(EndpointSpec(name="remote", engine="openai", urls=("http://127.0.0.1:9/v1",),
                                            upstream_model="m"),))


def login(client: TestClient, token: str) -> str:
    """Signs in; returns the page's CSRF token."""
    r = client.post("/console/login", json={"token": token})
    assert r.status_code == 204, r.text
    page = client.get("/console/endpoints")
    assert page.status_code == 200
    found = re.search(r'hx-headers=\'\{&#34;X-CSRF-Token&#34;: &#34;([^&]+)&#34;\}\'', page.text)
    assert found, page.text[:2000]
    return found.group(1)
