"""POST /chat/completions: messages -> the engine (which applies the model's chat template, or
passes them upstream) -> OpenAI's chat shapes. Same pipeline as /completions (api/pipeline)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ..engine.types import ChoiceDelta, EngineRequest, TokenLogprobs, token_bytes
from .pipeline import ERRORS, respond, sampling_params
from .schemas import GenerationRequest
from .streaming import Completion

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


def chat_logprobs(lp: TokenLogprobs | None, k: int) -> dict | None:
    """Chat's shape of the engine's logprobs: `bytes` are the token's raw bytes (a partial UTF-8
    byte token gives its own byte, not the bytes of its "bytes:\\x.." display string), and
    top_logprobs are the k best only (the engine's legacy entries may add the sampled token)."""
    if lp is None:
        return None
    def entry(token: str, logprob: float | None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token_bytes(token))}
    return {"content": [{**entry(t, l), "top_logprobs": [entry(a, b) for a, b in list((top or {}).items())[:k]]}
                        for t, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)]}


class ChatCompletion(Completion):
    """The chat shapes of the same events: message/delta instead of text."""

    top_k = 0     # the request's top_logprobs

    def envelope(self, choices: list[dict], obj: str = "chat.completion.chunk") -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, prompt: int, d: ChoiceDelta) -> dict:
        i = self.index(prompt, d)
        delta = {"content": d.text} if i in self.started else {"role": "assistant", "content": d.text}
        self.started.add(i)
        return self.envelope([{"index": i, "delta": delta, "logprobs": chat_logprobs(d.logprobs, self.top_k),
                               "finish_reason": d.finish_reason.value if d.finish_reason else None}])

    def body(self) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(self.texts.get(i, []))},
                    "logprobs": chat_logprobs(self.logprobs.get(i), self.top_k), "finish_reason": self.finish.get(i)}
                   for i in sorted(self.texts)]
        return {**self.envelope(choices, "chat.completion"), "usage": self.usage}


@router.post("/chat/completions", responses=ERRORS, summary="Create Chat Completion")
async def create_chat_completion(body: ChatRequest, request: Request) -> Response:
    out = ChatCompletion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model, body.n or 1)
    out.top_k = body.top_logprobs or 0

    def build(deadline: float | None) -> list[EngineRequest]:
        # No max_tokens: None, which the engine resolves to the room the templated prompt leaves.
        messages = tuple(m.as_dict() for m in body.messages)
        return [EngineRequest(request_id=out.id, prompt="", messages=messages,
                              sampling=sampling_params(body, body.k_logprobs), n=body.n or 1,
                              max_tokens=body.max_completion_tokens or body.max_tokens, stop=body.stops,
                              deadline=deadline)]
    return await respond(request, body, out, logprobs=body.top_logprobs, prompts=1, build=build)
