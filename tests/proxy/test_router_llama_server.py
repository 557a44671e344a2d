"""A remote endpoint on demand in front of a REAL llama-server in router mode (issue 24): the one
`scripts/bench-peers` builds from the llama.cpp modelyard runs, started with `--models-dir` (the
store's smollm2-135m) and `--no-models-autoload`, so only the gateway's `POST /models/load`
brings the model up. The gateway unloads it after keep_alive idle (`POST /models/unload`: the
router lists it "unloaded") and loads it again for the next request, which is served.

Needs the built peer, which `scripts/install --dev` builds (scripts/bench-peers): without it
the test fails, saying how to build it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from modelyard.settings import Settings
from modelyard.store import ModelStore
from testkit.servers import ServerProcess, free_port, served, wait_for
from testkit.until import until

pytestmark = pytest.mark.model

PEER = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modelyard" / "peers" / "llama-server"


def router_status(base: str, model: str) -> str | None:
    listed = httpx.get(base + "/models", timeout=10, trust_env=False).json().get("data", [])
    return next(((m.get("status") or {}).get("value") for m in listed if m.get("id") == model), None)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    assert PEER.is_file(), f"{PEER} is not built: scripts/install --dev builds it (scripts/bench-peers)"
    models = tmp_path_factory.mktemp("router-models")
    # the store's file, fetched now if no earlier test did (the default store, as the gateway's)
    (models / "smol.gguf").symlink_to(ModelStore(Settings().store_dir, progress=False).resolve("smollm2-135m"))
    port = free_port()
    srv = ServerProcess([str(PEER), "--models-dir", str(models), "--no-models-autoload", "--models-max", "1",
                         "-c", "512", "-t", "1", "--host", "127.0.0.1", "--port", str(port)],
                        port, models / "router.log", name="router", ready_path="/health")
    srv.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for("the router up", lambda: httpx.get(base + "/models", timeout=5).status_code == 200, srv)
        listed = httpx.get(base + "/models", timeout=10).json()["data"]
        yield base, listed[0]["id"]
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def gateway(router, tmp_path_factory) -> Iterator[ServerProcess]:
    base, model = router
    config = f"""\
[server]
load_timeout = 120

[[endpoints]]
name = "routed"
engine = "openai"
urls = ["{base}/v1"]
upstream_model = "{model}"
upstream_server = "llama-server"
load = "on_demand"
keep_alive = 2
"""
    with served(tmp_path_factory.mktemp("router-gw"), config) as srv:
        yield srv


def complete(srv: ServerProcess) -> httpx.Response:
    return httpx.post(srv.base + "/v1/completions", json={"model": "routed", "prompt": "The capital of France is",
                                                          "max_tokens": 4, "temperature": 0},
                      timeout=120, trust_env=False)


def test_the_gateway_loads_and_unloads_the_routers_model(router, gateway):
    base, model = router
    assert router_status(base, model) == "unloaded"         # no autoload: nothing loads it but us
    first = complete(gateway)
    assert first.status_code == 200, first.text
    assert router_status(base, model) == "loaded"
    until(lambda: router_status(base, model) == "unloaded", 60, "the router's model unloaded after 2 s idle")
    again = complete(gateway)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert router_status(base, model) == "loaded"
