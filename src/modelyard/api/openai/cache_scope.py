"""A request's prefix cache partition: whose cached prompts it may reuse (issue 19).

A prompt that reuses a cached prefix answers sooner, so a shared prefix cache lets any caller
learn, by timing a guess, whether someone else's prompt began that way, and extract it token by
token. Embedded engines reuse a prefix only within one partition (EngineRequest.cache_partition):
with `[server] prefix_cache_scope = "key"` (the default) each API key is one, by its id, never
its secret; "shared" (one tenant) and a keyless server put everyone in one. vLLM's `cache_salt`
splits a partition further (vLLM salts its block hashes with it the same way).
"""

from __future__ import annotations

import json

from fastapi import Request


def cache_partition(request: Request, cache_salt: str | None) -> str:
    """The partition of the request's prompts ("" is the keyless, unsalted one)."""
    quota = getattr(request.state, "quota", None)
    tenant = ""
    if quota is not None and request.app.state.settings.prefix_cache_scope == "key":
        tenant = quota.key_id
    if not tenant and cache_salt is None:
        return ""
    # JSON: no key id and salt can spell another pair's partition.
    return json.dumps([tenant, cache_salt])


def cached_tokens_visible(request: Request) -> bool:
    """Whether a request's usage may say how much of its prompt the cache held (OpenAI's
    `cached_tokens`): yes where its partition holds only the caller's own prompts (scope "key",
    or a keyless server, one tenant); under "shared" it would tell one key what another's
    prompts begin with, the side channel the partitions close."""
    quota = getattr(request.state, "quota", None)
    return quota is None or request.app.state.settings.prefix_cache_scope == "key"
