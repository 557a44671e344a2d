"""Console sessions: an admin token exchanged once for a session; CSRF tokens; sign-in throttling.

The cookie is `v2.<id>`, a random id; the control database keeps the session as a record holding
only the id's sha256, its admin token (a digest, `token_ref`) and its expiry (control/sessions),
so every gateway process sharing that database accepts the same session, and a read of the
database forges none. A session ends when it expires (SESSION_SECONDS), at logout (the record is
deleted: a copied cookie stops working at once, in every process), when its admin token is
revoked (the command deletes its records) or taken out of the configuration, and while the
control database has been silent past `control_fail_closed_after` (a revocation could have been
missed; console/guard answers 503).

CSRF: every state-changing console request carries `X-CSRF-Token`, an HMAC keyed by the session's
id (the page puts it on htmx's headers). The cookie is SameSite=Strict and HttpOnly as well; the
token is what a forged request cannot know, and the database cannot tell it.

Sign-in: at most `login_failures_per_minute` failed attempts per client address per minute, then
429 with Retry-After (`LoginThrottle`); each attempt, taken or refused, is in the audit log with
the client's address and never what was typed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Iterable

from ..control.sessions import SessionStore, token_ref
from ..settings import AdminToken, secret_digest

COOKIE = "modelyard_console"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 8 * 3600
VERSION = "v2."             # v1 cookies (signed by a key in the database) are no longer accepted
WINDOW = 60.0               # seconds: the sign-in throttle's window
MAX_ADDRESSES = 10_000      # client addresses the throttle remembers (the least recent go first)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ref_of(token: AdminToken) -> str:
    return token_ref(secret_digest(token.token))


@dataclass(frozen=True)
class Session:
    name: str
    role: str
    id: str          # the cookie's random id: keys the CSRF token; only its digest is stored
    ref: str         # its admin token (control/sessions.token_ref)
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
    """Blocking (the database): the routes call these on a worker thread."""

    def __init__(self, store: SessionStore, tokens: Callable[[], Iterable[AdminToken]]) -> None:
        self.store = store
        self._tokens = tokens

    def _find(self, presented: str) -> AdminToken | None:
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found = None
        for token in self._tokens():                 # no early exit (timing)
            if hmac.compare_digest(secret_digest(token.token), digest):
                found = token
        return found if presented.strip() else None

    def login(self, presented: str, client: str) -> tuple[Session, str] | None:
        """The admin token presented at the login form -> a session and its cookie value, or
        None (the refusal audited)."""
        found = self._find(presented)
        if found is None:
            self.store.failed({"client": client})
            return None
        ref = ref_of(found)
        session_id, expires = self.store.create(ref, SESSION_SECONDS, f"{found.role}:{found.name}",
                                                {"client": client})
        return Session(found.name, found.role, session_id, ref, expires), VERSION + session_id

    def read(self, cookie: str | None) -> Session | None:
        """A live session, or None (unknown, ended, expired, its token gone)."""
        if not cookie or not cookie.startswith(VERSION) or len(cookie) > 200:
            return None
        session_id = cookie[len(VERSION):]
        row = self.store.get(session_id)
        if row is None:
            return None
        for token in self._tokens():
            if hmac.compare_digest(ref_of(token), row["token_ref"]):
                return Session(token.name, token.role, session_id, row["token_ref"], int(row["expires_at"]))
        return None

    def logout(self, session: Session, client: str) -> None:
        self.store.delete(session.id, session.who, {"client": client})

    def token_of(self, session: Session) -> AdminToken | None:
        """The admin token a session acts as (the console's in-process API calls)."""
        for token in self._tokens():
            if hmac.compare_digest(ref_of(token), session.ref):
                return token
        return None

    @staticmethod
    def csrf(session: Session) -> str:
        return _b64(hmac.new(session.id.encode(), b"csrf", hashlib.sha256).digest())

    def csrf_ok(self, session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf(session), presented or "")


class LoginThrottle:
    """Failed sign-ins per client address in a sliding minute, in this process (on the event
    loop: no lock). A guesser gets `limit` tries a minute per address, then 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float | None:
        """Seconds until this address may try again, or None (it may now)."""
        times = self._failures.get(client)
        if times is None:
            return None
        now = time.monotonic()
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if len(times) < self.limit:
            return None
        return times[0] + WINDOW - now

    def failed(self, client: str) -> None:
        times = self._failures.pop(client, None) or deque()
        times.append(time.monotonic())
        while len(times) > self.limit:
            times.popleft()
        self._failures[client] = times           # the most recent last
        while len(self._failures) > MAX_ADDRESSES:
            self._failures.popitem(last=False)
