"""OpenAI's Files and Batch APIs over real HTTP with the official `openai` client, against a real
`modelyard serve` (smollm2-135m and minilm-l6-v2 embedded, a SQLite control database): uploads,
chat / completions / embeddings batches of a few hundred lines whose bodies equal the online
answers, cancel, lists, another key's 404s, every malformed input kind, and a file over the
limit refused while it streams in."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from testkit.openai_document import conforms
from testkit.servers import OPENAI_PREFIX, served
from testkit.until import until
from modelyard.control.db import open_database

pytestmark = pytest.mark.model

KEY, OTHER, LIMITED = "sk-batch-owner", "sk-batch-other", "sk-batch-limited"
SMOL, MINILM = "smollm2-135m", "minilm-l6-v2"
MAX_FILE = 200_000            # bytes: a small [server] max_file_bytes, for the over-limit test
LINES = 200

CONFIG = f"""\
[server]
api_keys = ["{KEY}", "{OTHER}"]
log_level = "info"
max_file_bytes = {MAX_FILE}
batch_lease_seconds = 3
batch_concurrency = 4

[[keys]]
key = "{LIMITED}"
endpoints = ["{MINILM}"]

[[endpoints]]
name = "{SMOL}"
model = "{SMOL}"
context = 512
parallel = 4
threads = 1

[[endpoints]]
name = "{MINILM}"
model = "{MINILM}"
context = 256
threads = 1
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served(tmp_path_factory.mktemp("batches"), CONFIG, key=KEY) as srv:
        yield srv


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + OPENAI_PREFIX, api_key=key, max_retries=0, timeout=120)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def line(i: int, url: str, body: dict) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}


