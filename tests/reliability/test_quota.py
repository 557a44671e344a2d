"""Per-key quotas. Keys: "sk-a" in clear with rpm = 3; "sk-b" given only as its sha256 with
tpm = 20; "sk-burst" and "sk-leave" with tpm quotas sized for the reservation tests. Past a
quota: 429, Retry-After, type rate_limit_error. Other keys are not affected, and no key ever
reaches the server's log (debug level, so everything it logs is there).

tpm is reserved before any work (prompt tokens + max_tokens) and settled to what was computed
when the request ends, however it ends. The reservation tests send token-id prompts (their
length is exact) and ban smollm2's end-of-generation tokens, so every admitted request uses
exactly what it reserved and the counts below do not depend on timing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

import httpx
import pytest

from helpers import assert_openai_error, config, live_server

pytestmark = pytest.mark.model

KEY_A, KEY_B = "sk-a", "sk-b"
KEY_BURST, KEY_LEAVE = "sk-t-burst", "sk-t-leave"
WRONG_KEY = "sk-c"          # not configured: refused, and not logged either
RPM_A, TPM_B = 3, 20
PROMPT = list(range(1000, 1010))            # 10 tokens, exactly
NO_EOG = {"0": -100, "1": -100, "2": -100}  # smollm2's end tokens: generation always runs to max_tokens
BURST_MAX_TOKENS = 6                        # each burst request reserves 10 + 6 = 16
TPM_BURST = 3 * 16 + 8                      # room for three reservations, not four
TPM_LEAVE = 240
TIMEOUT = httpx.Timeout(30.0, connect=10.0)

EXTRA = f"""
[[keys]]
key = "{KEY_A}"
rpm = {RPM_A}

[[keys]]
key = "sha256:{hashlib.sha256(KEY_B.encode()).hexdigest()}"
tpm = {TPM_B}

[[keys]]
key = "{KEY_BURST}"
tpm = {TPM_BURST}

[[keys]]
key = "{KEY_LEAVE}"
tpm = {TPM_LEAVE}
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
    for key in (KEY_A, KEY_B, KEY_BURST, KEY_LEAVE, WRONG_KEY):
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


def _used(err: dict) -> int:
    m = re.search(r"\((\d+) used in the last minute\)", err["message"])
    assert m, err
    return int(m.group(1))


def test_concurrent_burst_is_admitted_only_as_far_as_its_reservations_fit(srv):
    """Six requests at once, each reserving 16 of 56 tokens: three run, three get 429 before any
    work. Charging only at the end let all six through (none had finished when they arrived)."""
    body = {"model": srv.model, "prompt": PROMPT, "max_tokens": BURST_MAX_TOKENS, "logit_bias": NO_EOG}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=TIMEOUT, headers={"Authorization": f"Bearer {KEY_BURST}"}) as c:
            return await asyncio.gather(*(c.post(f"{srv.api}/completions", json=body) for _ in range(6)))

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 3 and len(refused) == 3, [(r.status_code, r.text) for r in responses]
    for r in ok:   # the premise: each used exactly what it reserved, so timing cannot matter
        usage, choice = r.json()["usage"], r.json()["choices"][0]
        assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
            "prompt_tokens": 10, "completion_tokens": BURST_MAX_TOKENS, "total_tokens": 16}, usage
        assert choice["finish_reason"] == "length", choice
    for r in refused:
        err = _assert_429(r, "tokens per minute")
        assert "may use up to 16 tokens" in err["message"], err
        assert _used(err) in (32, 48), err      # two or three of the others reserved or spent
    # settled: exactly the three requests' tokens, and one more reservation of 16 does not fit
    err = _assert_429(_complete(srv, KEY_BURST, max_tokens=BURST_MAX_TOKENS, prompt=PROMPT), "tokens per minute")
    assert _used(err) == 48, err
    # but one of 8 does
    assert _complete(srv, KEY_BURST, max_tokens=6, prompt=PROMPT[:2]).status_code == 200


def test_a_client_that_leaves_mid_stream_is_charged_for_what_was_computed(srv):
    """A stream reserving 10 + 220 of 240 tokens, left after its first token: it is charged its
    prompt and the tokens made before the abort (not nothing, and not the whole reservation), so a
    request that would have fit an untouched quota is refused."""
    with httpx.stream("POST", f"{srv.api}/completions", headers={"Authorization": f"Bearer {KEY_LEAVE}"},
                      timeout=TIMEOUT, json={"model": srv.model, "prompt": PROMPT, "max_tokens": 220,
                                             "logit_bias": NO_EOG, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["choices"][0]["text"]:
                break                          # the first token: leave
    ep = srv.wait_idle()
    assert ep["in_flight"] == 0, ep            # aborted, so settled
    # 10 + 225 = 235 fits 240 alone; with the abandoned stream's >= 11 tokens it does not
    r = _complete(srv, KEY_LEAVE, max_tokens=225, prompt=PROMPT)
    err = _assert_429(r, "tokens per minute")
    used = _used(err)
    assert len(PROMPT) + 1 <= used < len(PROMPT) + 220, err
    # what is left is still usable
    r = _complete(srv, KEY_LEAVE, max_tokens=TPM_LEAVE - used - len(PROMPT), prompt=PROMPT)
    assert r.status_code == 200, r.text


def test_a_request_larger_than_the_whole_quota_is_told_so(srv):
    err = _assert_429(_complete(srv, KEY_B, max_tokens=64, prompt=PROMPT), "tokens per minute")
    assert "more than the whole quota" in err["message"] and "74" in err["message"], err
    assert _complete(srv, KEY_B, max_tokens=2, prompt=PROMPT).status_code == 200   # nothing was charged
