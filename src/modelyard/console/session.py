"""Console sessions: an admin token exchanged once for a signed cookie; CSRF tokens.

The cookie holds no secret: `v1.<payload>.<mac>`, the payload (base64url JSON) naming the admin
token (name, role, a fingerprint of its digest), an expiry and a random nonce; the MAC is an
HMAC-SHA256 under a key stored in the control database (migration 7), so every gateway process
sharing that database accepts the same session. A session dies when it expires, when its admin
token is removed from the configuration or changes role or secret (the fingerprint), and when
the console secret is replaced. Logout clears the cookie (a stolen copy lives until it expires:
SESSION_SECONDS, kept short for that reason).

CSRF: every state-changing console request carries `X-CSRF-Token`, an HMAC of the session's nonce
(the page puts it on htmx's headers). The cookie is SameSite=Strict as well; the token is what a
forged request cannot know.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from ..control.db import Database
from ..control.records import server_secret
from ..settings import AdminToken, secret_digest

COOKIE = "modelyard_console"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 8 * 3600
SECRET_NAME = "session_hmac"


def load_secret(db: Database) -> bytes:
    """This database's console key: made by the first process that needs it, read by the rest."""
    return server_secret(db, SECRET_NAME)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_digest(token: AdminToken) -> bytes:
    return secret_digest(token.token)


@dataclass(frozen=True)
class Session:
    name: str
    role: str
    nonce: str
    expires: int

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def who(self) -> str:
        return f"{self.role}:{self.name}"


def current_tokens(app) -> tuple[AdminToken, ...]:
    """The admin tokens this process accepts now: the configured ones, and those stored in the
    control database where this server keeps them (`app.state.admin_tokens`, refreshed by its
    poll), so a revoked stored token ends its console sessions too."""
    stored = getattr(app.state, "admin_tokens", None)
    return (*app.state.settings.admin_tokens, *(getattr(stored, "tokens", None) or ()))


class Sessions:
    def __init__(self, key: bytes, tokens: Callable[[], Iterable[AdminToken]]) -> None:
        self._key = key
        self._tokens = tokens

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.new(self._key, b"|".join(parts), hashlib.sha256).digest()

    def _fingerprint(self, token: AdminToken) -> str:
        return _b64(self._mac(b"token", token_digest(token)))[:22]

    def login(self, presented: str) -> tuple[Session, str] | None:
        """The admin token presented at the login form -> a session and its cookie value."""
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found = None
        for token in self._tokens():                 # no early exit (timing)
            if hmac.compare_digest(token_digest(token), digest):
                found = token
        if found is None or not presented.strip():
            return None
        session = Session(found.name, found.role, _b64(os.urandom(18)), int(time.time()) + SESSION_SECONDS)
        payload = _b64(json.dumps({"n": session.name, "r": session.role, "f": self._fingerprint(found),
                                   "s": session.nonce, "e": session.expires}, separators=(",", ":")).encode())
        return session, f"v1.{payload}.{_b64(self._mac(b'session', payload.encode()))}"

    def read(self, cookie: str | None) -> Session | None:
        """A valid session, or None (forged, expired, its token gone or changed)."""
        if not cookie or cookie.count(".") != 2:
            return None
        version, payload, mac = cookie.split(".")
        try:
            good = version == "v1" and hmac.compare_digest(_unb64(mac), self._mac(b"session", payload.encode()))
            data = json.loads(_unb64(payload)) if good else None
        except (ValueError, TypeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("e"), int) or data["e"] <= time.time():
            return None
        for token in self._tokens():
            if token.name == data.get("n") and token.role == data.get("r") and \
                    hmac.compare_digest(self._fingerprint(token), str(data.get("f"))):
                return Session(token.name, token.role, str(data["s"]), data["e"])
        return None

    def token_of(self, session: Session) -> AdminToken | None:
        """The admin token a session acts as (the console's in-process API calls)."""
        for token in self._tokens():
            if token.name == session.name and token.role == session.role:
                return token
        return None

    def csrf(self, session: Session) -> str:
        return _b64(self._mac(b"csrf", session.nonce.encode()))

    def csrf_ok(self, session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf(session), presented or "")
