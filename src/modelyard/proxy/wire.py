"""The OpenAI wire dialect an upstream speaks: the request body we send (completions or chat,
always with a `max_tokens`: what the ledger reserved is what it may generate), the bounds on a
prompt the gateway cannot tokenize, and the relay of its SSE chunks into our events (deltas, tool
calls, logprobs, finish reasons, usage), each chunk checked against OpenAI's shapes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx

from ..engine.types import ChoiceDelta, EngineOutput, EngineRequest, FinishReason, TokenLogprobs, Usage
from ..errors import DeadlineExceeded, InvalidRequest, UpstreamError
from ..redact import upstream_error_text
from ..settings import EndpointSpec
from .errors import error_message
from .sse import SSEError, json_events
from .structured import constraint_fields

# tpm reservation of a chat prompt: per message, room for its role markup (and once for the
# generation prompt); generous, since the settlement corrects it to what the upstream counted.
CHAT_MARKUP_TOKENS = 16


def completion_bound(spec: EndpointSpec, req: EngineRequest, prompt: int) -> int:
    """The most tokens one choice may generate upstream: the request's max_tokens, or (chat
    without one) the room the prompt's bound leaves in the endpoint's `context`. A prompt whose
    bound leaves no room is refused rather than sent without a limit: only the upstream can
    count its tokens, and the gateway never lets it generate more than was reserved."""
    if req.max_tokens is not None:
        return req.max_tokens
    room = spec.context - prompt
    if room < 1:
        raise InvalidRequest(
            f"max_tokens is required here: this chat sets none, and its messages may take up to {prompt} "
            f"tokens (one per byte, plus markup) of endpoint {spec.name!r}'s context of {spec.context}, "
            "leaving no room to bound the answer; set max_tokens", param="max_tokens")
    return room


def request_body(spec: EndpointSpec, req: EngineRequest, max_tokens: int) -> dict[str, Any]:
    """The upstream completions body; optional fields only when set, for picky servers;
    `max_tokens` always (completion_bound)."""
    s = req.sampling
    body: dict[str, Any] = {
        "model": spec.upstream_model or spec.name,
        "n": req.n,
        "temperature": s.temperature, "top_p": s.top_p,
        "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if req.messages is not None:
        body["messages"] = list(req.messages)
        if s.logprobs is not None:
            body["logprobs"], body["top_logprobs"] = True, s.logprobs
    else:
        body["prompt"] = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
    body["max_tokens"] = max_tokens
    if req.stop:
        body["stop"] = list(req.stop)
    if req.echo:
        body["echo"] = True
    if s.seed is not None:
        body["seed"] = s.seed
    if s.top_k:     # not OpenAI's: vLLM, SGLang, llama-server and TGI take it; OpenAI itself refuses it
        body["top_k"] = s.top_k
    if s.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in s.logit_bias.items()}
    if req.tools:
        # The upstream calls tools itself (its template renders them, its parser finds the calls,
        # "auto" included): tools and tool_choice go as sent, and its tool-call deltas come back.
        body["tools"], body["tool_choice"] = list(req.tools), req.tool_choice
    if req.constraint is not None and req.constraint.field != "tools":
        body.update(constraint_fields(spec.upstream_server, spec.name, req.constraint))
    return body


@dataclass
class Tally:
    """What one upstream request used, for its tpm settlement."""
    started: bool = False            # the upstream accepted it
    seen: int = 0                    # completion tokens seen in its chunks
    usage: Usage | None = None       # what it reported

    def used(self, prompt_bound: int) -> tuple[int, int]:
        """(prompt, completion) tokens, as the upstream reported them, or, cut short or without
        a report, the prompt's bound and the tokens seen; nothing if it never accepted it."""
        if self.usage is not None and self.usage.prompt_tokens:
            return self.usage.prompt_tokens, self.usage.completion_tokens
        return (prompt_bound, self.seen) if self.started else (0, 0)


