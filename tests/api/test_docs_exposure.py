"""FastAPI's /docs, /redoc and /openapi.json: served on loopback only (README, "Configuration").
In process, without the lifespan: no model is loaded."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from modelyard.api.app import create_app
from modelyard.settings import EndpointSpec, Settings

DOCS = ("/docs", "/redoc", "/openapi.json")


def app_on(host: str):
    return create_app(Settings(host=host, api_keys=("k",), endpoints=(EndpointSpec(name="x"),)))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "gateway.internal"])
def test_not_served_beyond_loopback(host):
    client = TestClient(app_on(host))
    for path in DOCS:
        r = client.get(path)
        assert r.status_code == 404, (host, path, r.status_code)
        assert r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_served_on_loopback(host):
    client = TestClient(app_on(host))
    for path in DOCS:
        assert client.get(path).status_code == 200, (host, path)
    assert "/api/v1/compatibility/openai/v1/completions" in client.get("/openapi.json").json()["paths"]
