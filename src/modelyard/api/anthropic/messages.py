"""Anthropic's Messages API on every completions endpoint, embedded or remote: `POST /v1/messages`
(whole or streamed) and `POST /v1/messages/count_tokens`.

A Messages request is a chat: the system prompt, the turns with their text, `tool_use` and
`tool_result` blocks, and the tools become the OpenAI-shaped chat the engines take (an
assistant's `tool_use` blocks its `tool_calls`, a `tool_result` a `tool` turn answering one),
and it runs through the same pipeline as /chat/completions (api/openai/pipeline: limits,
endpoint, ledger, priming, disconnects). Only the shapes differ: `AnthropicMessage` writes
Anthropic's content blocks, stop reasons and usage, and its stream events (message_start,
content_block_start/delta/stop, ping, message_delta, message_stop; `error` events).

`tool_choice` maps as the engines understand it: auto → "auto" (remote endpoints; an embedded
one asks for a forced choice, as for chat), any → "required", tool → that function, none →
"none". A forced call is constrained to the tool's input schema, as chat's is.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...engine.types import ChoiceDelta, EngineRequest, SamplingParams
from ...errors import InvalidRequest, UpstreamError
from .. import sse
from ..errors import anthropic_body
from ..openai.cache_scope import cache_partition
from ..openai.chat import ChatCompletion
from ..openai.pipeline import respond, tokenizing_engine
from ..openai.structured import json_constraint, tool_call_schema
from .schemas import CountTokensRequest, MessageParam, MessagesRequest, ToolResultBlock, ToolUseBlock

router = APIRouter()

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


# -- the request, as a chat -------------------------------------------------------------------

def chat_messages(body: CountTokensRequest) -> tuple[dict, ...]:
    """The system prompt and the turns as OpenAI chat messages: tool results (which Anthropic
    puts first in a user turn) as `tool` turns, tool uses as the assistant's `tool_calls`."""
    out: list[dict] = []
    if body.system:
        text = body.system if isinstance(body.system, str) else "".join(b.text for b in body.system)
        out.append({"role": "system", "content": text})
    for m in body.messages:
        out += _turn(m)
    return tuple(out)


def _turn(m: MessageParam) -> list[dict]:
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    text = "".join(b.text for b in m.content if b.type == "text")
    uses = [b for b in m.content if isinstance(b, ToolUseBlock)]
    results = [b for b in m.content if isinstance(b, ToolResultBlock)]
    if m.role == "assistant":
        if results:
            raise InvalidRequest("tool_result blocks belong to user turns, not assistant ones", param="messages")
        turn: dict = {"role": "assistant", "content": text}
        if uses:
            turn["tool_calls"] = [{"id": u.id, "type": "function", "function": {
                "name": u.name, "arguments": json.dumps(u.input, ensure_ascii=False)}} for u in uses]
        return [turn]
    if uses:
        raise InvalidRequest("tool_use blocks belong to assistant turns, not user ones", param="messages")
    out = [{"role": "tool", "tool_call_id": r.tool_use_id, "content": r.text} for r in results]
    if text or not results:
        out.append({"role": "user", "content": text})
    return out