def prompt_bound(req: EngineRequest) -> int:
    """At most this many prompt tokens: every token of the tokenizers upstreams run (byte-level
    BPE, SentencePiece with byte fallback, WordPiece) covers at least one byte, plus room for the
    specials a tokenizer or a chat template adds."""
    if req.messages is not None:
        return sum(len(str(m.get("content") or "").encode()) + _tool_fields_bytes(m) + CHAT_MARKUP_TOKENS
                   for m in req.messages) + CHAT_MARKUP_TOKENS
    return text_bound(req.prompt)


def _tool_fields_bytes(message: dict) -> int:
    """What a message's tool fields (an assistant's calls, a tool turn's call id and name) add
    to the prompt at most: their JSON's bytes."""
    fields = {k: message[k] for k in ("tool_calls", "tool_call_id", "name") if message.get(k)}
    return len(json.dumps(fields, ensure_ascii=False).encode()) if fields else 0


def text_bound(prompt: str | tuple[int, ...]) -> int:
    """prompt_bound of one text (or token-id) prompt or embeddings input."""
    if isinstance(prompt, tuple):
        return len(prompt)
    return len(prompt.encode()) + 2


async def relay(url: str, resp: httpx.Response, req: EngineRequest, tally: Tally,
                 secret: str | None = None) -> AsyncIterator[EngineOutput]:
    """Upstream chunks -> ChoiceDelta events, then one Usage; a stream cut short raises."""
    finished: set[int] = set()
    usage: dict | None = None
    async for event in json_events(resp.aiter_lines()):
        if req.deadline is not None and time.monotonic() > req.deadline:
            raise DeadlineExceeded("request deadline passed while the upstream was generating")
        if event.get("error") or event.get("object") == "error":
            why = error_message(event) or json.dumps(event)[:300]
            raise UpstreamError(f"upstream {url} failed mid-stream: {upstream_error_text(why, secret)}")
        for delta in read_chunk(event, req.n):
            tally.seen += len(delta.logprobs.tokens) if delta.logprobs else int(bool(delta.text))
            if delta.finish_reason is not None:
                finished.add(delta.index)
            yield delta
        usage = event.get("usage") or usage
    missing = sorted(set(range(req.n)) - finished)
    if missing:
        raise UpstreamError(f"upstream {url} ended the stream before choices {missing} finished")
    # An upstream that ignored include_usage gets what we saw: no prompt count, and one
    # completion token per content chunk (per logprobs token when present).
    tally.usage = read_usage(usage) if usage is not None else Usage(0, tally.seen)
    yield tally.usage


# Foreign JSON read with plain indexing raises one of these when its shape is wrong.
_SHAPE_ERRORS = (AttributeError, KeyError, TypeError, ValueError)


def read_chunk(event: dict, n: int) -> list[ChoiceDelta]:
    """The choice deltas of one upstream chunk; SSEError (a 502, or an error event once the
    stream has started) when the chunk is not the shape OpenAI's API defines."""
    try:
        deltas = [d for d in (to_delta(raw) for raw in event.get("choices") or ()) if d is not None]
    except _SHAPE_ERRORS as exc:
        raise SSEError(f"upstream sent a malformed chunk ({type(exc).__name__}: {exc}): "
                       f"{json.dumps(event)[:200]}") from None
    wrong = [d.index for d in deltas if not 0 <= d.index < n]
    if wrong:
        raise SSEError(f"upstream sent choice index {wrong[0]}, but {n} choice(s) were asked for")
    return deltas


def read_usage(usage: Any) -> Usage:
    try:
        details = usage.get("prompt_tokens_details") or {}
        return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                     int(details.get("cached_tokens") or 0))
    except _SHAPE_ERRORS:
        raise SSEError(f"upstream sent malformed usage: {json.dumps(usage)[:200]}") from None


