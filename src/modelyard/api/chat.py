"""POST /chat/completions: messages -> the engine (which applies the model's chat template, or
passes them upstream) -> OpenAI's chat shapes. Same event stream as /completions."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine.types import ChoiceDelta, EngineRequest, TokenLogprobs
from .completions import ERRORS, check_limits, deadline_for, reporter, sampling_params
from .schemas import GenerationRequest
from .streaming import Completion, collect, merge, prime_all, to_sse, unless_disconnected

router = APIRouter()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[TextPart], None] = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def k_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def chat_logprobs(lp: TokenLogprobs | None) -> dict | None:
    if lp is None:
        return None
    def entry(token: str, logprob: float | None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return {"content": [{**entry(t, l), "top_logprobs": [entry(a, b) for a, b in (top or {}).items()]}
                        for t, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)]}


class ChatCompletion(Completion):
    """The chat shapes of the same events: message/delta instead of text."""

    def envelope(self, choices: list[dict], obj: str = "chat.completion.chunk") -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, prompt: int, d: ChoiceDelta) -> dict:
        i = self.index(prompt, d)
        delta = {"content": d.text} if i in self.started else {"role": "assistant", "content": d.text}
        self.started.add(i)
        return self.envelope([{"index": i, "delta": delta, "logprobs": chat_logprobs(d.logprobs),
                               "finish_reason": d.finish_reason.value if d.finish_reason else None}])

    def body(self) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(self.texts.get(i, []))},
                    "logprobs": chat_logprobs(self.logprobs.get(i)), "finish_reason": self.finish.get(i)}
                   for i in sorted(self.texts)]
        return {**self.envelope(choices, "chat.completion"), "usage": self.usage}


@router.post("/chat/completions", responses=ERRORS, summary="Create Chat Completion")
async def create_chat_completion(body: ChatRequest, request: Request) -> Response:
    state = request.app.state
    report = reporter(request, body.model)
    check_limits(state.settings.limits, body.n or 1, body.stops, body.top_logprobs, 1)
    engine = state.registry.get(body.model).require_ready()
    cmpl_id = f"chatcmpl-{uuid.uuid4().hex}"
    req = EngineRequest(request_id=cmpl_id, prompt="", messages=tuple(m.as_dict() for m in body.messages),
                        sampling=sampling_params(body, body.k_logprobs), n=body.n or 1,
                        max_tokens=body.max_completion_tokens or body.max_tokens or 16, stop=body.stops,
                        deadline=deadline_for(request))
    out = ChatCompletion(cmpl_id, int(time.time()), body.model, body.n or 1, on_done=report)
    events = merge(await prime_all([engine.generate(req)]))
    if body.stream:
        return StreamingResponse(to_sse(events, out, body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    result = await unless_disconnected(request, asyncio.ensure_future(collect(events, out)))
    return Response(status_code=499) if result is None else JSONResponse(result)
