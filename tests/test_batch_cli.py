"""`modelyard batch` (cli.py + batch_client.py) against a small fake of OpenAI's Files and Batches
routes, served over real HTTP (testkit.upstream.running): a client test, so the server side is a
fake that keeps OpenAI's shapes (shared/spec/openai/openapi.yaml) and advances a batch one step
per retrieve. The end-to-end run against a real gateway is tests/api/test_batches.py's last test."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from modelyard import batch_client as bc
from modelyard import cli
from testkit.upstream import running

KEY = "sk-batch-client-test"


class FakeBatchAPI:
    """/v1/files (upload, content) and /v1/batches (create, retrieve, cancel), OpenAI's way."""

    def __init__(self) -> None:
        self.files: dict[str, dict] = {}
        self.content: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.lines: dict[str, list[dict]] = {}
        self.keys_seen: set[str | None] = set()

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        def refuse(status: int, message: str, param: str | None = None):
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                           "param": param, "code": None}}, status)

        def authed(handler):
            async def wrapped(request):
                auth = request.headers.get("authorization")
                self.keys_seen.add(auth)
                if auth != f"Bearer {KEY}":
                    return refuse(401, "Incorrect API key provided")
                return await handler(request)
            return wrapped

        def new_file(name: str, data: bytes, purpose: str) -> dict:
            fid = f"file-{len(self.files) + 1}"
            self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                               "filename": name, "purpose": purpose, "status": "processed"}
            self.content[fid] = data
            return self.files[fid]

        async def upload(request):
            form = await request.form()
            if form.get("purpose") != "batch":
                return refuse(400, "purpose must be batch", "purpose")
            f = form["file"]
            return JSONResponse(new_file(f.filename, await f.read(), "batch"))

        async def content(request):
            fid = request.path_params["fid"]
            if fid not in self.content:
                return refuse(404, f"No such File object: {fid}", "id")
            return Response(self.content[fid], media_type="application/octet-stream")

        async def create(request):
            body = await request.json()
            fid = body["input_file_id"]
            if fid not in self.content:
                return refuse(404, f"No such File object: {fid}", "input_file_id")
            lines = [json.loads(x) for x in self.content[fid].decode().splitlines() if x.strip()]
            bid = f"batch_{len(self.batches) + 1}"
            self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                                 "input_file_id": fid, "completion_window": body["completion_window"],
                                 "status": "validating", "output_file_id": None, "error_file_id": None,
                                 "created_at": int(time.time()), "metadata": body.get("metadata"),
                                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
            self.lines[bid] = lines
            return JSONResponse(self.batches[bid])

        async def retrieve(request):
            bid = request.path_params["bid"]
            if bid not in self.batches:
                return refuse(404, f"No such Batch object: {bid}", "batch_id")
            self._advance(bid, new_file)
            return JSONResponse(self.batches[bid])

        async def cancel(request):
            b = self.batches[request.path_params["bid"]]
            if b["status"] in ("validating", "in_progress"):
                b["status"] = "cancelling"
            return JSONResponse(b)

        return Starlette(routes=[
            Route("/v1/files", authed(upload), methods=["POST"]),
            Route("/v1/files/{fid}/content", authed(content)),
            Route("/v1/batches", authed(create), methods=["POST"]),
            Route("/v1/batches/{bid}", authed(retrieve)),
            Route("/v1/batches/{bid}/cancel", authed(cancel), methods=["POST"]),
        ])

    def _advance(self, bid: str, new_file) -> None:
        """One step per retrieve: validating -> in_progress, one line at a time, then completed
        with its files (a line whose body says "fail" fails); cancelling -> cancelled."""
        b = self.batches[bid]
        c = b["request_counts"]
        if b["status"] == "validating":
            b["status"] = "in_progress"
        elif b["status"] == "cancelling":
            b["status"] = "cancelled"
        elif b["status"] == "in_progress":
            line = self.lines[bid][c["completed"] + c["failed"]]
            c["failed" if "fail" in json.dumps(line["body"]) else "completed"] += 1
            if c["completed"] + c["failed"] == c["total"]:
                out, err = [], []
                for x in self.lines[bid]:
                    if "fail" in json.dumps(x["body"]):
                        err.append({"id": "r", "custom_id": x["custom_id"], "response": None,
                                    "error": {"code": "bad", "message": "it said fail"}})
                    else:
                        out.append({"id": "r", "custom_id": x["custom_id"], "error": None,
                                    "response": {"status_code": 200, "request_id": "q", "body": {"echo": x["body"]}}})
                b["output_file_id"] = new_file("out.jsonl", "".join(json.dumps(o) + "\n" for o in out).encode(),
                                               "batch_output")["id"]
                if err:
                    b["error_file_id"] = new_file("err.jsonl", "".join(json.dumps(o) + "\n" for o in err).encode(),
                                                  "batch_output")["id"]
                b["status"] = "completed"


def _lines(n: int, fail: set[int] = frozenset()) -> str:
    return "".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "m", "messages": [{"role": "user",
                                                                    "content": "fail" if i in fail else f"hi {i}"}]}})
                   + "\n" for i in range(n))


