"""keep_alive, reloads and the control plane's load/unload with the lifecycle, over real HTTP with
the real default model (issue 24): an endpoint idle past its keep_alive is unloaded and loads
again on its next request, giving the same bits; a request's own keep_alive (Ollama's field),
the longest pending one winning; bad keep_alives and budgets refused naming the field; a model
that fails to load gives every waiting request the error; a stop while a model loads on demand
ends cleanly."""

from __future__ import annotations

import concurrent.futures
import signal
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.servers import ServerProcess, modelyard_process, served, wait_for
from testkit.until import until

pytestmark = pytest.mark.model

KEY, ADMIN = "sk-keep-alive", "adm-keep-alive"
SMOL, BROKEN = "smol", "broken"
SHAPE = "context = 256\nparallel = 2\nthreads = 1\nprefix_cache_mib = 0\n"
SAMPLED = {"prompt": "Write a word:", "max_tokens": 12, "temperature": 0.9, "seed": 7, "logprobs": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("keep-alive")
    (d / "broken.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)    # a header that lies
    config = f"""\
[server]
api_keys = ["{KEY}"]
load_timeout = 120

[[admin_tokens]]
name = "ops"
token = "{ADMIN}"

[[endpoints]]
name = "{SMOL}"
model = "smollm2-135m"
load = "on_demand"
keep_alive = 1
{SHAPE}
[[endpoints]]
name = "{BROKEN}"
model = "{d / 'broken.gguf'}"
load = "on_demand"
{SHAPE}"""
    with served(d, config, key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=180,
                      trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def admin(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base + "/api/v1/control", headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=60, trust_env=False) as c:
        yield c


def endpoint(http: httpx.Client, name: str) -> dict:
    r = http.get(f"/api/v1/endpoints/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def counter(http: httpx.Client, name: str, label: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("endpoint") == label:
                return sample.value
    raise AssertionError(f"{name}{{endpoint={label!r}}} is not in /metrics")


def complete(http: httpx.Client, model: str, **body) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2, **body})


def unloaded(http: httpx.Client, name: str) -> bool:
    return not endpoint(http, name)["loaded"]


def idle(http: httpx.Client, name: str) -> dict:
    """The endpoint once no request holds it (a response's end reaches the client a moment before
    its ledger closes and lets the endpoint go)."""
    return until(lambda: (lambda ep: ep if ep["pending"] == 0 else None)(endpoint(http, name)), 10,
                 f"{name} idle")


def test_idle_past_keep_alive_unloads_and_the_reload_gives_the_same_bits(http):
    first = complete(http, SMOL, **SAMPLED)
    assert first.status_code == 200, first.text
    ep = idle(http, SMOL)
    assert ep["loaded"] and ep["expires_at"] is not None
    assert ep["expires_at"] - ep["last_used"] == pytest.approx(1, abs=0.01)        # its keep_alive
    until(lambda: unloaded(http, SMOL), 30, "smol unloaded after 1 s idle")
    ep = endpoint(http, SMOL)
    assert ep["state"] == "unloaded" and ep["ready"] and ep["resident_mib"] is None
    assert counter(http, "modelyard_endpoint_idle_unloads_total", SMOL) >= 1
    loads = counter(http, "modelyard_endpoint_loads_total", SMOL)
    again = complete(http, SMOL, **SAMPLED)
    assert again.status_code == 200, again.text
    assert counter(http, "modelyard_endpoint_loads_total", SMOL) == loads + 1
    # the same request, before the unload and after the reload: the same text, the same logprobs
    assert again.json()["choices"] == first.json()["choices"]


def test_the_longest_keep_alive_a_pending_request_sent_wins(http):
    until(lambda: unloaded(http, SMOL), 30, "smol unloaded (so both requests wait for one load together)")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda ka: complete(http, SMOL, keep_alive=ka, max_tokens=8), (0, 3600)))
    assert [r.status_code for r in answers] == [200, 200]
    ep = idle(http, SMOL)
    assert ep["loaded"] and ep["expires_at"] - ep["last_used"] == pytest.approx(3600, abs=1)
    never = complete(http, SMOL, keep_alive=-1)
    assert never.status_code == 200 and idle(http, SMOL)["expires_at"] is None
    idle_unloads = counter(http, "modelyard_endpoint_idle_unloads_total", SMOL)
    assert complete(http, SMOL, keep_alive=0).status_code == 200        # Ollama's "unload now"
    until(lambda: unloaded(http, SMOL), 30, "smol unloaded after a keep_alive of 0")
    assert counter(http, "modelyard_endpoint_idle_unloads_total", SMOL) == idle_unloads + 1


@pytest.mark.parametrize("value", [-2, -0.5, 31_536_001, 1e300, "5m", True])
def test_a_bad_keep_alive_is_a_422_naming_it(http, value):
    for route, body in (("/v1/completions", {"model": SMOL, "prompt": "Hi"}),
                        ("/v1/chat/completions", {"model": SMOL, "messages": [{"role": "user", "content": "Hi"}]}),
                        ("/v1/embeddings", {"model": SMOL, "input": "Hi"})):
        r = http.post(route, json={**body, "keep_alive": value})
        assert r.status_code == 422, (route, value, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "keep_alive"]


