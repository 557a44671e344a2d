"""Slow and greedy clients over real sockets: a connection that never completes its request
head is closed after [server] header_timeout (from when it opened, or from the first byte of a
later request on a kept-alive connection), while honest requests are served; and connections
past [server] max_connections are answered 503 and closed at once instead of being held.
Servers: a real `modelyard serve` with an API key and one remote endpoint whose replica is down
(no model to load: only the connection layer is under test)."""

from __future__ import annotations

import json
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from helpers import assert_openai_error
from testkit.servers import ServerProcess, served
from testkit.until import until

KEY = "sk-slow-key"
HEADER_TIMEOUT = 1.0
SLOW = 50                    # half-sent heads held open at once
MAX_CONNECTIONS = 5
PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "     # never finished


def _config(server: str) -> str:
    return (f'[server]\napi_keys = ["{KEY}"]\nlog_level = "info"\n{server}\n'
            '[[endpoints]]\nname = "remote"\nengine = "openai"\nurls = ["http://127.0.0.1:9/v1"]\n')


@contextmanager
def server(tmp_path: Path, settings: str) -> Iterator[ServerProcess]:
    with served(tmp_path, _config(settings), key=KEY, endpoints=()) as s:
        yield s


def raw(srv: ServerProcess, stack: ExitStack, send: bytes = b"") -> socket.socket:
    """A plain TCP connection to the server (closed with `stack`), having sent `send`."""
    sock = stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
    if send:
        sock.sendall(send)
    return sock


def read_until_closed(sock: socket.socket, deadline: float) -> bytes | None:
    """Everything the server sends until it closes the connection (recv returns b""), or None
    if it is still open at `deadline` (time.monotonic())."""
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return None
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def honest(srv: ServerProcess) -> None:
    assert httpx.get(srv.base + "/health", timeout=10).status_code == 200
    r = httpx.get(f"{srv.base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200 and r.json()["data"], r.text


def test_half_sent_heads_are_closed_after_header_timeout(tmp_path):
    with server(tmp_path, f"header_timeout = {HEADER_TIMEOUT}\nkeep_alive_timeout = 60\n") as srv, \
            ExitStack() as stack:
        started = time.monotonic()
        slow = [raw(srv, stack, PARTIAL_HEAD) for _ in range(SLOW)]
        silent = raw(srv, stack)                         # connects and sends nothing at all
        honest(srv)                                      # served while they hang
        deadline = started + HEADER_TIMEOUT + 10         # generous: the machine is shared
        for sock in [*slow, silent]:
            assert read_until_closed(sock, deadline) == b"", "a half-sent head was still held open"
        # Not closed at once: each had its header_timeout (less what connecting 50 took).
        assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9
        honest(srv)


def test_a_kept_alive_connection_must_finish_its_next_head_in_time(tmp_path):
    """uvicorn cancels its keep-alive timer at the first byte of the next request; the head
    deadline starts there instead (keep_alive_timeout is 60 s: only header_timeout can close it)."""
    with server(tmp_path, f"header_timeout = {HEADER_TIMEOUT}\nkeep_alive_timeout = 60\n") as srv, \
            ExitStack() as stack:
        sock = raw(srv, stack, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.settimeout(10)
        first = b""
        for _ in range(100):                             # bounded: the answer is small
            first += sock.recv(65536)
            head, _, body = first.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                break
        assert first.startswith(b"HTTP/1.1 200") and body == b'{"status":"ok"}', first
        time.sleep(HEADER_TIMEOUT * 1.5)                 # idle between requests: keep-alive's business
        sock.sendall(PARTIAL_HEAD)
        sent = time.monotonic()
        assert read_until_closed(sock, sent + HEADER_TIMEOUT + 10) == b""
        assert time.monotonic() - sent >= HEADER_TIMEOUT * 0.9
        honest(srv)


def test_connections_past_max_connections_are_answered_503_not_held(tmp_path):
    with server(tmp_path, f"max_connections = {MAX_CONNECTIONS}\nheader_timeout = 60\n") as srv, \
            ExitStack() as stack:
        held = [raw(srv, stack, PARTIAL_HEAD) for _ in range(MAX_CONNECTIONS)]
        time.sleep(0.5)                                  # all of them accepted by the server
        extra = raw(srv, stack)
        answer = read_until_closed(extra, time.monotonic() + 10)
        assert answer is not None, "a connection past the limit was held"
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), head
        err = assert_openai_error(json.loads(body))
        assert err["code"] == "too_many_connections" and str(MAX_CONNECTIONS) in err["message"], err
        assert "max_connections" in err["message"], err
        r = httpx.get(srv.base + "/health", timeout=10)  # an HTTP client sees the same 503
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
        for sock in held:                                # the held ones free their places
            sock.close()
        until(lambda: httpx.get(srv.base + "/health", timeout=10).status_code == 200, 10,
              "closed connections freed their places")
        honest(srv)


def test_a_head_over_max_header_bytes_is_400_and_closed(tmp_path):
    with server(tmp_path, "max_header_bytes = 2048\n") as srv, ExitStack() as stack:
        sock = raw(srv, stack, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
        answer = read_until_closed(sock, time.monotonic() + 10)
        assert answer is not None and answer.startswith(b"HTTP/1.1 400"), answer
        ok = raw(srv, stack, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Small: " + b"a" * 1024 +
                 b"\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(ok, time.monotonic() + 10)
        assert answer is not None and answer.startswith(b"HTTP/1.1 200"), answer


@pytest.mark.parametrize("setting,value", [("header_timeout", 0), ("keep_alive_timeout", 301),
                                           ("max_connections", 0), ("max_header_bytes", 100)])
def test_a_bad_connection_setting_is_a_config_error_naming_it(tmp_path, setting, value):
    from modelyard import settings
    from modelyard.errors import ConfigError
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[server]\n{setting} = {value}\n")
    with pytest.raises(ConfigError) as err:
        settings.load(cfg, env={})
    message = str(err.value)
    assert setting in message and str(value) in message and " to " in message, message
