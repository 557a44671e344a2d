"""POST /chat/completions: messages -> the engine (which applies the model's chat template, or
passes them upstream) -> OpenAI's chat shapes. Same pipeline as /completions (api/openai/pipeline)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...engine.types import ChoiceDelta, EngineRequest, TokenLogprobs, token_bytes
from .cache_scope import cache_partition
from .pipeline import ERRORS, respond, sampling_params
from .schemas import ChatRequest
from .streaming import Completion

router = APIRouter()


def chat_logprobs(lp: TokenLogprobs | None, k: int) -> dict | None:
    """Chat's shape of the engine's logprobs: `bytes` are the token's raw bytes (a partial UTF-8
    byte token gives its own byte, not the bytes of its "bytes:\\x.." display string), and
    top_logprobs are the k best only (the engine's legacy entries may add the sampled token)."""
    if lp is None:
        return None
    def entry(token: str, logprob: float | None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token_bytes(token))}
    return {"content": [{**entry(t, l), "top_logprobs": [entry(a, b) for a, b in list((top or {}).items())[:k]]}
                        for t, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)],
            "refusal": None}       # OpenAI's document requires it (null: no refusal tokens)


@dataclass
class ChatCompletion(Completion):
    """The chat shapes of the same events: message/delta instead of text."""

    top_k: int = 0     # the request's top_logprobs

    def envelope(self, choices: list[dict], obj: str = "chat.completion.chunk") -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    # tool_choice "required" or named: the output is constrained to {"name", "arguments"} JSON,
    # returned as OpenAI's tool_calls. Streamed whole at the choice's end (one tool-call delta
    # with the complete arguments): the text is only a call once it is complete.
    tool_names: list[str] | None = None     # embedded: the functions the constrained text calls
    # A remote engine's upstream makes the calls itself and streams OpenAI's tool-call deltas:
    # merged per choice (id and name from the first, arguments concatenated).
    calls: dict[int, dict[int, dict]] = field(default_factory=dict)

    def collect(self, prompt: int, d: ChoiceDelta) -> None:
        super().collect(prompt, d)
        for part in d.tool_calls or ():
            merged = self.calls.setdefault(self.index(prompt, d), {}).setdefault(int(part.get("index") or 0), {
                "id": None, "type": "function", "function": {"name": None, "arguments": ""}})
            fn = part.get("function") or {}
            merged["id"] = merged["id"] or part.get("id")
            merged["function"]["name"] = merged["function"]["name"] or fn.get("name")
            merged["function"]["arguments"] += fn.get("arguments") or ""

    def chunk(self, prompt: int, d: ChoiceDelta) -> dict | None:
        i = self.index(prompt, d)
        if self.tool_names is not None or d.tool_calls or i in self.calls:
            self.collect(prompt, d)
            if d.finish_reason is None:
                return None
            message, finish = self._message(i)
            delta = dict(message)
            for n, call in enumerate(delta.get("tool_calls") or ()):
                call["index"] = n           # a delta's tool calls say which call they extend
            return self.envelope([{"index": i, "delta": delta,
                                   "logprobs": chat_logprobs(self.logprobs.get(i), self.top_k),
                                   "finish_reason": finish}])
        delta = {"content": d.text} if i in self.started else {"role": "assistant", "content": d.text}
        self.started.add(i)
        return self.envelope([{"index": i, "delta": delta, "logprobs": chat_logprobs(d.logprobs, self.top_k),
                               "finish_reason": d.finish_reason.value if d.finish_reason else None}])

    def body(self) -> dict:
        choices = []
        for i in sorted(self.texts):
            message, finish = self._message(i)
            choices.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(self.logprobs.get(i), self.top_k), "finish_reason": finish})
        return {**self.envelope(choices, "chat.completion"), "usage": self.usage}

    def _message(self, i: int) -> tuple[dict, str | None]:
        text, finish = "".join(self.texts.get(i, [])), self.finish.get(i)
        if i in self.calls:      # relayed from an upstream
            calls = [{**c, "id": c["id"] or f"call_{uuid.uuid4().hex[:24]}"} for _, c in sorted(self.calls[i].items())]
            return {"role": "assistant", "content": text or None, "refusal": None, "tool_calls": calls}, finish
        if self.tool_names is None or finish != "stop":
            # cut by max_tokens: the partial text, finish "length", as OpenAI does; never repaired
            return {"role": "assistant", "content": text, "refusal": None}, finish
        call = json.loads(text)      # the grammar made it a complete call of an allowed tool
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [{
            "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
        }]}, "tool_calls"


@router.post("/chat/completions", responses=ERRORS, summary="Create Chat Completion")
async def create_chat_completion(body: ChatRequest, request: Request) -> Response:
    out = ChatCompletion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model, body.n or 1)
    out.top_k = body.top_logprobs or 0
    out.tool_names = body.tool_names
    tools = tuple(t.model_dump() for t in body.tools) if body.tools else None

    def build(deadline: float | None) -> list[EngineRequest]:
        # No max_tokens: None, which the engine resolves to the room the templated prompt leaves.
        messages = tuple(m.as_dict() for m in body.messages)
        return [EngineRequest(request_id=out.id, prompt="", messages=messages,
                              sampling=sampling_params(body, body.k_logprobs), n=body.n or 1,
                              max_tokens=body.max_completion_tokens or body.max_tokens, stop=body.stops,
                              deadline=deadline, constraint=body.structured, tools=tools,
                              tool_choice=body.tool_mode,
                              cache_partition=cache_partition(request, body.cache_salt))]
    return await respond(request, body, out, logprobs=body.top_logprobs, prompts=1, build=build)
