"""Authorization: Bearer <key>. Keys may be configured in clear or as "sha256:<hex>" so that a
config file holds no secrets; comparison is constant-time either way, and keys are never logged."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from ..errors import Unauthorized


class KeyChecker:
    def __init__(self, keys: tuple[str, ...]) -> None:
        # Compare digests only: equal length, constant time, and no clear keys kept around.
        self._digests = [bytes.fromhex(k[7:]) if k.startswith("sha256:") else _digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> str | None:
        """Returns the matching key's digest (hex) for quotas, or raises Unauthorized."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        digest = _digest(token.strip())
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(d, digest)
        if not ok:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        return digest.hex()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def require_key(request: Request) -> None:
    """FastAPI dependency on every API route."""
    request.state.key = request.app.state.keys.check(request.headers.get("authorization"))
