"""A configured key's id, as a viewer reads it in the usage rows over real HTTP: it holds nothing
of the key's unsalted sha256 (which would let a viewer test guesses of a weak key offline), it is
the same after a restart, and usage recorded under the id earlier versions gave it (the start of
that sha256) is moved to the new one (issue 19, item 15)."""

from __future__ import annotations

import base64
import hashlib
import time

import httpx
import pytest

from modelyard.control.db import open_database
from testkit.servers import MODEL, served
from test_admin_api import ENGINE, VIEWER, ctl

pytestmark = pytest.mark.model

WEAK = "letmein"        # a key short enough to guess: exactly what the id must not help with
LEGACY_MINUTE = (int(time.time()) // 60 - 90) * 60


def config(url: str) -> str:
    return (f'[server]\napi_keys = ["{WEAK}"]\ndatabase_url = "{url}"\n\n'
            f'[[admin_tokens]]\nname = "audit"\nrole = "viewer"\ntoken = "{VIEWER}"\n\n'
            f'[[endpoints]]\nname = "{MODEL}"\n{ENGINE}')


def hash_encodings(secret: str) -> list[str]:
    """The unsalted sha256 of `secret` in the encodings an id could carry it in."""
    d = hashlib.sha256(secret.encode()).digest()
    return [d.hex(), base64.b64encode(d).decode(), base64.urlsafe_b64encode(d).decode(),
            base64.b32encode(d).decode(), str(int.from_bytes(d, "big"))]


def reveals(key_id: str, secret: str) -> bool:
    """Whether `key_id` holds a prefix of 6 characters or more of one of the hash's encodings
    (6 hex digits are 24 bits: a chance match of a random id is about 1 in a million)."""
    return any(e[:6].lower() in key_id.lower() for e in hash_encodings(secret))


def config_rows(srv) -> list[dict]:
    with ctl(srv.base, VIEWER) as viewer:
        r = viewer.get("/usage", params={"granularity": "minute"})
        assert r.status_code == 200, r.text
    return [row for row in r.json()["data"] if row["key_id"].startswith("config:")]


def served_once(srv, recent: int) -> list[dict]:
    """One completion with the weak key; the usage rows once the table holds `recent` requests
    since the legacy row (flushes come every 5 s), or as they are after 15 s."""
    r = httpx.post(f"{srv.api}/completions", headers={"Authorization": f"Bearer {WEAK}"}, timeout=60,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 15
    while True:
        rows = config_rows(srv)
        if sum(r["requests"] for r in rows if r["start"] > LEGACY_MINUTE) >= recent or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


def test_a_configured_keys_id_reveals_nothing_and_survives_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'control.db'}"
    legacy = "config:" + hashlib.sha256(WEAK.encode()).hexdigest()[:12]
    assert reveals(legacy, WEAK)            # what the id was: the check below would catch it
    db = open_database(url)                 # usage an earlier version recorded
    db.execute("INSERT INTO usage (key_id, endpoint, minute, requests, prompt_tokens, completion_tokens) "
               "VALUES (?, ?, ?, 3, 30, 3)", (legacy, MODEL, LEGACY_MINUTE))
    db.close()

    with served(tmp_path, config(url), key=WEAK) as srv:
        first = served_once(srv, 1)
    ids = {row["key_id"] for row in first}
    assert len(ids) == 1, first
    [key_id] = ids
    assert not reveals(key_id, WEAK), key_id
    # the earlier usage is the key's under its new id
    assert [(r["start"], r["requests"]) for r in first if r["start"] == LEGACY_MINUTE] == [(LEGACY_MINUTE, 3)]

    with served(tmp_path, config(url), key=WEAK) as srv:
        second = served_once(srv, 2)
        log = srv.log_text()
    assert {row["key_id"] for row in second} == {key_id}, second
    assert sum(r["requests"] for r in second if r["start"] > LEGACY_MINUTE) == 2      # one per run, one id
    assert WEAK not in log and hashlib.sha256(WEAK.encode()).hexdigest()[:12] not in log