def test_a_model_that_fails_to_load_gives_every_waiting_request_the_error(http):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: complete(http, BROKEN), range(3)))
    for r in answers:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "model_not_ready" and "failed" in error["message"]
        assert "broken.gguf" in error["message"]        # the reason, to a key holder
    assert endpoint(http, BROKEN)["state"] == "failed"
    assert counter(http, "modelyard_endpoint_loads_total", BROKEN) == 0
    assert counter(http, "modelyard_endpoint_load_waiting", BROKEN) == 0


def test_the_control_plane_loads_and_unloads_beside_the_policy(http, admin):
    r = admin.post("/model-endpoints", json={"name": "rt", "model": "smollm2-135m", "context": 256, "parallel": 2,
                                             "threads": 1, "load": "on_demand", "keep_alive": -3})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "keep_alive"], r.text
    r = admin.post("/model-endpoints", json={"name": "rt", "model": "smollm2-135m", "context": 256, "parallel": 2,
                                             "threads": 1, "load": "on_demand", "keep_alive": 1})
    assert r.status_code in (200, 201), r.text
    rt = r.json()["id"]
    until(lambda: "rt" in {e["name"] for e in http.get("/api/v1/endpoints").json()["endpoints"]}, 30, "rt listed")
    ep = endpoint(http, "rt")
    assert ep["state"] == "unloaded" and ep["ready"] and not ep["loaded"]       # on demand: served, not loaded
    assert complete(http, "rt").status_code == 200 and endpoint(http, "rt")["loaded"]
    # an admin's unload holds: requests are refused, not loaded
    assert admin.post(f"/model-endpoints/{rt}/unload").status_code == 202
    until(lambda: endpoint(http, "rt")["state"] == "unloaded", 30, "rt unloaded by the admin")
    refused = complete(http, "rt")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_ready"
    assert not endpoint(http, "rt")["loaded"]
    # an admin's load loads now, without a request; then the policy unloads it when idle
    loads = counter(http, "modelyard_endpoint_loads_total", "rt")
    assert admin.post(f"/model-endpoints/{rt}/load").status_code == 202
    until(lambda: endpoint(http, "rt")["loaded"], 60, "rt loaded by the admin")
    until(lambda: unloaded(http, "rt"), 30, "rt unloaded after 1 s idle")
    assert admin.get(f"/model-endpoints/{rt}").json()["desired"] == "loaded"
    # unloaded by the policy, an admin's load still loads it at once
    assert admin.post(f"/model-endpoints/{rt}/load").status_code == 202
    until(lambda: counter(http, "modelyard_endpoint_loads_total", "rt") == loads + 2, 60, "rt loaded again")
    assert complete(http, "rt").status_code == 200
    assert counter(http, "modelyard_endpoint_loads_total", "rt") in (loads + 2, loads + 3)   # 3: idle again first
    assert admin.delete(f"/model-endpoints/{rt}").status_code in (200, 202, 204)


def _exits(tmp_path: Path, config: str) -> str:
    """`modelyard serve` with `config`, which must refuse to start; its log."""
    srv = modelyard_process(tmp_path, config)
    srv.start()
    try:
        until(srv.exited, 120, "the server refusing its configuration")
        assert srv.proc is not None and srv.proc.returncode == 2, srv.log_tail()
        return srv.log_text()
    finally:
        srv.stop(timeout=5)


def test_a_budget_no_model_fits_is_refused_at_start(tmp_path):
    log = _exits(tmp_path, f'[server]\nmemory_budget_mib = 64\n\n[[endpoints]]\nname = "{SMOL}"\n'
                           f'model = "smollm2-135m"\n{SHAPE}')
    assert "memory_budget_mib = 64" in log and f"{SMOL!r} needs" in log, log


@pytest.mark.parametrize("value", ["-5", "31536001", '"5m"'])
def test_a_bad_keep_alive_in_the_config_is_refused_at_start(tmp_path, value):
    log = _exits(tmp_path, f'[[endpoints]]\nname = "{SMOL}"\nmodel = "smollm2-135m"\nkeep_alive = {value}\n')
    assert "keep_alive must be -1 (never unload) or from 0 to 31536000 seconds" in log, log


def test_a_stop_while_a_model_loads_on_demand_ends_the_waiting_request(tmp_path):
    srv = modelyard_process(tmp_path, f'[server]\nload_timeout = 120\n\n[[endpoints]]\nname = "gemma"\n'
                                      f'model = "gemma3-270m"\nload = "on_demand"\n{SHAPE}')
    srv.start()
    answer: dict = {}
    try:
        wait_for("ready", lambda: httpx.get(srv.base + "/ready", timeout=5).status_code == 200, srv)

        def ask() -> None:
            try:
                answer["r"] = httpx.post(srv.base + "/v1/completions", timeout=120, trust_env=False,
                                         json={"model": "gemma", "prompt": "Hi", "max_tokens": 2})
            except httpx.HTTPError as exc:
                answer["r"] = exc
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        until(lambda: httpx.get(srv.base + "/api/v1/endpoints/gemma", timeout=5).json()["pending"] == 1,
              30, "the request waiting for gemma's load")
        srv.signal(signal.SIGTERM)
        asker.join(120)
        assert not asker.is_alive(), "the waiting request hung through the stop"
        # it was served (the load finished within the grace period) or told the endpoint stopped
        r = answer["r"]
        assert isinstance(r, httpx.Response) and r.status_code in (200, 400), r
        until(srv.exited, 60, "the server's exit")
        assert srv.proc is not None and srv.proc.returncode == 0, srv.log_tail()
    finally:
        srv.stop(timeout=5)
