"""A request cut short is still counted: a client that streams and leaves before the end (or
whose request fails) is recorded with the tokens the engine computed, so neither its usage nor
a token budget (memory backend: the usage table plus what is unflushed) can be dodged by
disconnecting. Real server, real model, real SQLite store."""

from __future__ import annotations

import json

import httpx
import pytest

from modelyard.control.usage import FLUSH
from testkit.servers import MODEL, served
from testkit.until import until

pytestmark = pytest.mark.model

ADMIN = "cut-admin"
BUDGET = 320                   # room for one request of 4 prompt tokens + 300, and no more
ENDLESS = {"0": -100, "1": -100, "2": -100}       # smollm2's end tokens never drawn


def config(path) -> str:
    return (f'[server]\ndatabase_url = "sqlite:///{path}"\n\n[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[endpoints]]\nname = "{MODEL}"\ncontext = 512\nparallel = 2\nthreads = 1\n')


def test_a_stream_left_midway_is_counted_and_charged_to_the_budget(tmp_path):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with served(tmp_path, config(tmp_path / "control.db"), key=None) as srv:
        key = httpx.post(f"{srv.base}/api/v1/control/api-keys", headers=admin,
                         json={"name": "leaver", "budget_tokens": BUDGET, "budget_period": "day"}).json()
        auth = {"Authorization": f"Bearer {key['secret']}"}
        seen = 0
        with httpx.stream("POST", f"{srv.api}/completions", headers=auth, timeout=60,
                          json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "stream": True,
                                "logit_bias": ENDLESS}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += bool(json.loads(line[6:])["choices"][0]["text"])
                if seen >= 30:
                    break                  # leave without reading the end (no usage event seen)
        rows = until(lambda: httpx.get(f"{srv.base}/api/v1/control/usage", headers=admin,
                                       params={"key_id": key["id"], "granularity": "day"}).json()["data"],
                     3 * FLUSH + 5, "the request cut short recorded", interval=0.2)
        [row] = rows
        assert row["requests"] == 1 and row["endpoint"] == MODEL
        assert row["total_tokens"] >= 4 + 30, row         # the prompt and at least what was streamed
        # ...and the budget saw them: the same request again would fit in BUDGET, not in what is left
        def refused() -> httpx.Response | None:
            r = httpx.post(f"{srv.api}/completions", headers=auth, timeout=60,
                           json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300})
            return r if r.status_code == 429 else None
        r = until(refused, 5, "a 429 once the budget is spent", interval=0.2)
        assert r.json()["error"]["code"] == "budget_exceeded"
