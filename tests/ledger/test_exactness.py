"""Issue 20's exactness property, on every quota backend (memory, Redis, PostgreSQL), over real
HTTP, with an embedded endpoint (smollm2-135m), an embeddings one (minilm-l6-v2) and a remote one
(this very server as its upstream):

after a mixed run (streaming and not, n > 1, several prompts, chat, structured output,
embeddings, remote requests; clients that leave mid-stream, a deadline, an upstream error), the
tokens in the usage table are the sum of the `usage` objects the clients received plus what the
engines computed for the requests cut short (at least their prompt and what the client saw, at
most what they reserved); the metrics' token counters say the same; and the key's tpm window
(memory, Redis: exact) and its budget (every backend) hold that same total: nothing counted
twice, nothing missed. One RequestLedger per request (quota/ledger) is what makes them agree.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from testkit.servers import MODEL, served
from testkit.until import until

pytestmark = pytest.mark.model

ADMIN, EMBED, REMOTE = "ledger-admin", "minilm-l6-v2", "remote"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
ENDLESS = {"logit_bias": {"0": -100, "1": -100, "2": -100}}     # smollm2's end tokens never drawn


def config(stores: str) -> str:
    small = "context = 512\nparallel = 2\nthreads = 1\n"
    return (f'[server]\nusage_flush_interval = 0.2\n{stores}\n[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[endpoints]]\nname = "{MODEL}"\n{small}\n[[endpoints]]\nname = "{EMBED}"\nmodel = "{EMBED}"\n{small}')


def stream(api: str, auth: dict, path: str, body: dict, leave_after: int | None = None) -> tuple[dict | None, int]:
    """(the usage event, or None if the client left first; content chunks seen)."""
    usage, seen = None, 0
    with httpx.stream("POST", f"{api}{path}", headers=auth, timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices"):
                seen += 1
            if leave_after is not None and seen >= leave_after:
                return None, seen          # leave without reading the rest
    return usage, seen


def usage_rows(base: str, key_id: str | None = None) -> list[dict]:
    params = {"granularity": "day", **({"key_id": key_id} if key_id else {})}
    return httpx.get(f"{base}/api/v1/control/usage", headers=ADMIN_H, params=params).json()["data"]


def counted(base: str) -> int:
    text = httpx.get(f"{base}/metrics", headers=ADMIN_H).text
    return int(sum(float(v) for v in re.findall(r'^modelyard_(?:prompt|completion)_tokens_total\{[^}]*\} (\S+)$',
                                               text, re.M)))


def refusal(api: str, auth: dict) -> str:
    r = httpx.post(f"{api}/completions", headers=auth, timeout=60,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    return r.json()["error"]["message"] if r.status_code == 429 else ""


def test_usage_windows_budgets_and_metrics_hold_the_same_tokens(tmp_path, backend):
    kind, stores = backend
    with served(tmp_path, config(stores), key=None, endpoints=(MODEL, EMBED)) as srv:
        admin = httpx.Client(base_url=f"{srv.base}/api/v1/control", headers=ADMIN_H, timeout=30)
        upstream = admin.post("/api-keys", json={"name": "upstream"}).json()
        client = admin.post("/api-keys", json={"name": "client", "tpm": 1_000_000, "budget_tokens": 10_000_000,
                                               "budget_period": "day"}).json()
        auth = {"Authorization": f"Bearer {client['secret']}"}
        ep = admin.post("/model-endpoints", json={"name": REMOTE, "engine": "openai", "urls": [srv.api],
                                                 "upstream_model": MODEL, "api_key": upstream["secret"],
                                                 "context": 4096}).json()
        until(lambda: httpx.get(f"{srv.base}/api/v1/endpoints/{REMOTE}", headers=ADMIN_H).json().get("state")
              == "ready", 30, "the remote endpoint never became ready")
        metrics_before = counted(srv.base)
        api = srv.api
        received = 0           # the sum of the usage objects the clients received

        def post(path: str, body: dict, **kw) -> httpx.Response:
            return httpx.post(f"{api}{path}", headers={**auth, **kw.pop("headers", {})}, json=body, timeout=60)

        def take(r: httpx.Response) -> None:
            nonlocal received
            assert r.status_code == 200, r.text
            received += r.json()["usage"]["total_tokens"]

        started = time.monotonic()
        # -- requests that end with their usage ------------------------------------------------
        take(post("/completions", {"model": MODEL, "prompt": ["One two", "Three four five"], "n": 2,
                                   "max_tokens": 6, "temperature": 0.8, "seed": 1}))
        take(post("/chat/completions", {"model": MODEL, "n": 2, "max_tokens": 6,
                                        "messages": [{"role": "user", "content": "Say hi"}]}))
        take(post("/chat/completions", {"model": MODEL, "max_tokens": 24, "messages": [
            {"role": "user", "content": "A colour as JSON"}], "response_format": {
                "type": "json_schema", "json_schema": {"name": "c", "strict": True, "schema": {
                    "type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
                    "additionalProperties": False}}}}))
        take(post("/embeddings", {"model": EMBED, "input": ["first text", "the second one", "third"]}))
        take(post("/completions", {"model": REMOTE, "prompt": "Remote hello", "max_tokens": 6}))
        for path, body in (("/completions", {"model": MODEL, "prompt": "Stream me", "max_tokens": 8}),
                           ("/chat/completions", {"model": MODEL, "max_tokens": 8, "n": 2,
                                                  "messages": [{"role": "user", "content": "Count"}]}),
                           ("/chat/completions", {"model": REMOTE, "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": "Remote stream"}]})):
            usage, _ = stream(api, auth, path, body)
            assert usage is not None
            received += usage["total_tokens"]
        # -- requests cut short: (at least, at most) what their engines may have computed ---------
        bounds: list[tuple[int, int]] = []
        _, seen = stream(api, auth, "/completions", {"model": MODEL, "prompt": "Once upon a time",
                                                     "max_tokens": 200, **ENDLESS}, leave_after=5)
        bounds.append((4 + seen - 1, 4 + 200))          # its prompt and what was seen, at least
        r = post("/completions", {"model": MODEL, "prompt": "Tell a long story", "max_tokens": 400,
                                  **ENDLESS}, headers={"X-Request-Timeout": "0.5"})
        assert r.status_code == 504, r.text
        bounds.append((4, 4 + 400))
        _, seen = stream(api, auth, "/completions", {"model": REMOTE, "prompt": "Remote story", "max_tokens": 100,
                                                     **ENDLESS}, leave_after=3)
        bounds.append((seen - 1, len(b"Remote story") + 2 + 100))    # the gateway's bound on its prompt
        r = post("/completions", {"model": REMOTE, "prompt": "word " * 600, "max_tokens": 4})
        assert r.status_code == 400, r.text                   # the upstream's context is 512: it refused
        bounds.append((0, 0))
        requests = 8 + len(bounds)

        # -- the usage table ---------------------------------------------------------------------
        def settled():
            rows = usage_rows(srv.base, client["id"])
            return rows if sum(r["requests"] for r in rows) == requests else None
        rows = until(settled, 20, f"the usage table never held the {requests} requests")
        in_table = sum(r["total_tokens"] for r in rows)
        cut = in_table - received
        assert sum(lo for lo, _ in bounds) <= cut <= sum(hi for _, hi in bounds), (in_table, received, bounds)
        # every key's rows (the upstream key's too: the remote endpoint's upstream is this server)
        # against the metrics' token counters: the same settles
        everyone = until(lambda: sum(r["total_tokens"] for r in usage_rows(srv.base)) == counted(srv.base)
                         - metrics_before and counted(srv.base) - metrics_before, 10,
                         "the metrics and the usage table disagree")
        assert everyone >= in_table

        # -- the key's tpm window and budget hold the same total ---------------------------------
        etag = int(admin.get(f"/api-keys/{client['id']}").headers["etag"].strip('"'))
        if kind != "postgres":      # PostgreSQL's window is leased blocks: bounded, not exact (quota/postgres)
            assert time.monotonic() - started < 50, "the run took too long for a one-minute window"
            r = admin.patch(f"/api-keys/{client['id']}", json={"tpm": in_table}, headers={"If-Match": f'"{etag}"'})
            assert r.status_code == 200, r.text
            etag += 1
            said = until(lambda: refusal(api, auth), 10, "the tpm window does not hold the usage table's total")
            assert f"({in_table} used in the last minute)" in said, (said, in_table)
        r = admin.patch(f"/api-keys/{client['id']}", json={"tpm": None, "budget_tokens": in_table},
                        headers={"If-Match": f'"{etag}"'})
        assert r.status_code == 200, r.text
        said = until(lambda: refusal(api, auth), 10, "the budget does not hold the usage table's total")
        assert "token budget" in said and f"{in_table} used" in said, (said, in_table)
        admin.delete(f"/model-endpoints/{ep['id']}")
