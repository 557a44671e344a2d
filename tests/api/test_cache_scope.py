"""Prefix reuse is partitioned per API key (issue 19): a prompt that reuses a cached prefix
answers sooner, so with one cache for every key a tenant could time a guessed prompt and learn,
token by token, what another tenant's prompts begin with. Tested by the cache's own counter
(`prefix_reused_tokens`, shown to keys here by `public_cache_counters`), not by timing, over
real HTTP on real `modelyard serve` processes with two keys: B's copy of A's prompt reuses
nothing, A's repeat does; `cache_salt` splits a key's partition further (and is bounded);
`prefix_cache_scope = "shared"` is the old single-tenant behaviour. Reuse never changes output."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from modelyard.api.openai.cache_scope import cache_partition
from modelyard.settings import Settings
from testkit.servers import MODEL, bearer, served

pytestmark = pytest.mark.model

KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"
ENDPOINT = f'[[endpoints]]\nname = "{MODEL}"\nmodel = "{MODEL}"\ncontext = 256\nparallel = 1\nthreads = 1\n'
# Long enough (> the host cache's 32 tokens) that A's prefix is saved when B takes the one slot.
SECRET_PROMPT = "Tenant A's confidential memo: the merger with Initech closes on the third of March " * 2
REUSED = 20      # far more than 0, far less than the prompt


def config(scope: str | None = None) -> str:
    line = f'prefix_cache_scope = "{scope}"\n' if scope else ""
    return f'[server]\napi_keys = ["{KEY_A}", "{KEY_B}"]\npublic_cache_counters = true\n{line}\n{ENDPOINT}'


def reused(srv) -> int:
    r = httpx.get(f"{srv.base}/api/v1/endpoints/{MODEL}", headers=bearer(KEY_A), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["prefix_reused_tokens"]


def complete(srv, key: str, shared: bool = False, **extra) -> tuple[str, int]:
    """A's prompt sent with `key`: (the text, the prompt tokens its prefill skipped)."""
    before = reused(srv)
    r = httpx.post(f"{srv.api}/completions", headers=bearer(key), timeout=120,
                   json={"model": MODEL, "prompt": SECRET_PROMPT, "max_tokens": 4, **extra})
    assert r.status_code == 200, r.text
    saved = reused(srv) - before
    # the request's own usage says the same (OpenAI's cached_tokens) where its partition is its
    # key's own; under "shared" it would be the side channel, and is left out
    if shared:
        assert "prompt_tokens_details" not in r.json()["usage"], r.json()["usage"]
    else:
        assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": saved}, r.json()["usage"]
    return r.json()["choices"][0]["text"], saved


def chat(srv, key: str, **extra) -> int:
    before = reused(srv)
    r = httpx.post(f"{srv.api}/chat/completions", headers=bearer(key), timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": SECRET_PROMPT}],
                         "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text
    return reused(srv) - before


def fake_request(key_id: str | None, scope: str = "key") -> SimpleNamespace:
    quota = SimpleNamespace(key_id=key_id) if key_id is not None else None
    return SimpleNamespace(state=SimpleNamespace(quota=quota),
                           app=SimpleNamespace(state=SimpleNamespace(settings=Settings(prefix_cache_scope=scope))))


@pytest.mark.parametrize("scope", ["key", "shared"])
def test_a_keyless_server_is_one_tenant(scope):
    assert cache_partition(fake_request(None, scope), None) == ""
    assert cache_partition(fake_request(None, scope), "x") == cache_partition(fake_request(None, scope), "x") != ""


def test_partitions_are_the_key_and_the_salt_and_no_pair_spells_another():
    assert Settings().prefix_cache_scope == "key"
    parts = [cache_partition(fake_request(key, scope), salt)
             for key, scope, salt in (("config:a", "key", None), ("config:b", "key", None),
                                      ("config:a", "key", "s"), ("config:a", "key", '", "s'),
                                      ("config:a", "shared", "s"), ("config:a", "shared", None))]
    assert parts[-1] == "" and len(set(parts)) == len(parts)
    assert "config:a" in parts[0]              # the key's id (never its secret: the quota has none)


def test_each_key_reuses_only_its_own_prompts_and_a_salt_splits_further(tmp_path):
    with served(tmp_path, config(), key=KEY_A) as srv:
        text_a, _ = complete(srv, KEY_A)
        text_b, saved = complete(srv, KEY_B)       # B's guess: A's very prompt, in A's slot
        assert saved == 0
        text_a2, saved = complete(srv, KEY_A)      # A's own, back from host memory
        assert saved > REUSED
        assert text_a == text_b == text_a2          # with or without reuse: the same output
        _, saved = complete(srv, KEY_B)            # B's own copy was kept apart, and is B's
        assert saved > REUSED

        # A salt is a partition of its own, inside the key's.
        assert complete(srv, KEY_A, cache_salt="doc-1")[1] == 0
        assert complete(srv, KEY_A, cache_salt="doc-1")[1] > REUSED
        assert complete(srv, KEY_B, cache_salt="doc-1")[1] == 0

        # /chat/completions: the same partitions.
        chat(srv, KEY_A)
        assert chat(srv, KEY_B) == 0
        assert chat(srv, KEY_A) > REUSED

        for route, body in (("completions", {"prompt": "Hi"}),
                            ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
            r = httpx.post(f"{srv.api}/{route}", headers=bearer(KEY_A), timeout=30,
                           json={"model": MODEL, "max_tokens": 1, "cache_salt": "s" * 257, **body})
            assert r.status_code == 422 and "cache_salt" in r.text, r.text


def test_a_shared_scope_is_one_cache_for_every_key(tmp_path):
    with served(tmp_path, config("shared"), key=KEY_A) as srv:
        complete(srv, KEY_A, shared=True)
        assert complete(srv, KEY_B, shared=True)[1] > REUSED
        # a salt still keeps a client's prompts apart, whoever's key it is
        assert complete(srv, KEY_B, shared=True, cache_salt="mine")[1] == 0
        assert complete(srv, KEY_A, shared=True, cache_salt="mine")[1] > REUSED