def run(c: openai.OpenAI, data: bytes, endpoint: str, timeout: float = 600):
    f = c.files.create(file=("input.jsonl", data), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
    return until(lambda: (r := c.batches.retrieve(b.id)).status in ("completed", "failed", "cancelled") and r,
                 timeout, f"batch {b.id} ended")


def documented(server, path: str) -> dict:
    """The object as answered over HTTP, less its null fields: OpenAI's own API sends null for a
    time not reached yet or a file not made, which its document types as integer or string only."""
    r = httpx.get(server.base + OPENAI_PREFIX + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return {k: v for k, v in r.json().items() if v is not None}


def output(c: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines()] if file_id else []


def request_log(server) -> list[dict]:
    """The server's request log lines (api/middleware/request_log), parsed."""
    return [json.loads(x[x.index("{"):]) for x in server.log_text().splitlines() if '"route": ' in x]


def test_chat_batch_equals_online(server):
    c = client(server)
    bodies = [{"model": SMOL, "messages": [{"role": "user", "content": f"Count to {i % 7 + 2}."}], "max_tokens": 6,
               "temperature": 0} for i in range(LINES)]
    bodies[1] = {**bodies[1], "temperature": 0.9, "seed": 11}       # seeded sampling too
    done = run(c, jsonl([line(i, "/v1/chat/completions", b) for i, b in enumerate(bodies)]), "/v1/chat/completions")
    assert done.status == "completed", done
    assert done.request_counts.model_dump() == {"total": LINES, "completed": LINES, "failed": 0}
    assert done.error_file_id is None
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "expires_at"):
        assert getattr(done, stamp), stamp
    conforms("Batch", documented(server, f"/batches/{done.id}"))
    out = output(c, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(LINES))
    by_id = {o["custom_id"]: o for o in out}
    for i in (0, 1, 5, LINES - 1):
        online = c.chat.completions.with_raw_response.create(**bodies[i]).http_response.json()
        got = by_id[f"req-{i}"]["response"]
        assert got["status_code"] == 200
        assert got["body"]["choices"] == online["choices"]
        assert got["body"]["usage"]["completion_tokens"] == online["usage"]["completion_tokens"]
    listed = [b.id for b in c.batches.list(limit=100)]
    assert done.id in listed
    conforms("OpenAIFile", documented(server, f"/files/{done.output_file_id}"))


def test_completions_and_embeddings_batches(server):
    c = client(server)
    bodies = [{"model": SMOL, "prompt": f"Item {i}:", "max_tokens": 4, "temperature": 0} for i in range(LINES)]
    done = run(c, jsonl([line(i, "/v1/completions", b) for i, b in enumerate(bodies)]), "/v1/completions")
    assert done.status == "completed" and done.request_counts.completed == LINES
    out = {o["custom_id"]: o["response"]["body"] for o in output(c, done.output_file_id)}
    online = c.completions.with_raw_response.create(**bodies[3]).http_response.json()
    assert out["req-3"]["choices"] == online["choices"]
    # The request log tells batch lines from interactive requests: each line under its batch
    # and number, the online request with neither.
    logged = request_log(server)
    mine = [x for x in logged if x.get("batch_id") == done.id]
    assert len({x["batch_line"] for x in mine}) == LINES, mine[:3]       # every line, a retried one once more
    assert all(x["route"].endswith("/completions") and x["status"] == 200 for x in mine)
    # a request's line is written once its answer has ended, a moment after the client has it
    [answer] = until(lambda: [x for x in request_log(server) if x.get("id") == online["id"]], 30,
                     "the online request's log line")
    assert "batch_id" not in answer and "batch_line" not in answer, answer

    texts = [f"sentence number {i}" for i in range(LINES)]
    done = run(c, jsonl([line(i, "/v1/embeddings", {"model": MINILM, "input": t}) for i, t in enumerate(texts)]),
               "/v1/embeddings")
    assert done.status == "completed" and done.request_counts.completed == LINES
    out = {o["custom_id"]: o["response"]["body"] for o in output(c, done.output_file_id)}
    online = c.embeddings.create(model=MINILM, input=texts[7], encoding_format="float")
    assert out["req-7"]["data"][0]["embedding"] == online.data[0].embedding


def test_cancel_stops_a_batch(server):
    c = client(server)
    bodies = [{"model": SMOL, "prompt": f"Story {i}:", "max_tokens": 40, "temperature": 0} for i in range(300)]
    f = c.files.create(file=("long.jsonl", jsonl([line(i, "/v1/completions", b) for i, b in enumerate(bodies)])),
                       purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    until(lambda: c.batches.retrieve(b.id).request_counts.completed >= 2, 120, "some lines done")
    cancelling = c.batches.cancel(b.id)
    assert cancelling.status in ("cancelling", "cancelled")
    ended = until(lambda: (r := c.batches.retrieve(b.id)).status == "cancelled" and r, 60, "cancelled")
    assert ended.cancelled_at and ended.cancelling_at
    assert ended.request_counts.completed < 300
    # nothing of it runs any more: the engine goes idle, and the counts stay
    server.wait_idle(timeout=30)
    assert c.batches.retrieve(b.id).request_counts.completed == ended.request_counts.completed
    if ended.output_file_id:
        assert len(output(c, ended.output_file_id)) == ended.request_counts.completed


def test_another_keys_file_and_batch_are_404(server):
    c, other = client(server), client(server, OTHER)
    f = c.files.create(file=("mine.jsonl", jsonl([line(0, "/v1/completions", {"model": SMOL, "prompt": "x",
                                                                              "max_tokens": 1})])), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    for call in (lambda: other.files.retrieve(f.id), lambda: other.files.content(f.id),
                 lambda: other.files.delete(f.id), lambda: other.batches.retrieve(b.id),
                 lambda: other.batches.cancel(b.id),
                 lambda: other.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in [x.id for x in other.files.list()]
    assert b.id not in [x.id for x in other.batches.list()]
    assert c.files.retrieve(f.id).id == f.id


def test_files_api(server):
    c = client(server)
    data = b'{"a": 1}\n'
    f = c.files.create(file=("notes.jsonl", data), purpose="user_data")
    conforms("OpenAIFile", documented(server, f"/files/{f.id}"))
    assert (f.object, f.bytes, f.filename, f.purpose, f.status) == ("file", len(data), "notes.jsonl", "user_data",
                                                                      "processed")
    assert f.id.startswith("file-")
    assert c.files.content(f.id).content == data
    ids = [c.files.create(file=(f"p{i}.jsonl", data), purpose="user_data").id for i in range(3)]
    page = c.files.list(purpose="user_data", limit=2, order="asc")
    assert len(page.data) == 2 and page.has_more
    rest = c.files.list(purpose="user_data", limit=100, order="asc", after=page.data[-1].id)
    assert [x.id for x in page.data + rest.data][-3:] == ids
    assert all(x.purpose == "user_data" for x in rest.data)
    conforms("ListFilesResponse", documented(server, "/files?purpose=user_data&limit=2"))
    gone = httpx.delete(f"{server.base}{OPENAI_PREFIX}/files/{f.id}", headers={"Authorization": f"Bearer {KEY}"})
    conforms("DeleteFileResponse", gone.json())
    assert gone.json()["deleted"]
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    with pytest.raises(openai.BadRequestError) as bad:
        c.files.create(file=("x.jsonl", data), purpose="fine-tune")
    assert bad.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError) as bad:           # a name past the limit: refused, not cut
        c.files.create(file=("n" * 513 + ".jsonl", data), purpose="user_data")
    assert bad.value.body["param"] == "file" and "519 characters, above the limit of 512" in bad.value.body["message"]


def errors_of(c: openai.OpenAI, data: bytes, endpoint: str = "/v1/chat/completions", server=None):
    done = run(c, data, endpoint, timeout=60)
    assert done.status == "failed", done
    assert done.failed_at and done.output_file_id is None
    if server is not None:
        conforms("Batch", documented(server, f"/batches/{done.id}"))
    return [(e.line, e.code) for e in done.errors.data]


def test_bad_input_lines_fail_the_batch_with_line_numbers(server):
    c = client(server)
    good = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    url = "/v1/chat/completions"
    raw = b"\n".join([
        json.dumps(line(0, url, good)).encode(),
        b"{not json",
        json.dumps({"method": "POST", "url": url, "body": good}).encode(),
        json.dumps(line(0, url, good)).encode(),                                   # duplicate custom_id
        json.dumps({**line(4, url, good), "method": "GET"}).encode(),
        json.dumps(line(5, "/v1/completions", good)).encode(),
        json.dumps(line(6, url, {**good, "model": "no-such-model"})).encode(),
        json.dumps(line(7, url, {**good, "model": MINILM})).encode(),             # an embeddings model
        b"[1, 2]",
        json.dumps(line(9, url, "a string")).encode(),
    ])
    assert errors_of(c, raw) == [(2, "invalid_json_line"), (3, "missing_custom_id"), (4, "duplicate_custom_id"),
                                 (5, "invalid_method"), (6, "invalid_url"), (7, "model_not_found"),
                                 (8, "wrong_model_type"), (9, "invalid_json_line"), (10, "invalid_body")]
    assert errors_of(c, raw, server=server)
    assert errors_of(c, b"just some text\nnot jsonl at all\n") == [(1, "invalid_json_line"), (2, "invalid_json_line")]
    assert errors_of(c, b"") == [(1, "empty_file")]
    # a chat model asked of /v1/embeddings: the wrong kind
    emb = jsonl([line(0, "/v1/embeddings", {"model": SMOL, "input": "x"})])
    assert errors_of(c, emb, "/v1/embeddings") == [(1, "wrong_model_type")]
    # a key limited to minilm: smollm2 is an unknown model to it
    limited = client(server, LIMITED)
    assert errors_of(limited, jsonl([line(0, url, good)])) == [(1, "model_not_found")]


def test_bad_batch_requests(server):
    c = client(server)
    f = c.files.create(file=("in.jsonl", b"{}\n"), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as bad:
        c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    assert bad.value.body["param"] == "input_file_id"
    http = httpx.Client(base_url=server.base + OPENAI_PREFIX, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    for body, field in (({"input_file_id": f.id, "endpoint": "/v1/images", "completion_window": "24h"}, "endpoint"),
                        ({"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "48h"},
                         "completion_window"),
                        ({"input_file_id": f.id, "endpoint": "/v1/completions", "completion_window": "24h",
                          "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata")):
        r = http.post("/batches", json=body)
        assert r.status_code in (400, 422) and field in r.text, r.text
    assert http.get("/batches/batch_nope").status_code == 404
    assert http.get("/files/file-nope/content").status_code == 404


def test_a_file_over_the_limit_is_refused_while_it_streams(server):
    c = client(server)
    with pytest.raises(openai.APIStatusError) as big:
        c.files.create(file=("big.jsonl", b"x" * (MAX_FILE + 100_000)), purpose="batch")
    assert big.value.status_code == 413 and "max_file_bytes" in big.value.message
    # chunked, with no Content-Length: the server answers 413 once it has read about its limit,
    # while the client still offers 500 times that (what was sent before the answer came is its
    # limit plus the kernel's socket buffers), and its memory does not grow by the file
    offered = 500 * MAX_FILE
    rss = rss_kib(server.pid)
    boundary = "BOUNDARY"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall((f"POST {OPENAI_PREFIX}/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
                   ).encode())
        chunk = b"y" * 16_384
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        s.setblocking(False)
        answer = b""
        while sent < offered and not answer:
            try:
                answer += s.recv(65536)
                break
            except BlockingIOError:
                pass
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
        s.setblocking(True)
        if b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < offered // 10, sent
    assert rss_kib(server.pid) - rss < 30_000
    assert [x for x in c.files.list(purpose="batch") if x.filename == "big.jsonl"] == []


def rss_kib(pid: int) -> int:
    for row in open(f"/proc/{pid}/status"):
        if row.startswith("VmRSS:"):
            return int(row.split()[1])
    raise AssertionError("no VmRSS")


def test_responses_batch_equals_online(server):
    c = client(server)
    bodies = [{"model": SMOL, "input": f"Name a colour, number {i}.", "max_output_tokens": 16, "temperature": 0,
               "store": False} for i in range(5)]
    done = run(c, jsonl([line(i, "/v1/responses", b) for i, b in enumerate(bodies)]), "/v1/responses")
    assert done.status == "completed" and done.request_counts.completed == 5, done
    out = {o["custom_id"]: o["response"]["body"] for o in output(c, done.output_file_id)}
    online = c.responses.create(**bodies[2])
    assert out["req-2"]["object"] == "response" and out["req-2"]["status"] == online.status
    assert out["req-2"]["output"][0]["content"][0]["text"] == online.output_text


def test_a_damaged_file_is_an_error_not_its_bytes(server):
    c = client(server)
    f = c.files.create(file=("keep.jsonl", b'{"x": 1}\n' * 100), purpose="user_data")
    db = open_database(f"sqlite:///{server.log.parent / 'server-control.db'}")
    try:
        db.execute("UPDATE file_chunks SET data = ? WHERE file_id = ?", (b'{"x": 2}\n' * 100, f.id))
    finally:
        db.close()
    r = httpx.get(f"{server.base}{OPENAI_PREFIX}/files/{f.id}/content", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "file_corrupt"
    assert b'{"x": 2}' not in r.content


def test_the_command_line_submits_follows_and_downloads(server, tmp_path):
    """`modelyard batch submit` as a user runs it (its own process, the key from the environment)
    against this gateway: every custom_id's answer downloaded, each equal to the online one; a
    progress bar on stderr; then `status` and `download` of the same batch."""
    import os
    import subprocess
    import sys

    from testkit.servers import ROOT

    bodies = [{"model": SMOL, "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 4,
               "temperature": 0} for i in range(20)]
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl([line(i, "/v1/chat/completions", b) for i, b in enumerate(bodies)]))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MODELYARD_API_KEY": KEY}
    env.pop("OPENAI_API_KEY", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "modelyard", "batch", *args, "--url",
                               server.base + OPENAI_PREFIX], env=env, capture_output=True, text=True, timeout=600)

    done = cli("submit", str(source), "--endpoint", "/v1/chat/completions", "--poll", "0.2",
               "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 0, done.stderr
    assert "20/20" in done.stderr                           # the bar's last state
    got = {o["custom_id"]: o for o in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert sorted(got) == sorted(f"req-{i}" for i in range(20))
    online = client(server).chat.completions.with_raw_response.create(**bodies[4]).http_response.json()
    assert got["req-4"]["response"]["body"]["choices"] == online["choices"]
    batch_id = done.stdout.split()[0]                       # the summary: its id first
    assert client(server).batches.retrieve(batch_id).output_file_id
    status = cli("status", batch_id)
    assert status.returncode == 0 and "completed" in status.stdout and "20" in status.stdout
    again = cli("download", batch_id, "--output", str(tmp_path / "again.jsonl"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()
