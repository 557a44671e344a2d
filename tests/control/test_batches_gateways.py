"""Batches survive their gateways (batch/runner, control/batches): a gateway killed with -9 in
the middle of a batch and started again finishes it with every custom_id exactly once and the
online answers; two gateways on one PostgreSQL database share one batch's lines (both hold
leases on it)."""

from __future__ import annotations

import collections
import json

import openai
import pytest

from testkit.pg import fresh_database
from testkit.servers import OPENAI_PREFIX, modelyard_process, served, start_ready
from testkit.until import until
from modelyard.control.batches import BatchStore
from modelyard.control.db import open_database

pytestmark = pytest.mark.model

KEY, SMOL = "sk-batch-gateways", "smollm2-135m"
LINES = 120


def config(extra: str = "") -> str:
    return (f'[server]\napi_keys = ["{KEY}"]\nbatch_lease_seconds = 3\nbatch_concurrency = 2\n{extra}\n'
            f'[[endpoints]]\nname = "{SMOL}"\ncontext = 256\nparallel = 2\nthreads = 1\n')


def submit(c: openai.OpenAI) -> tuple[str, list[dict]]:
    bodies = [{"model": SMOL, "prompt": f"Line {i}:", "max_tokens": 8, "temperature": 0} for i in range(LINES)]
    data = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": b}) + "\n"
                   for i, b in enumerate(bodies)).encode()
    f = c.files.create(file=("in.jsonl", data), purpose="batch")
    return c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id, bodies


def finished(c: openai.OpenAI, batch_id: str, bodies: list[dict]) -> list[dict]:
    done = until(lambda: (b := c.batches.retrieve(batch_id)).status in ("completed", "failed") and b, 600,
                 "the batch completed")
    assert done.status == "completed", done
    assert done.request_counts.completed == LINES and done.request_counts.failed == 0
    out = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
    counts = collections.Counter(o["custom_id"] for o in out)
    assert set(counts) == {f"c{i}" for i in range(LINES)} and set(counts.values()) == {1}
    by_id = {o["custom_id"]: o["response"]["body"] for o in out}
    for i in (0, LINES // 2, LINES - 1):
        online = c.completions.with_raw_response.create(**bodies[i]).http_response.json()
        assert by_id[f"c{i}"]["choices"] == online["choices"]
    return out


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + OPENAI_PREFIX, api_key=KEY, max_retries=0, timeout=120)


def test_a_gateway_killed_mid_batch_and_restarted_finishes_it(tmp_path):
    server = modelyard_process(tmp_path, config(), key=KEY)
    start_ready(server)
    try:
        c = client(server)
        batch_id, bodies = submit(c)
        until(lambda: c.batches.retrieve(batch_id).request_counts.completed >= 10, 300, "some lines done")
        killed = server.pid
        server.kill()           # -9: its leased lines stay leased until their lease passes
        db = open_database(f"sqlite:///{tmp_path / 'server-control.db'}")
        try:
            held = db.query("SELECT COUNT(*) AS n FROM batch_lines WHERE batch_id = ? AND done = 0 "
                            "AND lease_owner LIKE ?", (batch_id, f"%:{killed}:%"))[0]["n"]
        finally:
            db.close()
        assert held >= 1            # lines it was running when it died: redone after the restart
        start_ready(server)
        c = client(server)
        finished(c, batch_id, bodies)
    finally:
        server.stop()


def test_two_gateways_on_postgres_share_a_batch(tmp_path, pg_server):
    url = fresh_database(pg_server, "batch_gateways")
    cfg = config(f'database_url = "{url}"')
    with served(tmp_path / "a", cfg, name="a", key=KEY) as a, served(tmp_path / "b", cfg, name="b", key=KEY) as b:
        batch_id, bodies = submit(client(a))
        finished(client(b), batch_id, bodies)
        db = open_database(url)
        try:
            owners = BatchStore(db).leases_seen(batch_id)
        finally:
            db.close()
        pids = {o.split(":")[1] for o in owners}
        assert {str(a.pid), str(b.pid)} <= pids, owners
