"""Four real `modelyard serve` processes behind one key, quotas shared through one real Redis:
exactly the key's rpm is admitted across all four (with memory quotas it would be four times
that), and tpm reservations made in one process are seen by the others."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import os
import signal
import time

import httpx
import pytest

from modelyard.quota.policy import RETRY

from testkit.servers import MODEL, served

pytestmark = pytest.mark.model

ADMIN, KEY, TOKENS = "sk-gw-admin", "sk-gw-shared", "sk-gw-tokens"
RPM = 9
PROMPT = list(range(1000, 1010))            # 10 tokens, exactly
NO_EOG = {"0": -100, "1": -100, "2": -100}  # generation always runs to max_tokens


def config(redis_url: str) -> str:
    return (f'[server]\napi_keys = ["{ADMIN}"]\n\n[quota]\nbackend = "redis"\nredis_url = "{redis_url}"\n'
            f'processes = 4\n\n[[keys]]\nkey = "{KEY}"\nrpm = {RPM}\n\n[[keys]]\nkey = "{TOKENS}"\ntpm = 40\n\n'
            f'[[endpoints]]\nname = "{MODEL}"\ncontext = 128\nparallel = 2\nthreads = 1\n')


def test_one_window_across_four_gateways(tmp_path, redis_url):
    url, redis_pid = redis_url
    with ExitStack() as stack:
        gws = [stack.enter_context(served(tmp_path / f"gw{i}", config(url), name=f"gw{i}", key=ADMIN))
               for i in range(4)]

        def call(i: int, key: str = KEY, **body) -> int:
            return httpx.post(f"{gws[i % 4].api}/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, **body}, timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(call, range(4 * RPM)))
        assert codes.count(200) == RPM and codes.count(429) == 3 * RPM, codes
        # tpm: 10 + 6 = 16 per request; 40 fits two, wherever they land
        body = {"prompt": PROMPT, "max_tokens": 6, "logit_bias": NO_EOG}
        assert [call(i, TOKENS, **body) for i in range(3)] == [200, 200, 429]
        def fallback(i: int) -> str:
            text = httpx.get(gws[i].base + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
            return next(line for line in text.splitlines() if line.startswith("modelyard_quota_fallback "))
        assert fallback(0) == "modelyard_quota_fallback 0.0"
        # Redis hangs: this gateway gives the key its share, 9 // 4 = 2 a minute, never unlimited
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            assert [call(0) for _ in range(4)] == [200, 200, 429, 429]
            assert fallback(0) == "modelyard_quota_fallback 1.0"
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        time.sleep(RETRY + 0.2)
        assert call(0) == 429                  # the shared window again: it is full
        assert fallback(0) == "modelyard_quota_fallback 0.0"
        assert "Redis unreachable for quotas" in gws[0].log_text() and "answers again" in gws[0].log_text()
