"""A streaming client of many prompts that stops reading (issue 19, item 8), over a real socket on a
real `modelyard serve`: the prompts' merged stream used to be read into an unbounded queue, so the
engine's bound on pending output (1,024 steps) never applied and the server kept generating and
buffering every token for a client that read nothing. Now the merged stream holds what its
prompts' engine queues would (MAX_PENDING steps of every choice); past it every prompt's request
is aborted (its slots freed) without the client doing anything, the client finds an error event
when it reads again, and other clients are served meanwhile.

The client's window and segments are made small, so what the sockets hold (~200 kB) is small
beside the bound; the test takes about 1,100 engine steps of 4 sequences (~1 min here)."""

from __future__ import annotations

import json
import socket
import time

import httpx

from helpers import config, live_server

# Every prompt at once (PARALLEL slots), so the bound, PROMPTS * (1,024 N + 1) events, is met
# after 1,024 steps and what the sockets hold (logprobs make each event ~650 bytes: few steps).
PROMPTS, N, MAX_TOKENS = 4, 1, 2000
PARALLEL = PROMPTS * N + 1      # and a slot for another client meanwhile
BOUND = PROMPTS * (1024 * N + 1)
NO_EOS = {"0": -100, "1": -100, "2": -100}      # smollm2's end-of-generation tokens: never sampled


def request_bytes(srv, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
            f"Authorization: Bearer {srv.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


def read_all(sock: socket.socket, timeout: float = 60.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_a_many_prompt_stream_nobody_reads_is_ended_not_buffered(tmp_path):
    cfg = config(parallel=PARALLEL, context=MAX_TOKENS + 64, max_queue=PROMPTS, batch=64)
    with live_server(tmp_path / "srv", cfg) as srv:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connecting: a small window, and small segments, which keep the server's send
        # buffer small too (Linux sizes it from the segment size; it grows to 4 MB otherwise).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.connect(("127.0.0.1", srv.port))
        try:
            sock.sendall(request_bytes(srv, {
                "model": srv.model, "prompt": [f"Story {i}: once upon a time" for i in range(PROMPTS)],
                "n": N, "logprobs": 5, "max_tokens": MAX_TOKENS, "logit_bias": NO_EOS, "stream": True}))
            # The client reads nothing. Its request must end by itself, long before the engine
            # would have generated every token (PROMPTS * N * MAX_TOKENS), and the server must
            # go on serving others meanwhile.
            t0 = time.monotonic()
            started = served_other = False
            while True:
                status = srv.endpoint()
                started = started or status["slots_used"] > 0
                if started and status["in_flight"] == 0 and status["slots_used"] == 0:
                    break
                assert time.monotonic() - t0 < 300, f"the unread stream was never ended: {status}"
                assert httpx.get(srv.base + "/health", timeout=10).status_code == 200
                if started and not served_other:     # another client, while the stream is held
                    other = httpx.post(srv.api + "/completions", headers=srv.headers, timeout=60,
                                       json={"model": srv.model, "prompt": "Hello", "max_tokens": 2})
                    assert other.status_code == 200, other.text
                    served_other = True
                time.sleep(0.2)
            assert served_other

            # Reading again, the client finds what the sockets held, then the error and [DONE].
            got = read_all(sock).decode(errors="replace")
        finally:
            sock.close()
        assert got.startswith("HTTP/1.1 200"), got[:200]
        assert "reads too slowly" in got and f"{BOUND} events of output" in got, got[-600:]
        assert got.rstrip().endswith("data: [DONE]") or "data: [DONE]" in got[-200:], got[-300:]
        tokens = got.count('"finish_reason":null')
        assert tokens < PROMPTS * N * MAX_TOKENS // 2, tokens