def chat_tools(body: CountTokensRequest) -> tuple[tuple[dict, ...] | None, str | dict | None]:
    """Anthropic's tools and tool_choice in OpenAI's shape (what engines and upstreams take)."""
    if not body.tools:
        if body.tool_choice is not None and body.tool_choice.type != "none":
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None, None
    tools = tuple({"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                     "parameters": t.input_schema}} for t in body.tools)
    choice = body.tool_choice
    if choice is None or choice.type == "auto":
        return tools, "auto"
    if choice.type == "any":
        return tools, "required"
    if choice.type == "none":
        return tools, "none"
    if not choice.name:
        raise InvalidRequest('tool_choice {"type": "tool"} needs the tool\'s name', param="tool_choice.name")
    return tools, {"type": "function", "function": {"name": choice.name}}


# -- the answer, in Anthropic's shapes ------------------------------------------------------------

@dataclass
class AnthropicMessage(ChatCompletion):
    """One message in Anthropic's shapes, from the same events a chat completion is made of."""

    block: int = -1              # the content block open in the stream (-1: none)
    open_kind: str = ""          # its type
    stop_sequence: str | None = None
    stop_reason: str = "end_turn"   # the stream's, once its choice has finished

    def _stop(self, i: int, calls: list[dict]) -> str:
        if calls:
            return "tool_use"
        finish = self.finish.get(i)
        if finish == "stop":
            return "stop_sequence" if self.stop_sequence else "end_turn"
        return STOP_REASONS.get(finish or "", "end_turn")

    def collect(self, prompt: int, d: ChoiceDelta) -> None:
        super().collect(prompt, d)
        if d.stop_sequence:
            self.stop_sequence = d.stop_sequence

    def _content(self, i: int) -> tuple[list[dict], list[dict]]:
        """(content blocks, the tool_use blocks among them) of choice `i`."""
        message, finish = self._message(i)
        blocks: list[dict] = []
        if message.get("content"):
            blocks.append({"type": "text", "text": message["content"]})
        uses = []
        for call in message.get("tool_calls") or ():
            try:
                arguments = json.loads(call["function"]["arguments"] or "{}")
            except ValueError:
                raise UpstreamError("the upstream's tool call has arguments that are not JSON: "
                                    f"{call['function']['arguments'][:200]!r}") from None
            if not isinstance(arguments, dict):
                raise UpstreamError("the upstream's tool call has arguments that are not a JSON object")
            uses.append({"type": "tool_use", "id": "toolu_" + (call["id"] or uuid.uuid4().hex)[-24:],
                         "name": call["function"]["name"], "input": arguments})
        return blocks + uses, uses

    @property
    def anthropic_usage(self) -> dict:
        # Anthropic counts cached input apart: input_tokens are those not read from the cache
        if not self.cached_visible:
            return {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens}
        return {"input_tokens": self.prompt_tokens - self.cached_tokens, "output_tokens": self.completion_tokens,
                "cache_read_input_tokens": self.cached_tokens, "cache_creation_input_tokens": 0}

    def body(self) -> dict:
        content, uses = self._content(0)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": self._stop(0, uses), "stop_sequence": self.stop_sequence,
                "usage": self.anthropic_usage}

    # -- the stream ----------------------------------------------------------------------------

    def sse_start(self) -> list[str]:
        start = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                 "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [sse.event("message_start", {"type": "message_start", "message": start}),
                sse.event("ping", {"type": "ping"})]

    def _open(self, kind: str, block: dict) -> list[str]:
        self.block += 1
        self.open_kind = kind
        return [sse.event("content_block_start", {"type": "content_block_start", "index": self.block,
                                                  "content_block": block})]

    def _close(self) -> list[str]:
        if not self.open_kind:
            return []
        self.open_kind = ""
        return [sse.event("content_block_stop", {"type": "content_block_stop", "index": self.block})]

    def sse_delta(self, prompt: int, d: ChoiceDelta, include_usage: bool) -> list[str]:
        i = self.index(prompt, d)
        if self.tool_names is not None or d.tool_calls or i in self.calls:
            # a call is sent once complete: an embedded one is constrained JSON text until then
            self.collect(prompt, d)
            if d.finish_reason is None:
                return []
            content, uses = self._content(i)
            self.stop_reason = self._stop(i, uses)
            out = self._close()
            for block in content:
                if block["type"] == "text":
                    out += self._open("text", {"type": "text", "text": ""})
                    out.append(sse.event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                                 "delta": {"type": "text_delta", "text": block["text"]}}))
                else:
                    out += self._open("tool_use", {**block, "input": {}})
                    out.append(sse.event("content_block_delta", {
                        "type": "content_block_delta", "index": self.block,
                        "delta": {"type": "input_json_delta",
                                  "partial_json": json.dumps(block["input"], ensure_ascii=False)}}))
                out += self._close()
            return out
        self.collect(prompt, d)
        out = []
        if d.text:
            if self.open_kind != "text":
                out += self._close() + self._open("text", {"type": "text", "text": ""})
            out.append(sse.event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                         "delta": {"type": "text_delta", "text": d.text}}))
        if d.finish_reason is not None:
            self.stop_reason = self._stop(i, [])
            out += self._close()
        return out

    def sse_end(self, include_usage: bool) -> list[str]:
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        return [sse.event("message_delta", {"type": "message_delta", "delta": delta, "usage": self.anthropic_usage}),
                sse.event("message_stop", {"type": "message_stop"})]

    def sse_error(self, status: int, body: dict) -> str:
        message = (body.get("error") or {}).get("message") or "error"
        return sse.event("error", anthropic_body(status, message))

    def sse_close(self) -> list[str]:
        return []


# -- the routes -----------------------------------------------------------------------------------

def _sampling(body: MessagesRequest) -> SamplingParams:
    return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=body.top_p if body.top_p is not None else 1.0, top_k=body.top_k or 0)


@router.post("/messages", summary="Create a Message (Anthropic's Messages API)")
async def create_message(body: MessagesRequest, request: Request) -> Response:
    out = AnthropicMessage(f"msg_{uuid.uuid4().hex[:24]}", int(time.time()), body.model, 1)
    tools, choice = chat_tools(body)
    constraint = None
    if tools and choice not in (None, "auto"):
        try:
            made = tool_call_schema(list(tools), choice)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="tool_choice") from None
        if made is not None:
            schema, out.tool_names = made
            constraint = json_constraint(schema, "tools")
    if body.output_config is not None and body.output_config.format is not None:
        if constraint is not None:
            raise InvalidRequest("output_config.format and a forced tool_choice both constrain the answer; "
                                 "send one", param="output_config")
        constraint = json_constraint(body.output_config.format.schema_, "output_config")
    messages = chat_messages(body)

    def build(deadline: float | None) -> list[EngineRequest]:
        return [EngineRequest(request_id=out.id, prompt="", messages=messages, sampling=_sampling(body), n=1,
                              max_tokens=body.max_tokens, stop=body.stops, deadline=deadline, constraint=constraint,
                              tools=tools, tool_choice=choice, cache_partition=cache_partition(request, None))]
    return await respond(request, body, out, logprobs=None, prompts=1, build=build)


@router.post("/messages/count_tokens", summary="Count a Message's input tokens (Anthropic's Messages API)")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict:
    """The tokens the model would be fed for these turns and tools: an embedded endpoint's own
    count. A remote endpoint's tokenizer is the upstream's, so it is a 400, not a guess."""
    request.state.endpoint = body.model
    engine = await tokenizing_engine(request, body.model)
    tools, _ = chat_tools(body)
    ids = await engine.tokenize(None, chat_messages(body), False, tools)
    return {"input_tokens": len(ids)}
