"""/metrics stays bounded whatever clients send: its labels come only from the app's routes and
the configured endpoint names (the session's real server, tests/conftest.py)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.model

MODEL = "smollm2-135m"


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.base + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def hostile_requests(server, client: httpx.Client, n: int) -> int:
    """n rounds of 404s on made-up paths, models and endpoint names; how many requests were counted
    (those under /api/ and /v1/)."""
    for _ in range(n):
        junk = uuid.uuid4().hex
        assert client.get(f"{server.base}/api/v1/{junk}").status_code == 404
        assert client.get(f"{server.base}/v1/{junk}/x").status_code == 404
        r = client.post("/completions", json={"model": f"no-such-{junk}", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 404
        assert client.get(f"{server.base}/api/v1/endpoints/{junk}").status_code == 404
    return 4 * n


def requests_404(samples: dict) -> float:
    return sum(v for (name, labels), v in samples.items()
               if name == "modelyard_requests_total" and dict(labels).get("status") == "404")


def counted(server, at_least: float) -> dict:
    """The metrics once `at_least` 404s are counted (each lands a moment after its response)."""
    for _ in range(100):        # bounded: 10 s at most
        samples = scrape(server)
        if requests_404(samples) >= at_least:
            return samples
        time.sleep(0.1)
    raise AssertionError(f"only {requests_404(samples)} of {at_least} 404s counted")


def test_unknown_paths_and_models_do_not_grow_the_metrics(server, client):
    before = requests_404(scrape(server))
    first = counted(server, before + hostile_requests(server, client, 3))
    labels = {v for _, lab in first for k, v in lab if k in ("route", "endpoint")}
    assert {"other", "unknown", "/api/v1/endpoints/{name}"} <= labels, sorted(labels)
    after = counted(server, requests_404(first) + hostile_requests(server, client, 20))
    assert set(after) == set(first), sorted(set(after) ^ set(first))[:10]
    for name, lab in after:
        for _, value in lab:
            assert "no-such-" not in value and len(value) < 64, (name, lab)


def test_known_routes_and_endpoints_are_their_own_labels(server, client):
    assert client.post("/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}).status_code == 200
    for _ in range(50):
        found = {lab for name, lab in scrape(server) if name == "modelyard_requests_total"}
        want = (("endpoint", MODEL), ("route", "/api/v1/compatibility/openai/v1/completions"), ("status", "200"))
        if want in found:
            break
        time.sleep(0.1)
    assert want in found, found
