"""bench/common.py: the one percentile definition, the one SSE client and the drivers' skeleton
(--json, --rounds, the raw record) every bench script uses.

Pure logic, so the client is fed by httpx.MockTransport (no server): what it must get right is
the parsing (texts per choice, usage, [DONE], error events, HTTP errors)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import httpx
import pytest

_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).parent.parent / "bench" / "common.py")
common = importlib.util.module_from_spec(_spec)
sys.modules["bench_common"] = common        # its dataclasses look their module up there
_spec.loader.exec_module(common)


# --- percentile: linear interpolation between the closest ranks (numpy's default, type 7)

@pytest.mark.parametrize("xs, q, expected", [
    ([15, 20, 35, 40, 50], 0.0, 15),
    ([15, 20, 35, 40, 50], 0.4, 29.0),      # position 1.6: 20 + 0.6 * (35 - 20)
    ([15, 20, 35, 40, 50], 0.5, 35),
    ([15, 20, 35, 40, 50], 1.0, 50),
    ([4, 1, 3, 2], 0.25, 1.75),            # unsorted input; position 0.75
    ([4, 1, 3, 2], 0.5, 2.5),              # even count: the mean of the middle two (nearest-rank: 2)
    ([4, 1, 3, 2], 0.95, 3.85),            # position 2.85: 3 + 0.85 * (4 - 3)
    ([7.0], 0.99, 7.0),
])
def test_percentile_matches_hand_computed_values(xs, q, expected):
    assert common.percentile(xs, q) == pytest.approx(expected)


def test_percentile_p50_is_the_median_and_input_is_not_reordered():
    xs = [9.0, 2.0, 7.0, 4.0, 1.0, 8.0]
    assert common.percentile(xs, 0.5) == statistics.median(xs)
    assert xs == [9.0, 2.0, 7.0, 4.0, 1.0, 8.0]


def test_percentile_of_nothing_is_none_and_q_outside_0_1_is_refused():
    assert common.percentile([], 0.5) is None
    with pytest.raises(ValueError, match="q must be within"):
        common.percentile([1.0], 1.5)


# --- the SSE client

def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def _run(handler, body: dict | None = None, **kw) -> "common.Stream":
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await common.stream(client, "http://bench.test/v1/completions", body or {"prompt": "x"}, **kw)
    return asyncio.run(go())


def test_stream_collects_text_usage_and_per_token_times():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, content=_sse(
            {"choices": [{"index": 0, "text": "Hel"}]},
            {"choices": [{"index": 0, "text": ""}]},                     # no text: not a token
            {"choices": [{"index": 0, "text": "lo", "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
            b"[DONE]"))

    s = _run(handler)
    assert seen["body"]["stream"] is True
    assert s.ok and s.status == 200 and s.done
    assert s.text == "Hello" and s.finish_reason == "length"
    assert len(s.token_times) == 2 and s.ttft == s.token_times[0] <= s.token_times[1] <= s.total
    assert s.completion_tokens == 3                  # the server's count, not the 2 text chunks
    assert s.tpot == pytest.approx((s.token_times[1] - s.token_times[0]) / 2)


def test_stream_reads_chat_deltas_per_choice_and_counts_chunks_without_usage():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse(
            {"choices": [{"index": 1, "delta": {"content": "b"}}, {"index": 0, "delta": {"role": "assistant"}}]},
            {"choices": [{"index": 0, "delta": {"content": "a"}}]}, b"[DONE]"))

    s = _run(handler)
    assert s.texts == {0: "a", 1: "b"} and s.text == "ab"
    assert s.usage is None and s.completion_tokens == 2


def test_stream_reports_http_errors_error_events_and_a_missing_done():
    bad = _run(lambda r: httpx.Response(422, json={"error": {"message": "temperature must be <= 2"}}))
    assert not bad.ok and bad.status == 422 and bad.error == "HTTP 422: temperature must be <= 2"

    event = _run(lambda r: httpx.Response(200, content=_sse({"error": {"message": "engine failed"}}, b"[DONE]")))
    assert not event.ok and "engine failed" in event.error

    cut = _run(lambda r: httpx.Response(200, content=_sse({"choices": [{"text": "a"}]})))
    assert not cut.ok and cut.error == "the stream ended without [DONE]" and cut.text == "a"


def test_stream_close_after_leaves_early_and_transport_errors_are_recorded():
    many = _sse(*({"choices": [{"text": str(i)}]} for i in range(5)), b"[DONE]")
    early = _run(lambda r: httpx.Response(200, content=many), close_after=2)
    assert early.closed_early and early.events == 2 and early.text == "01" and not early.done

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    down = _run(refuse)
    assert down.status is None and down.exception == "ConnectError" and not down.ok


# --- the drivers' skeleton: --json and --rounds parsed one way, the raw record written one way

def test_parser_has_json_and_rounds_only_when_asked(tmp_path):
    a = common.parser("doc", rounds=3).parse_args(["--json", str(tmp_path / "r.json")])
    assert a.rounds == 3 and a.json == tmp_path / "r.json"
    b = common.parser("doc").parse_args([])
    assert b.json is None and not hasattr(b, "rounds")


def test_write_record_writes_paths_as_text_and_nothing_without_json(tmp_path):
    out = tmp_path / "r.json"
    common.write_record(out, {"model": tmp_path, "n": 1})
    assert json.loads(out.read_text()) == {"model": str(tmp_path), "n": 1}
    common.write_record(None, {"n": 2})                  # no --json: nothing written, no error
