"""The prefix cache's counters are a side channel where the cache is shared by several keys
(`prefix_cache_scope = "shared"`; a `cache_salt` used by two clients): a tenant who sends a
guessed prompt and watches `prefix_reused_tokens` (or the host cache's hits) learns whether
another tenant sent it. Over real HTTP on real `modelyard serve` processes with two keys: an
inference key's view of an endpoint has none of those counters, the open /metrics has no
prefix-cache series, an admin token sees both, and `[server] public_cache_counters = true` (one
tenant) shows them to keys and scrapers again."""

from __future__ import annotations

import httpx
import pytest

from modelyard.registry.render import CACHE_COUNTERS
from testkit.servers import MODEL, bearer, served

pytestmark = pytest.mark.model

KEY_A, KEY_B, ADMIN, VIEWER = "tenant-a-key", "tenant-b-key", "cache-admin-token", "cache-viewer-token"
ENDPOINT = f'[[endpoints]]\nname = "{MODEL}"\nmodel = "{MODEL}"\ncontext = 256\nparallel = 1\nthreads = 1\n'
# Tenant A's prompt, long enough that its reuse is unmistakable (far more than the 2 tokens
# always computed).
SECRET_PROMPT = "Tenant A's confidential memo: the merger with Initech closes on the third of March " * 2
CACHE_SERIES = "modelyard_prefix_cache_host"


def keys_config(extra: str = "") -> str:
    return f'[server]\napi_keys = ["{KEY_A}", "{KEY_B}"]\n{extra}\n{ENDPOINT}'


def control_config(database_url: str) -> str:
    return (f'[server]\napi_keys = ["{KEY_A}", "{KEY_B}"]\ndatabase_url = "{database_url}"\n\n'
            f'[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[admin_tokens]]\nname = "audit"\nrole = "viewer"\ntoken = "{VIEWER}"\n\n{ENDPOINT}')


def view(srv, token: str | None) -> dict:
    """The endpoint as `token` sees it, one and listed (the two must agree)."""
    one = httpx.get(f"{srv.base}/api/v1/endpoints/{MODEL}", headers=bearer(token), timeout=10)
    assert one.status_code == 200, one.text
    listed = httpx.get(f"{srv.base}/api/v1/endpoints", headers=bearer(token), timeout=10).json()["endpoints"]
    assert {k for e in listed if e["name"] == MODEL for k in e} == set(one.json())
    return one.json()


def send(srv, key: str) -> None:
    r = httpx.post(f"{srv.api}/completions", headers=bearer(key), timeout=120,
                   json={"model": MODEL, "prompt": SECRET_PROMPT, "max_tokens": 1})
    assert r.status_code == 200, r.text


def metrics(srv, token: str | None) -> str:
    r = httpx.get(f"{srv.base}/metrics", headers=bearer(token), timeout=10)
    assert r.status_code == 200
    return r.text


def test_only_admin_tokens_see_the_cache_counters_when_the_control_plane_is_on(tmp_path):
    with served(tmp_path, control_config(f"sqlite:///{tmp_path / 'control.db'}"), key=KEY_A) as srv:
        send(srv, KEY_A)
        before = view(srv, ADMIN)
        assert CACHE_COUNTERS <= set(before), before
        b_before = view(srv, KEY_B)
        send(srv, KEY_B)                     # B's guess: A's very prompt
        send(srv, KEY_A)                     # A's repeat
        after = view(srv, ADMIN)
        # the counters moved (what B must not be able to see; B's guess itself reuses nothing,
        # as each key is its own partition of the cache: tests/api/test_cache_scope.py) ...
        assert after["prefix_reused_tokens"] - before["prefix_reused_tokens"] > 20, (before, after)
        # ... and B's view, before and after, has no counter that could say so
        b_after = view(srv, KEY_B)
        assert not CACHE_COUNTERS & (set(b_before) | set(b_after)), b_after
        assert b_after["state"] == "ready" and "slots_total" in b_after      # the rest is still there
        assert not CACHE_COUNTERS & set(view(srv, KEY_A))
        assert CACHE_COUNTERS <= set(view(srv, VIEWER))                      # an operator, read-only

        assert CACHE_SERIES not in metrics(srv, None) and CACHE_SERIES not in metrics(srv, KEY_B)
        assert "modelyard_requests_total" in metrics(srv, None)             # the rest stays open
        admin_text = metrics(srv, ADMIN)
        assert f'modelyard_prefix_cache_host_hits_total{{endpoint="{MODEL}"}}' in admin_text
        assert httpx.get(f"{srv.base}/api/v1/endpoints", headers=bearer("wrong"), timeout=10).status_code == 401


def test_keys_only_server_hides_them_unless_it_opts_in(tmp_path):
    with served(tmp_path / "default", keys_config(), key=KEY_A) as srv:
        send(srv, KEY_A)
        assert not CACHE_COUNTERS & set(view(srv, KEY_B))
        assert CACHE_SERIES not in metrics(srv, None)
        # no control plane: an admin token is just a wrong key here
        assert httpx.get(f"{srv.base}/api/v1/endpoints", headers=bearer(ADMIN), timeout=10).status_code == 401
    with served(tmp_path / "one-tenant", keys_config("public_cache_counters = true"), key=KEY_A) as srv:
        send(srv, KEY_A)
        send(srv, KEY_A)
        seen = view(srv, KEY_B)
        assert CACHE_COUNTERS <= set(seen) and seen["prefix_reused_tokens"] > 20, seen
        assert f'modelyard_prefix_cache_host_hits_total{{endpoint="{MODEL}"}}' in metrics(srv, None)
