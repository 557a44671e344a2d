"""Per-key quotas. Keys: "sk-a" in clear with rpm = 3; "sk-b" given only as its sha256 with
tpm = 20. Past a quota: 429, Retry-After, type rate_limit_error. Other keys are not affected, and
no key ever reaches the server's log (debug level, so everything it logs is there)."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from helpers import assert_openai_error, config, live_server

pytestmark = pytest.mark.model

KEY_A, KEY_B = "sk-a", "sk-b"
WRONG_KEY = "sk-c"          # not configured: refused, and not logged either
RPM_A, TPM_B = 3, 20
TIMEOUT = httpx.Timeout(30.0, connect=10.0)

EXTRA = f"""
[[keys]]
key = "{KEY_A}"
rpm = {RPM_A}

[[keys]]
key = "sha256:{hashlib.sha256(KEY_B.encode()).hexdigest()}"
tpm = {TPM_B}
"""


@pytest.fixture
def srv(tmp_path):
    """A fresh server per test: quota windows are a minute long and must start empty."""
    cfg = config(api_keys=("admin-key",), server='log_level = "debug"\n', extra=EXTRA)
    cfg = cfg.replace('log_level = "info"\n', "")
    assert KEY_B not in cfg
    with live_server(tmp_path / "srv", cfg, key="admin-key") as s:
        yield s
    log = s.log_text()
    assert "modelyard" in log          # the log is the server's, and it did log
    for key in (KEY_A, KEY_B, WRONG_KEY):
        assert key not in log, f"an API key ({key}) reached the server log"


def _complete(srv, key: str, max_tokens: int = 1, prompt: str = "Hi") -> httpx.Response:
    return httpx.post(f"{srv.api}/completions", headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT,
                      json={"model": srv.model, "prompt": prompt, "max_tokens": max_tokens})


def _assert_429(r: httpx.Response, what: str) -> dict:
    assert r.status_code == 429, r.text
    retry = r.headers.get("retry-after", "")
    assert retry.isdigit() and 1 <= int(retry) <= 60, r.headers
    err = assert_openai_error(r.json(), "rate_limit_error")
    assert err["code"] == "rate_limit_exceeded", err
    assert what in err["message"], err
    return err


def test_fourth_request_in_a_minute_is_429(srv):
    for i in range(RPM_A):
        r = _complete(srv, KEY_A)
        assert r.status_code == 200, (i, r.text)
    err = _assert_429(_complete(srv, KEY_A), "requests per minute")
    assert str(RPM_A) in err["message"], err
    # every authenticated route counts, and the refusal holds
    r = httpx.get(f"{srv.api}/models", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=TIMEOUT)
    _assert_429(r, "requests per minute")
    # other keys are not limited by sk-a's quota
    assert _complete(srv, "admin-key").status_code == 200
    assert _complete(srv, KEY_B).status_code == 200


def test_hashed_key_authenticates_and_is_limited_by_tokens(srv):
    spent = 0
    for i in range(20):                               # bounded: each request spends >= 2 tokens
        if spent >= TPM_B:
            break
        r = _complete(srv, KEY_B, max_tokens=4, prompt="Count: one, two,")
        assert r.status_code == 200, (i, spent, r.text)
        usage = r.json()["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] >= 2
        spent += usage["total_tokens"]
    assert spent >= TPM_B
    err = _assert_429(_complete(srv, KEY_B), "tokens per minute")
    assert str(TPM_B) in err["message"] and str(spent) in err["message"], err
    # the key's hash is not a key
    digest = hashlib.sha256(KEY_B.encode()).hexdigest()
    for wrong in (digest, f"sha256:{digest}", WRONG_KEY):
        r = httpx.get(f"{srv.api}/models", headers={"Authorization": f"Bearer {wrong}"}, timeout=TIMEOUT)
        assert r.status_code == 401, (wrong, r.text)
        assert_openai_error(r.json(), "authentication_error")
    # sk-a has its own quota, untouched
    assert _complete(srv, KEY_A).status_code == 200


def test_streamed_tokens_count_against_tpm(srv):
    """Streaming spends tokens too (counted when the stream ends)."""
    spent = 0
    for _ in range(20):
        if spent >= TPM_B:
            break
        with httpx.stream("POST", f"{srv.api}/completions", headers={"Authorization": f"Bearer {KEY_B}"},
                          timeout=TIMEOUT, json={"model": srv.model, "prompt": "Count: one, two,",
                                                 "max_tokens": 4, "stream": True,
                                                 "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200, r.read()
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][5:])["usage"]
        spent += usage["total_tokens"]
    assert spent >= TPM_B
    _assert_429(_complete(srv, KEY_B), "tokens per minute")
