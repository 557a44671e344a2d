"""Hostile bodies over real HTTP: a caller without credentials costs its headers, whatever the
method and however the body is framed, and a body over [limits] max_body_bytes is refused (413)
without being held, on every method. Server: a real `modelyard serve` with API keys, admin
tokens (control plane on, SQLite) and one remote endpoint whose replica is down (no model to
load: only the HTTP layer is under test); max_body_bytes = 100,000.

Each hostile body is 50 MB, generated chunk by chunk (so the test holds none of it); the
server's resident memory (VmRSS) must grow by far less than that, and it must keep answering.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from helpers import assert_openai_error
from testkit.servers import OPENAI_PREFIX, ServerProcess, served

KEY, ADMIN, VIEWER = "sk-hostile-key", "adm-hostile-token", "view-hostile-token"
MAX_BODY = 100_000
CHUNK = 64 * 1024
BODY_CHUNKS = 800                         # 800 x 64 KiB: a 50 MiB body
BODY = CHUNK * BODY_CHUNKS
RSS_BOUND_KIB = 20 * 1024                 # growth allowed per hostile request: far below the body
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def _config(database: Path) -> str:
    return (f'[server]\napi_keys = ["{KEY}"]\nlog_level = "info"\ndatabase_url = "sqlite:///{database}"\n\n'
            f'[limits]\nmax_body_bytes = {MAX_BODY}\n\n'
            f'[[admin_tokens]]\nname = "ops"\ntoken = "{ADMIN}"\n\n'
            f'[[admin_tokens]]\nname = "audit"\nrole = "viewer"\ntoken = "{VIEWER}"\n\n'
            # a replica nobody listens on: the endpoint exists, nothing loads
            f'[[endpoints]]\nname = "remote"\nengine = "openai"\nurls = ["http://127.0.0.1:9/v1"]\n')


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("hostile-bodies")
    with served(d, _config(d / "control.db"), key=KEY, endpoints=()) as s:
        yield s


def rss_kib(srv: ServerProcess) -> int:
    assert srv.proc is not None
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


class Body:
    """A 50 MiB body made as it is sent; `sent` counts the bytes the client handed over."""

    def __init__(self) -> None:
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        chunk = b"{" + b" " * (CHUNK - 1)          # the start of a JSON object that never ends
        for _ in range(BODY_CHUNKS):
            self.sent += len(chunk)
            yield chunk
            chunk = b" " * CHUNK


def send(srv: ServerProcess, method: str, path: str, token: str | None, *,
         content_length: bool = False) -> tuple[httpx.Response, Body]:
    """One hostile request: its answer (which must come although the server closes the
    connection without reading the rest of the body), and the body's count."""
    body = Body()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if content_length:
        headers["Content-Length"] = str(BODY)      # else httpx sends the generator chunked
    with httpx.Client(timeout=TIMEOUT) as client:
        # httpx stops sending when the server closes, and still reads the answer it was sent
        return client.request(method, srv.base + path, content=iter(body), headers=headers), body


