"""Unloading or deleting an embeddings endpoint while a large request is being tokenized (issue 19,
item 9), over real HTTP on a real `modelyard serve` with the control plane on: the engine thread
used to free the model under the worker thread tokenizing the request's inputs (a use after
free: the process died). Now the stop waits for the input being tokenized (local/vocab_guard),
and the request gets its answer or a clean not-ready error, never a crash or a 500.

The request has the 2,048 inputs the API allows, each ~4 kB (8 MB of text: ~0.3 s of tokenizing
here); grace_period = 0, so the unload or delete stops the engine at once instead of letting the
request finish. Rounds alternate unload and delete, each issued at another moment of the
tokenizing, so that the race is hit, not hoped for; they are bounded (ROUNDS)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from testkit.servers import served
from testkit.until import until
from test_admin_api import ADMIN, INFER, ctl
from test_model_endpoints import wait_state

pytestmark = pytest.mark.model

MINILM = "minilm-l6-v2"
ENDPOINT = {"model": MINILM, "context": 512, "parallel": 4, "threads": 1}
ROUNDS = 8
DELAYS = (0.0, 0.03, 0.08, 0.15)      # seconds after the request is in flight (tokenizing)
TEXT = "The history of the lighthouse keepers of the northern coast, their lamps and their logs. " * 44
INPUTS = [f"{i} {TEXT}" for i in range(2048)]


def config(db: str) -> str:
    # One config endpoint (cheap, one thread), so no default model loads; the raced endpoint is a
    # run-time one (config endpoints cannot be unloaded or deleted).
    return (f'[server]\napi_keys = ["{INFER}"]\nlog_level = "info"\ngrace_period = 0\ndatabase_url = "{db}"\n\n'
            f'[limits]\nmax_body_bytes = 16000000\n\n'
            f'[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[endpoints]]\nname = "keep"\nmodel = "{MINILM}"\ncontext = 128\nparallel = 1\nthreads = 1\n')


def in_flight(srv, name: str) -> int:
    r = httpx.get(f"{srv.base}/api/v1/endpoints/{name}", headers=srv.headers, timeout=10)
    return r.json().get("in_flight", 0) if r.status_code == 200 else 0


def test_unload_or_delete_while_tokenizing_2048_inputs_never_crashes(tmp_path):
    with served(tmp_path, config(f"sqlite:///{tmp_path / 'control.db'}"), key=INFER) as srv, \
            ctl(srv.base, ADMIN) as admin:
        ep = None
        for round_ in range(ROUNDS):
            delete = round_ % 2 == 1
            name = f"race-{round_}"
            if ep is None:
                r = admin.post("/model-endpoints", json={"name": name, **ENDPOINT})
                assert r.status_code == 201, r.text
                ep = r.json()
            else:
                assert admin.post(f"/model-endpoints/{ep['id']}/load").status_code == 202
            wait_state(admin, ep["id"], "ready")
            name = ep["name"]

            answer: dict = {}

            def embed() -> None:
                try:
                    answer["r"] = httpx.post(f"{srv.api}/embeddings", headers=srv.headers, timeout=120,
                                             json={"model": name, "input": INPUTS, "truncate": True})
                except httpx.TransportError as exc:     # the server died under it: said below
                    answer["r"] = exc
            request = threading.Thread(target=embed)
            request.start()
            until(lambda: in_flight(srv, name) or not request.is_alive(), 60, "the request reached the engine",
                  interval=0.01)
            time.sleep(DELAYS[round_ % len(DELAYS)])
            r = admin.delete(f"/model-endpoints/{ep['id']}") if delete else \
                admin.post(f"/model-endpoints/{ep['id']}/unload")
            assert r.status_code == 202, r.text
            request.join(120)
            assert not request.is_alive()
            assert not srv.exited(), f"the server died (round {round_}):\n{srv.log_tail()}"
            assert httpx.get(srv.base + "/health", timeout=10).status_code == 200

            got = answer["r"]
            assert isinstance(got, httpx.Response), got
            if got.status_code == 200:
                assert len(got.json()["data"]) == len(INPUTS)
            else:
                assert got.status_code in (400, 503), (round_, got.status_code, got.text[:500])
                err = got.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, err
                assert err["type"] in ("model_not_ready", "server_overloaded"), err
            if delete:
                wait_state(admin, ep["id"], "404")
                ep = None
            else:
                wait_state(admin, ep["id"], "unloaded")
        # The rounds raced the stop against the request; the server is still serving.
        keep = httpx.post(f"{srv.api}/embeddings", headers=srv.headers, timeout=60,
                          json={"model": "keep", "input": "still here"})
        assert keep.status_code == 200, keep.text
