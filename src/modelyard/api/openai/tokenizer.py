"""vLLM's tokenizer routes at the server root: POST /tokenize, POST /detokenize, GET /tokenizer_info.

Clients that score through `echo` + `logprobs` (lm-evaluation-harness's `local-completions` with
its "remote" tokenizer) need the server's own tokenizer when no Hugging Face one is reachable.
Shapes follow vLLM's; `model` picks the endpoint, and without it a server with exactly one
completions endpoint uses that one. Only embedded endpoints own a tokenizer here: a remote
endpoint's is the upstream's, so asking for it is a 400, not a guess.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ...engine.types import ModelType
from ...errors import ContextOverflow, InvalidRequest
from ...settings import MAX_NAME
from ..auth import visible_endpoints
from .pipeline import tokenizing_engine
from .schemas import Message

router = APIRouter()


class TokenizeCompletion(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    prompt: str
    add_special_tokens: bool = True       # vLLM's default: the BOS as /completions would add it
    return_token_strs: bool = False


class TokenizeChat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    messages: Annotated[list[Message], Field(min_length=1)]
    # /chat/completions always asks the template for the assistant's turn: the tokens this
    # answers are exactly those, so the other choices are refused rather than ignored.
    add_generation_prompt: Literal[True] = True
    continue_final_message: Literal[False] = False
    add_special_tokens: Literal[False] = False
    return_token_strs: bool = False


class Detokenize(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    tokens: list[int]


async def _engine(request: Request, model: str | None):
    if model is None:       # the one embedded completions endpoint among those the key may see
        visible = visible_endpoints(request)
        seen = [ep for ep in request.app.state.registry.endpoints.values() if visible is None or ep.name in visible]
        local = [ep for ep in seen if ep.spec.engine == "llamacpp" and ep.model_type is not ModelType.EMBEDDINGS]
        if len(local) != 1:
            names = ", ".join(sorted(ep.name for ep in seen)) or "none"
            raise InvalidRequest(f"model is required: this server has {len(local)} embedded completions "
                                 f"endpoints ({names}); name one", param="model")
        model = local[0].name
    return await tokenizing_engine(request, model, f"model endpoint {model!r} is served by a remote engine; its "
                             "tokenizer is the upstream's: ask the upstream")


@router.post("/tokenize", summary="Text or chat messages -> the endpoint's token ids (vLLM's shape)")
async def tokenize(body: Union[TokenizeChat, TokenizeCompletion], request: Request) -> dict:
    engine = await _engine(request, body.model)
    if isinstance(body, TokenizeChat):
        ids = await engine.tokenize(None, tuple(m.as_dict() for m in body.messages), False)
    else:
        ids = await engine.tokenize(body.prompt, None, body.add_special_tokens)
    if len(ids) > engine.spec.context:
        # what completions and chat would refuse is refused here too: the answer (ids and,
        # asked for, their strings) stays bounded by the endpoint's context, not the body limit
        field, verb = ("messages", "make") if isinstance(body, TokenizeChat) else ("prompt", "has")
        raise ContextOverflow(f"this endpoint's context is {engine.spec.context} tokens, and the {field} {verb} "
                              f"{len(ids)} tokens", param=field)
    strs = await engine.token_strs(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.spec.context, "tokens": ids, "token_strs": strs}


@router.post("/detokenize", summary="Token ids -> text (vLLM's shape)")
async def detokenize(body: Detokenize, request: Request) -> dict:
    return {"prompt": await (await _engine(request, body.model)).detokenize(body.tokens)}


@router.get("/tokenizer_info", summary="The endpoint's tokenizer: special tokens, context, chat template")
async def tokenizer_info(request: Request, model: Annotated[str | None, Query(min_length=1)] = None) -> dict:
    return (await _engine(request, model)).tokenizer_info()
