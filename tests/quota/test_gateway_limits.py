"""Two real `modelyard serve` processes on one real redis-server and one control store (a SQLite
file both open): a stored key's max_parallel is one set of leases across both, its token budget one
counter; Redis hung with `kill -STOP` gives each gateway its share (max_parallel / processes), says
so in modelyard_quota_fallback and the log, and shares again after `kill -CONT`; the slots of a
gateway killed with -9 lapse once their lease ends."""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack

import httpx
import pytest

from modelyard.quota.policy import RETRY

from testkit.servers import MODEL, served
from testkit.until import until

pytestmark = pytest.mark.model

ADMIN = "adm-gw-token"
PROMPT = list(range(1000, 1010))            # 10 tokens, exactly
NO_EOG = {"0": -100, "1": -100, "2": -100}  # generation always runs to max_tokens


def config(redis_url: str, db: str) -> str:
    return (f'[server]\ndatabase_url = "sqlite:///{db}"\n\n[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[quota]\nbackend = "redis"\nredis_url = "{redis_url}"\nprocesses = 2\n\n'
            f'[[endpoints]]\nname = "{MODEL}"\ncontext = 2048\nparallel = 4\nthreads = 1\n')


class Stream:
    """A streaming completion held open after its first chunk (its slot is in use)."""

    def __init__(self, gw, key: str) -> None:
        self.client = httpx.Client(timeout=60)
        self.cm = self.client.stream("POST", f"{gw.api}/completions", headers={"Authorization": f"Bearer {key}"},
                                     json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1800,
                                           "logit_bias": NO_EOG, "stream": True})
        r = self.cm.__enter__()
        if r.status_code != 200:
            body = r.read()
            self.close()
            raise AssertionError(body)
        self.lines = r.iter_lines()      # kept: dropping the iterator would close the connection
        first = next(line for line in self.lines if line.startswith("data: "))
        assert "error" not in first, first

    def close(self) -> None:
        self.cm.__exit__(None, None, None)
        self.client.close()


def opened(gw, key: str, timeout: float = 30) -> Stream:
    """A Stream, retried (bounded) while the key's slots are taken."""
    return until(lambda: Stream(gw, key), timeout, "a slot", interval=0.2, retry_on=(AssertionError,))


def code(gw, key: str, **body) -> tuple[int, str | None]:
    r = httpx.post(f"{gw.api}/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, **body})
    return r.status_code, (r.json().get("error") or {}).get("code") if r.status_code != 200 else None


def fallback(gw) -> str:
    text = httpx.get(gw.base + "/metrics", timeout=10).text
    return next(line for line in text.splitlines() if line.startswith("modelyard_quota_fallback "))


def test_parallel_and_budget_across_two_gateways_on_redis(tmp_path, redis_url):
    url, redis_pid = redis_url
    with ExitStack() as stack:
        gws = [stack.enter_context(served(tmp_path / f"gw{i}", config(url, tmp_path / "control.db"), name=f"gw{i}"))
               for i in range(2)]
        admin = httpx.Client(base_url=gws[0].base + "/api/v1/control", headers={"Authorization": f"Bearer {ADMIN}"})
        made = admin.post("/api-keys", json={"name": "par", "max_parallel": 2}).json()
        key = made["secret"]
        until(lambda: code(gws[1], key)[0] == 200, 5, "the key known to both")
        # one set of in-flight leases: one stream on each gateway fills max_parallel = 2
        streams = [Stream(gws[0], key), Stream(gws[1], key)]
        assert code(gws[0], key) == (429, "parallel_limit_exceeded")
        assert code(gws[1], key) == (429, "parallel_limit_exceeded")
        streams.pop(0).close()                       # gw0's ends: a slot, wherever it is asked for
        until(lambda: code(gws[1], key)[0] == 200, 10, "gw0's slot free on gw1")
        # Redis hangs: each gateway allows 2 // 2 = 1 in flight by itself, never unlimited
        streams.pop().close()
        until(lambda: code(gws[1], key)[0] == 200, 10, "both slots free")
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            held = Stream(gws[1], key)
            assert code(gws[1], key) == (429, "parallel_limit_exceeded")
            assert fallback(gws[1]) == "modelyard_quota_fallback 1.0"
            held.close()
            until(lambda: code(gws[1], key)[0] == 200, 10, "the local slot free while Redis hangs")
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        time.sleep(RETRY + 0.2)
        assert code(gws[1], key)[0] == 200
        assert fallback(gws[1]) == "modelyard_quota_fallback 0.0"
        log = gws[1].log_text()
        assert "Redis unreachable for quotas" in log and "answers again" in log and key not in log
        # a gateway killed with a stream open: its lease lapses (LEASE seconds), the key is not stuck.
        # (Calls that timed out while Redis hung reached it when it woke: their leases, held by
        # nobody, count until they lapse too: over-counted for LEASE seconds, never under.)
        streams = [opened(gws[0], key), opened(gws[1], key)]
        assert code(gws[1], key) == (429, "parallel_limit_exceeded")
        gws[0].kill()
        streams[0].client.close()
        until(lambda: code(gws[1], key)[0] == 200, 30, "the killed gateway's lease lapsed")
        streams[1].close()
        admin.close()


def test_budget_is_one_counter_across_two_gateways(tmp_path, redis_url):
    url, _ = redis_url
    with ExitStack() as stack:
        gws = [stack.enter_context(served(tmp_path / f"gw{i}", config(url, tmp_path / "control.db"), name=f"gw{i}"))
               for i in range(2)]
        with httpx.Client(base_url=gws[0].base + "/api/v1/control", headers={"Authorization": f"Bearer {ADMIN}"}) as a:
            # 32: two requests of 16 fit exactly (each holds its 16 from reserve to settle)
            key = a.post("/api-keys", json={"name": "bud", "budget_tokens": 32, "budget_period": "day"}).json()["secret"]
        body = {"prompt": PROMPT, "max_tokens": 6, "logit_bias": NO_EOG}      # 16 tokens each
        until(lambda: code(gws[1], key, **body)[0] == 200, 5, "the key known to both")
        assert code(gws[0], key, **body)[0] == 200                             # 32 used
        r = httpx.post(f"{gws[1].api}/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": MODEL, **body})
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded", r.text
        assert "32 tokens per day" in r.json()["error"]["message"] and "32 used" in r.json()["error"]["message"]
        assert code(gws[0], key, **body) == (429, "budget_exceeded")