def still_serving(srv: ServerProcess) -> None:
    assert httpx.get(srv.base + "/health", timeout=10).status_code == 200
    r = httpx.get(f"{srv.base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200 and r.json()["data"], r.text


def warm(srv: ServerProcess) -> None:
    """One honest call of each kind first, so what the first call of a route allocates once
    (imports, caches) is not counted against a hostile one."""
    with httpx.Client(base_url=srv.base, timeout=TIMEOUT) as c:
        c.patch("/api/v1/control/api-keys/key_none", json={"name": "x"}, headers={"Authorization": f"Bearer {ADMIN}"})
        c.post(f"{OPENAI_PREFIX}/completions", json={"model": "remote", "prompt": "x", "max_tokens": 1},
               headers={"Authorization": f"Bearer {KEY}"})
    still_serving(srv)


CONTROL_KEY = "/api/v1/control/api-keys/key_none"
CONTROL_EP = "/api/v1/control/model-endpoints/ep_none"
NO_CREDENTIAL = [
    ("PATCH", CONTROL_KEY, None), ("PATCH", CONTROL_KEY, "wrong-token"),
    ("POST", "/api/v1/control/api-keys", None), ("PATCH", CONTROL_EP, None),
    ("DELETE", CONTROL_EP, None), ("PATCH", CONTROL_KEY, KEY),          # an inference key: 403
    ("PATCH", CONTROL_KEY, VIEWER),                                      # a viewer may not change: 403
    ("POST", f"{OPENAI_PREFIX}/completions", None), ("POST", "/v1/chat/completions", "sk-wrong"),
    ("POST", "/v1/embeddings", None), ("PUT", CONTROL_KEY, None),       # no PUT route: 405
]


def send_unread(srv: ServerProcess, method: str, path: str, token: str | None, content_length: bool) -> httpx.Response:
    """Send the 50 MiB body; the answer, once it is shown that the server neither grew by the
    body nor read all of it (the client could hand over no more than the sockets' buffers hold)."""
    warm(srv)
    before = rss_kib(srv)
    r, body = send(srv, method, path, token, content_length=content_length)
    grown = rss_kib(srv) - before
    assert grown < RSS_BOUND_KIB, f"{method} {path}: RSS grew {grown} KiB for a {BODY >> 20} MiB body"
    assert body.sent < BODY, f"{method} {path}: the server read the whole {BODY}-byte body"
    return r


@pytest.mark.parametrize("content_length", [False, True], ids=["chunked", "content-length"])
@pytest.mark.parametrize("method,path,token", NO_CREDENTIAL)
def test_a_caller_without_credentials_costs_nothing(srv, method, path, token, content_length):
    r = send_unread(srv, method, path, token, content_length)
    if content_length:
        assert r.status_code == 413, r.text     # an announced size over the limit: refused first
    elif method == "PUT":
        assert r.status_code == 405, r.text     # no such route: refused without reading
    else:
        assert r.status_code == (403 if token in (KEY, VIEWER) else 401), r.text
    assert_openai_error(r.json())
    assert r.headers.get("connection") == "close"       # the rest of the body is never read
    still_serving(srv)


@pytest.mark.parametrize("content_length", [False, True], ids=["chunked", "content-length"])
@pytest.mark.parametrize("method,path,token", [
    ("PATCH", CONTROL_KEY, ADMIN), ("POST", "/api/v1/control/api-keys", ADMIN),
    ("PATCH", CONTROL_EP, ADMIN), ("POST", f"{OPENAI_PREFIX}/completions", KEY),
    ("POST", "/v1/embeddings", KEY)])
def test_a_body_over_the_limit_is_413_with_credentials_too(srv, method, path, token, content_length):
    r = send_unread(srv, method, path, token, content_length)
    assert r.status_code == 413, r.text
    err = assert_openai_error(r.json(), "invalid_request_error")
    assert err["code"] == "request_too_large" and str(MAX_BODY) in err["message"], err
    sizes = [int(w) for w in err["message"].split() if w.isdigit()]
    assert any(s > MAX_BODY for s in sizes), err       # the size sent, or read when it stopped
    if content_length:
        assert str(BODY) in err["message"], err
    assert r.headers.get("connection") == "close"       # the rest is never read
    still_serving(srv)


def test_an_honest_patch_under_the_limit_is_served(srv):
    with httpx.Client(base_url=srv.base, timeout=TIMEOUT, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        created = c.post("/api/v1/control/api-keys", json={"name": "honest"})
        assert created.status_code == 201, created.text
        r = c.patch(f"/api/v1/control/api-keys/{created.json()['id']}", json={"name": "honest-" + "x" * 90})
        assert r.status_code == 200, r.text
        assert r.json()["name"].startswith("honest-x") and r.headers.get("connection") != "close"


def _raw(srv: ServerProcess) -> socket.socket:
    host, port = srv.base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP answer read off `sock` (its head, its body by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed inside an answer: {head!r}"
        body += chunk
    assert len(body) == length, "more bytes than the answer's length: nothing was asked"
    return head, body


def test_an_early_answer_to_a_small_body_keeps_the_connection(srv):
    """A viewer's POST is refused (403) before its body is read. Its 20-byte body, sent only
    after the answer, is read and dropped and the connection serves the next request: no
    `Connection: close`, so no client ever races a reset for a body already on its way."""
    body = b'{"name": "refused!"}'
    with _raw(srv) as sock:
        sock.sendall(b"POST /api/v1/control/api-keys HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + VIEWER.encode() + b"\r\nContent-Length: " +
                     str(len(body)).encode() + b"\r\n\r\n")
        head, answer = _answer(sock)
        assert head.startswith(b"HTTP/1.1 403") and b"connection: close" not in head.lower(), head
        assert_openai_error(json.loads(answer))
        sock.sendall(body + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        head, _ = _answer(sock)
        assert head.startswith(b"HTTP/1.1 200"), head


def test_a_refused_body_still_arriving_gets_its_answer_then_a_clean_close(srv):
    """A 413 for a 50 MiB Content-Length, while a megabyte of its body is in flight: the answer
    comes, then an orderly end of the stream (FIN), not a TCP reset: the server reads and
    drops what is still arriving instead of closing a socket with unread bytes in it."""
    with _raw(srv) as sock:
        sock.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     f"Authorization: Bearer {KEY}\r\nContent-Length: {BODY}\r\n\r\n".encode())
        sock.setblocking(False)
        sent = 0
        try:
            while sent < 1 << 20:                   # as much as the buffers take, at most 1 MiB
                sent += sock.send(b" " * CHUNK)
        except BlockingIOError:
            pass
        assert sent > 0
        sock.settimeout(10)
        head, answer = _answer(sock)
        assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower(), head
        assert str(BODY) in json.loads(answer)["error"]["message"]
        assert sock.recv(65536) == b"", "bytes after the answer"   # FIN; a reset raises here
    still_serving(srv)
