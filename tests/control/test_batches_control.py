"""Batches under the control plane (stored keys, usage, budgets, the admin API): a batch's
tokens are the key's, in its usage rows and marked as batch; a key's batch lines stop at its
budget (the rest fail with its 429); admins list every key's files and batches."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from testkit.servers import OPENAI_PREFIX, served
from testkit.until import until

pytestmark = pytest.mark.model

ADMIN, SMOL = "batches-admin", "smollm2-135m"
LINES = 20
BUDGET = 120


def config(path) -> str:
    return (f'[server]\ndatabase_url = "sqlite:///{path}"\nusage_flush_interval = 0.5\nbatch_lease_seconds = 3\n'
            f'batch_concurrency = 2\n\n[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[endpoints]]\nname = "{SMOL}"\ncontext = 256\nparallel = 2\nthreads = 1\n')


def run(c: openai.OpenAI) -> tuple[object, list[dict]]:
    data = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": SMOL, "prompt": f"Fact {i}:", "max_tokens": 6, "temperature": 0}})
                   + "\n" for i in range(LINES)).encode()
    f = c.files.create(file=("in.jsonl", data), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    done = until(lambda: (r := c.batches.retrieve(b.id)).status in ("completed", "failed") and r, 300, "batch ended")
    rows = []
    for fid in (done.output_file_id, done.error_file_id):
        if fid:
            rows += [json.loads(x) for x in c.files.content(fid).text.splitlines()]
    return done, rows


def test_batch_usage_budget_and_admin_lists(tmp_path):
    with served(tmp_path, config(tmp_path / "control.db"), key=ADMIN) as srv:
        admin = httpx.Client(base_url=srv.base + "/api/v1/control", headers={"Authorization": f"Bearer {ADMIN}"},
                             timeout=30)
        plain = admin.post("/api-keys", json={"name": "plain"}).json()
        tight = admin.post("/api-keys", json={"name": "tight", "budget_tokens": BUDGET,
                                              "budget_period": "day"}).json()
        until(lambda: httpx.get(srv.base + OPENAI_PREFIX + "/models", timeout=10,
                                headers={"Authorization": f"Bearer {tight['secret']}"}).status_code == 200,
              30, "the stored keys reached the gateway")
        c = openai.OpenAI(base_url=srv.base + OPENAI_PREFIX, api_key=plain["secret"], max_retries=0, timeout=120)
        done, rows = run(c)
        assert done.status == "completed" and done.request_counts.completed == LINES
        batch_tokens = sum(r["response"]["body"]["usage"]["total_tokens"] for r in rows)
        online = c.completions.create(model=SMOL, prompt="Hello", max_tokens=3).usage.total_tokens

        def usage() -> dict | None:
            data = admin.get("/usage", params={"key_id": plain["id"], "granularity": "day"}).json()["data"]
            total = {k: sum(r[k] for r in data) for k in ("requests", "total_tokens", "batch_requests", "batch_tokens")}
            return total if total["requests"] == LINES + 1 else None
        total = until(usage, 30, "the batch's usage flushed")
        assert total == {"requests": LINES + 1, "total_tokens": batch_tokens + online, "batch_requests": LINES,
                         "batch_tokens": batch_tokens}

        # the budget: lines run until it is spent; the rest are answered with its 429
        t = openai.OpenAI(base_url=srv.base + OPENAI_PREFIX, api_key=tight["secret"], max_retries=0, timeout=120)
        done, rows = run(t)
        assert done.status == "completed" and done.request_counts.failed > 0
        assert done.request_counts.completed + done.request_counts.failed == LINES
        spent = sum(r["response"]["body"]["usage"]["total_tokens"] for r in rows if r["response"]["status_code"] == 200)
        assert 0 < spent <= BUDGET
        refused = [r for r in rows if r["response"]["status_code"] != 200]
        assert {r["response"]["status_code"] for r in refused} == {429}
        assert {r["response"]["body"]["error"]["code"] for r in refused} == {"budget_exceeded"}

        # the operator's view: every key's files and batches, with their owner
        files = admin.get("/files", params={"limit": 100}).json()["data"]
        assert {plain["id"], tight["id"]} <= {f["key_id"] for f in files}
        batches = admin.get("/batches", params={"key_id": tight["id"]}).json()["data"]
        assert [b["id"] for b in batches] == [done.id] and batches[0]["key_id"] == tight["id"]
        assert httpx.get(srv.base + "/api/v1/control/files", timeout=10,
                         headers={"Authorization": f"Bearer {plain['secret']}"}).status_code in (401, 403)
