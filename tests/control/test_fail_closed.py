"""Stored keys and admin tokens fail closed while the control database is silent (issue 19,
item 12): over real HTTP, with a real PostgreSQL stopped (SIGSTOP: a host that hangs, the worst
case, where queries never return) and control_fail_closed_after = 2 s. Before: a revoked key
stayed valid for as long as the database did not answer."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from modelyard.control.admin_tokens import AdminTokenStore
from modelyard.control.db import open_database
from testkit.pg import postgres
from testkit.servers import modelyard_process, status_is, wait_for
from testkit.until import until

CONFIGURED_KEY, ADMIN = "configured-inference-key", "configured-admin-token"
BOUND = 2


def _server_processes(url: str) -> list[int]:
    """The postmaster of the server at `url` and every process it started (the backends serve
    the connections: stopping the postmaster alone would leave them answering)."""
    root = Path(parse_qs(urlsplit(url).query)["host"][0])
    postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                children.append(int(entry))
    return [postmaster, *children]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_stored_keys_and_tokens_are_refused_past_the_bound_and_come_back(tmp_path):
    with postgres() as url:        # its own server: this test stops it
        db = open_database(url)
        try:
            _, stored_admin = AdminTokenStore(db).create("cli", "stored-ops")
        finally:
            db.close()
        config = (f'[server]\ndatabase_url = "{url}"\napi_keys = ["{CONFIGURED_KEY}"]\n'
                  f'control_fail_closed_after = {BOUND}\n\n[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
                  '[[endpoints]]\nname = "remote"\nengine = "openai"\nurls = ["http://127.0.0.1:9/v1"]\n')
        srv = modelyard_process(tmp_path, config, name="failclosed").start()
        stopped: list[int] = []
        try:
            wait_for("up", status_is(srv.base + "/health"), srv)

            def get(path: str, token: str) -> httpx.Response:
                return httpx.get(srv.base + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)
            created = httpx.post(srv.base + "/api/v1/control/api-keys", json={"name": "stored"},
                                 headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
            assert created.status_code == 201, created.text
            stored_key = created.json()["secret"]
            assert get("/api/v1/endpoints", stored_key).status_code == 200
            assert get("/api/v1/control/model-endpoints", stored_admin).status_code == 200

            stopped = _server_processes(url)
            _signal_all(stopped, signal.SIGSTOP)
            stopped_at = time.monotonic()
            until(lambda: get("/api/v1/endpoints", stored_key).status_code == 503, BOUND + 8, "stored keys refused")
            assert time.monotonic() - stopped_at >= BOUND - 1.1     # not before the bound (the last read may predate the stop by a poll)
            refused = get("/api/v1/endpoints", stored_key).json()["error"]
            assert refused["code"] == "control_store_unavailable"
            assert re.search(r"has not answered for \d+ s \(fail_closed_after = 2 s\)", refused["message"])
            assert stored_key not in refused["message"]
            r = get("/api/v1/control/api-keys", stored_admin)
            assert r.status_code == 503 and "stored admin tokens are refused" in r.json()["error"]["message"]
            assert get("/api/v1/endpoints", CONFIGURED_KEY).status_code == 200      # the config file's
            metrics = get("/metrics", ADMIN).text
            assert "modelyard_control_fail_closed 1.0" in metrics
            age = float(re.search(r"^modelyard_control_sync_age_seconds (\S+)$", metrics, re.M).group(1))
            assert age > BOUND

            _signal_all(stopped, signal.SIGCONT)
            stopped = []
            until(lambda: get("/api/v1/endpoints", stored_key).status_code == 200, 15, "stored keys accepted again")
            assert get("/api/v1/control/model-endpoints", stored_admin).status_code == 200
            until(lambda: "modelyard_control_fail_closed 0.0" in get("/metrics", ADMIN).text, 5, "the metric back to 0")
        finally:
            _signal_all(stopped, signal.SIGCONT)
            srv.stop()
        log = srv.log_text()
        assert log.count("refusing stored API keys and admin tokens") == 1, srv.log_tail()
        assert log.count("control store answers again") == 1, srv.log_tail()
        assert stored_key not in log and stored_admin not in log