@pytest.fixture
def api():
    fake = FakeBatchAPI()
    with running(fake.app()) as base:
        yield fake, base + "/v1"


def test_submit_follows_and_downloads_output_and_errors(api, tmp_path, monkeypatch, capsys):
    fake, url = api
    src = tmp_path / "in.jsonl"
    src.write_text(_lines(5, fail={3}))
    out = tmp_path / "results.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", KEY)          # the key from the environment
    rc = cli.main(["batch", "submit", str(src), "--url", url, "--output", str(out), "--metadata", "team=eval",
                   "--poll", "0.01"])
    captured = capsys.readouterr()
    assert rc == 0
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["req-0", "req-1", "req-2", "req-4"]
    assert results[0]["response"]["status_code"] == 200
    errors = [json.loads(x) for x in (tmp_path / "results.errors.jsonl").read_text().splitlines()]
    assert [e["custom_id"] for e in errors] == ["req-3"]
    assert "batch_1  completed  4 completed, 1 failed of 5" in captured.out
    # the progress (not a terminal: one line per change) went to stderr, ending at 100%
    progress = [x for x in captured.err.splitlines() if x.startswith("batch_1  ")]
    assert progress[0] == "batch_1  in_progress    0%  0/5"
    assert progress[-1] == "batch_1  completed  100%  5/5 (1 failed)"
    assert len(progress) == 6                      # in_progress at 0..4 lines done, completed
    assert fake.batches["batch_1"]["metadata"] == {"team": "eval"}
    assert fake.keys_seen == {f"Bearer {KEY}"}
    assert not list(tmp_path.glob("*.part"))


def test_the_bar_redraws_in_place_on_a_terminal():
    err = io.StringIO()
    bar = bc.ProgressBar(err, tty=True)
    for done in (0, 1, 1, 2):
        bar.show({"id": "batch_x", "status": "in_progress", "request_counts": {"total": 4, "completed": done,
                                                                              "failed": 0}})
    bar.end()
    assert err.getvalue() == ("\rbatch_x  in_progress    0%  0/4\rbatch_x  in_progress   25%  1/4"
                              "\rbatch_x  in_progress   50%  2/4\n")


def test_status_cancel_download(api, tmp_path, capsys):
    fake, url = api
    client = bc.BatchClient(url, KEY)
    src = tmp_path / "in.jsonl"
    src.write_text(_lines(3))
    created = bc.submit(client, src, "/v1/chat/completions", None, follow=False, say=lambda s: None)
    base = ["--url", url, "--api-key", KEY]
    assert cli.main(["batch", "status", created["id"], *base]) == 0
    assert "batch_1  in_progress  0 completed, 0 failed of 3" in capsys.readouterr().out
    # its results are not there yet: a clear refusal, no file written
    assert cli.main(["batch", "download", created["id"], *base, "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "batch_1 is in_progress" in capsys.readouterr().err
    assert cli.main(["batch", "cancel", created["id"], *base]) == 0
    assert "batch_1  cancelling" in capsys.readouterr().out
    assert cli.main(["batch", "status", created["id"], *base]) == 0
    assert "batch_1  cancelled  1 completed" in capsys.readouterr().out
    # a finished batch downloads
    src.write_text(_lines(2))
    done = bc.submit(client, src, "/v1/chat/completions", None, say=lambda s: None, poll=0.01)
    assert done["status"] == "completed"
    assert cli.main(["batch", "download", done["id"], *base, "--output", str(tmp_path / "o.jsonl")]) == 0
    assert [json.loads(x)["custom_id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == ["req-0", "req-1"]
    assert not (tmp_path / "o.errors.jsonl").exists()
    client.close()


def test_bad_input_is_refused_before_any_upload(api, tmp_path, capsys):
    fake, url = api
    src = tmp_path / "in.jsonl"
    src.write_text(_lines(1))
    base = ["--url", url, "--api-key", KEY]
    assert cli.main(["batch", "submit", str(src), *base, "--endpoint", "/v1/images"]) == 2
    assert "endpoint is '/v1/images'; it must be one of /v1/chat/completions" in capsys.readouterr().err
    assert cli.main(["batch", "submit", str(tmp_path / "nope.jsonl"), *base]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["batch", "submit", str(src), *base, "--metadata", "novalue"]) == 2
    assert "--metadata takes KEY=VALUE, got 'novalue'" in capsys.readouterr().err
    assert cli.main(["batch", "submit", str(src), *base, "--poll", "0"]) == 2
    assert "--poll is 0 seconds; it must be between 0.01 and 600" in capsys.readouterr().err
    assert fake.files == {}
    # a wrong key: the server's message, and its status
    assert cli.main(["batch", "status", "batch_9", "--url", url, "--api-key", "wrong"]) == 2
    assert "401: Incorrect API key provided" in capsys.readouterr().err
    assert cli.main(["batch", "status", "batch_9", *base]) == 2
    assert "404: No such Batch object: batch_9" in capsys.readouterr().err