# OpenAI's finish reasons pass through as they are. Other servers' names for the same things
# (TGI's) are translated. vLLM's "abort" means the upstream dropped the choice unfinished: an
# error, not a stop. Anything else is a malformed chunk.
FINISH_REASONS = {r.value: r for r in FinishReason} | {
    "eos_token": FinishReason.STOP, "stop_sequence": FinishReason.STOP}


def finish_reason(reason: Any) -> FinishReason | None:
    if reason is None:
        return None
    if reason == "abort":
        raise UpstreamError("upstream aborted the generation before it finished (finish_reason 'abort')")
    if reason not in FINISH_REASONS:
        raise SSEError(f"upstream sent an unknown finish_reason: {json.dumps(reason)[:100]}")
    return FINISH_REASONS[reason]


def to_delta(raw: dict) -> ChoiceDelta | None:
    """One upstream choice chunk; None when it carries nothing (some servers send empty ones)."""
    calls = None
    if "delta" in raw:   # a chat chunk
        text = raw["delta"].get("content") or ""
        logprobs = chat_to_logprobs(raw.get("logprobs"))
        calls = tool_call_parts(raw["delta"].get("tool_calls"))
    elif "message" in raw:   # a whole chat answer sent as one chunk (some servers do)
        text = raw["message"].get("content") or ""
        logprobs = chat_to_logprobs(raw.get("logprobs"))
        calls = tool_call_parts(raw["message"].get("tool_calls"))
    else:
        text = raw.get("text") or ""
        logprobs = to_logprobs(raw.get("logprobs"))
    finish = finish_reason(raw.get("finish_reason"))
    if not isinstance(text, str):
        raise TypeError(f"text/content is {type(text).__name__}, not a string")
    if not text and logprobs is None and finish is None and not calls:
        return None
    # vLLM and SGLang (and modelyard) say which stop string ended a choice in `stop_reason`
    # (a token id there means an end token, not a stop string)
    matched = raw.get("stop_reason")
    stop = matched if finish is FinishReason.STOP and isinstance(matched, str) else None
    return ChoiceDelta(int(raw.get("index") or 0), text, logprobs, finish, calls, stop)


def tool_call_parts(raw: Any) -> tuple[dict, ...] | None:
    """An upstream's tool-call deltas, checked: each a dict whose function's name and arguments
    (when present) are strings."""
    if not raw:
        return None
    parts = []
    for i, part in enumerate(raw):
        fn = part.get("function") or {}
        for key in ("name", "arguments"):
            if fn.get(key) is not None and not isinstance(fn[key], str):
                raise TypeError(f"tool_calls[{i}].function.{key} is {type(fn[key]).__name__}, not a string")
        parts.append({"index": int(part.get("index", i)), "id": part.get("id"),
                      "function": {k: fn[k] for k in ("name", "arguments") if fn.get(k) is not None}})
    return tuple(parts)


def chat_to_logprobs(raw: dict | None) -> TokenLogprobs | None:
    """Chat's {"content": [{"token", "logprob", "top_logprobs": [...]}]} in our one shape."""
    items = (raw or {}).get("content") or []
    if not items:
        return None
    return TokenLogprobs(_strings([i["token"] for i in items]), [i.get("logprob") for i in items],
                         [{t["token"]: t["logprob"] for t in i.get("top_logprobs") or []} for i in items],
                         [0] * len(items))


def to_logprobs(raw: dict | None) -> TokenLogprobs | None:
    if not raw or not raw.get("tokens"):
        return None
    n = len(raw["tokens"])
    aligned = [(list(raw.get(key) or []) + [fill] * n)[:n]      # keep the four lists aligned
               for key, fill in (("token_logprobs", None), ("top_logprobs", None), ("text_offset", 0))]
    return TokenLogprobs(_strings(raw["tokens"]), *aligned)


def _strings(tokens: Any) -> list[str]:
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TypeError("logprobs tokens must be a list of strings")
    return tokens
