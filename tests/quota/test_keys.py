"""The key registry (quota/keys.KeyChecker) names a key's quota by its stable identity, never by a
secret: a stored key by its id, so a rotation (a new digest) keeps one set of windows and one
budget counter, in this process and in a gateway started after the rotation (hole 3 of issue 20);
a configured key by its digest, which cannot rotate. Admission is awaited."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from modelyard.control.keys import ActiveKey
from modelyard.errors import RateLimited, Unauthorized
from modelyard.quota.keys import KeyChecker
from modelyard.quota.memory import MemoryQuotas
from modelyard.settings import KeySpec

OLD, NEW = b"sk-before-rotation", b"sk-after-rotation"


class Recording(MemoryQuotas):
    """The memory backend, remembering the names the shared stores would get."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def stores(self, quota, name):
        self.names.append(name)
        return super().stores(quota, name)


def stored(digest: bytes, previous: bytes | None = None) -> ActiveKey:
    return ActiveKey("key_abc", digest, rpm=2, tpm=0, endpoints=None, expires_at=None, previous=previous,
                     previous_until=0 if previous else None)


def test_a_rotated_key_keeps_its_quota_name_before_and_after_a_restart():
    before, after = Recording(), Recording()
    KeyChecker((), control=True, shared=before).replace_stored([stored(hashlib.sha256(OLD).digest())])
    KeyChecker((), control=True, shared=after).replace_stored([stored(hashlib.sha256(NEW).digest(),
                                                                       hashlib.sha256(OLD).digest())])
    assert before.names == after.names and len(before.names) == 1     # the id, not the digest, names it
    for secret in (OLD, NEW):
        assert hashlib.sha256(secret).hexdigest()[:12] not in before.names[0]


def test_configured_keys_are_named_by_their_digest_and_admission_is_awaited():
    backend = Recording()
    keys = KeyChecker((KeySpec("sk-conf", rpm=1),), shared=backend)
    again = Recording()
    KeyChecker((KeySpec("sk-conf", rpm=1),), shared=again)
    assert backend.names == again.names                 # every process agrees, with or without a database

    async def main():
        quota, slot = await keys.admit("Bearer sk-conf")
        assert quota.rpm == 1 and slot is not None
        with pytest.raises(RateLimited):
            await keys.admit("Bearer sk-conf")
        with pytest.raises(Unauthorized):
            await keys.admit("Bearer sk-other")
    asyncio.run(main())
