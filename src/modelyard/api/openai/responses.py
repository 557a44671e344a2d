"""OpenAI's Responses API on every completions endpoint, embedded or remote: `POST /responses`
(whole or streamed), `GET` and `DELETE /responses/{id}`, `GET /responses/{id}/input_items`,
`POST /responses/input_tokens`, `POST /responses/{id}/cancel` (background ones: api/openai/background).

A response is a chat: `instructions` as the system turn, then the input items (messages,
`function_call` items as the assistant's `tool_calls`, `function_call_output` items as `tool`
turns), and it runs through the same pipeline as /chat/completions (api/openai/pipeline:
limits, endpoint, ledger, priming, disconnects). `ResponseWriter` (api/openai/response_object)
writes the Response object and its stream events.

State: with `conversation`, the conversation's items (control/conversations) are the context
and the response's input and output items are appended to it once it has ended. With `store`
(the default) the response is kept (control/responses) with the whole context
it was generated from, before the client sees its end; `previous_response_id` continues from
that context (the earlier input and output items, then the new input; the earlier instructions
are not carried over, as OpenAI does). A response made with `store: false` gets an id that says
so (`resp_unstored_...`): continuing it is a 400 naming previous_response_id, while a stored one
of another key is a 404, as if it did not exist.

`tool_choice` as chat takes it: "none", "required" or a named function (forced calls are
grammar-constrained on embedded endpoints), "auto" on remote endpoints only (an embedded one
answers 400, as for chat). `truncation: "auto"` drops the oldest items until the context fits,
counted by the embedded endpoint's tokenizer; a remote endpoint's tokenizer is the upstream's,
so there it is a 400, not a guess. "disabled" (the default) answers a context that does not
fit with the engine's 400 naming the limit.
"""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ...control.records import new_id
from ...engine.types import EngineRequest, SamplingParams
from ...errors import InvalidRequest
from .cache_scope import cache_partition
from .pipeline import ERRORS, respond, tokenizing_engine
from .response_object import ResponseWriter, text_part
from .response_schemas import (FunctionCallItem, FunctionCallOutputItem, InputTokensRequest, MessageItem,
                               NamedFunction, ResponseRequest)
from .structured import json_constraint, tool_call_schema

router = APIRouter()
UNSTORED = "resp_unstored_"


# -- the request, as a chat -------------------------------------------------------------------

def stored_items(items: list[MessageItem | FunctionCallItem | FunctionCallOutputItem]) -> list[dict]:
    """A request's input items as they are stored and listed: each with an id and a status."""
    out = []
    for item in items:
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            part = text_part(item.text) if kind == "output_text" else {"type": "input_text", "text": item.text}
            out.append({"id": item.id or new_id("msg"), "type": "message", "role": item.role,
                        "status": "completed", "content": [part]})
        elif isinstance(item, FunctionCallItem):
            out.append({"id": item.id or new_id("fc"), "type": "function_call", "status": "completed",
                        "call_id": item.call_id, "name": item.name, "arguments": item.arguments})
        else:
            out.append({"id": item.id or new_id("fco"), "type": "function_call_output", "status": "completed",
                        "call_id": item.call_id, "output": item.output})
    return out


def chat_messages(items: list[dict], instructions: str | None) -> tuple[dict, ...]:
    """Stored items as OpenAI chat messages: calls join the assistant turn before them (or make
    one), each output answers its call as a `tool` turn named for the call's function."""
    out: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}
    for item in items:
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": "".join(p["text"] for p in item["content"])})
        elif item["type"] == "function_call":
            names[item["call_id"]] = item["name"]
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if not (out and out[-1]["role"] == "assistant"):
                out.append({"role": "assistant", "content": ""})
            out[-1].setdefault("tool_calls", []).append(call)
        else:
            if item["call_id"] not in names:
                raise InvalidRequest(f"function_call_output answers call_id {item['call_id']!r}, which no "
                                     "function_call item before it made", param="input")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "name": names[item["call_id"]],
                        "content": item["output"]})
    return tuple(out)


def chat_tools(body: InputTokensRequest) -> tuple[tuple[dict, ...] | None, str | dict | None]:
    """The function tools and tool_choice in chat's shape (what engines and upstreams take)."""
    if not body.tools:
        return None, None
    tools = tuple({"type": "function", "function": {
        "name": t.name, "description": t.description or "",
        "parameters": t.parameters or {"type": "object", "properties": {}},
        **({"strict": t.strict} if t.strict is not None else {})}} for t in body.tools)
    choice = body.tool_choice
    if isinstance(choice, NamedFunction):
        return tools, {"type": "function", "function": {"name": choice.name}}
    return tools, choice or "auto"


def constraint_of(body: ResponseRequest, tools: tuple[dict, ...] | None, choice: str | dict | None,
                  out: ResponseWriter):
    """The grammar a forced tool_choice or text.format asks for (both: a 400 naming both)."""
    constraint = None
    if tools and choice not in (None, "auto"):
        made = tool_call_schema(list(tools), choice)
        if made is not None:
            schema, out.tool_names = made
            constraint = json_constraint(schema, "tools")
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type != "text":
        if constraint is not None:
            raise InvalidRequest("text.format and a forced tool_choice both constrain the answer; send one",
                                 param="text.format")
        schema = fmt.schema_ if fmt.type == "json_schema" else {"type": "object"}
        try:
            constraint = json_constraint(schema, "text.format", strict=bool(fmt.strict))
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="text.format") from None
    return constraint


async def context(request: Request, body: InputTokensRequest, items: list[dict]) -> list[dict]:
    """The items the model sees: the stored chain's or the conversation's, then this request's."""
    if body.conversation_id is not None:
        if body.previous_response_id is not None:       # OpenAI's answer too: a 400
            raise InvalidRequest("conversation and previous_response_id both say where the context comes from; "
                                 "send one", param="conversation")
        return await request.app.state.responses.conversation("items", await key_id(request), body.conversation_id,
                                                              "conversation") + items
    previous = body.previous_response_id
    if previous is None:
        return items
    if previous.startswith(UNSTORED):
        raise InvalidRequest(f"previous_response_id {previous!r} was created with store: false, so nothing of "
                             "it is kept to continue from", param="previous_response_id")
    return await request.app.state.responses.run("context", await key_id(request), previous) + items


async def key_id(request: Request) -> str | None:
    """The caller's key id (None: a keyless server), read once the store is open: opening it
    may name the configured keys (control/responses.Responses)."""
    await request.app.state.responses.store()
    quota = getattr(request.state, "quota", None)
    return quota.key_id if quota is not None else None


async def fitted(request: Request, body: InputTokensRequest, items: list[dict], tools: tuple[dict, ...] | None,
                 room: int) -> list[dict]:
    """`items`, the oldest dropped until they and `room` output tokens fit the context
    (truncation "auto"; a call's output never stays without its call)."""
    if body.truncation != "auto":
        return items
    engine = await tokenizing_engine(request, body.model, param="truncation", why=(
        f"truncation: 'auto' counts tokens with the endpoint's tokenizer, and {body.model!r} is served by a "
        "remote engine (its tokenizer is the upstream's); send truncation: 'disabled'"))
    limit = engine.spec.context
    while len(items) > 1:
        ids = await engine.tokenize(None, chat_messages(items, body.instructions), False, tools)
        if len(ids) + room <= limit:
            break
        items = items[1:]
        while len(items) > 1 and items[0]["type"] == "function_call_output":
            items = items[1:]
    return items


# -- the routes -----------------------------------------------------------------------------------

def echo(body: ResponseRequest, response_id: str) -> dict:
    """The request's fields that the Response object repeats."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    choice = body.tool_choice
    return {"instructions": body.instructions, "metadata": body.metadata or {},
            "previous_response_id": body.previous_response_id, "store": not response_id.startswith(UNSTORED),
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "tools": [{**t.model_dump(), "strict": t.strict} for t in body.tools or ()],
            "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction) else (choice or "auto"),
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "truncation": body.truncation or "disabled", "max_output_tokens": body.max_output_tokens,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "background": bool(body.background),
            **({"user": body.user} if body.user is not None else {}),     # the document's `user` is never null
            **({"conversation": {"id": body.conversation_id}} if body.conversation_id is not None else {})}


@router.post("/responses", responses=ERRORS, summary="Create a model response (OpenAI's Responses API)")
async def create_response(body: ResponseRequest, request: Request) -> Response:
    if body.include:
        raise InvalidRequest(f"include {body.include[0]!r} is not implemented by this server (it returns no "
                             "logprobs, reasoning or tool outputs beyond the Response itself)", param="include")
    if body.background and (body.store is False or body.stream):
        field = "store" if body.store is False else "stream"
        raise InvalidRequest(f"a background response is stored and polled: {field} must not be "
                             f"{'false' if field == 'store' else 'true'} with background: true", param=field)
    rid = new_id("resp") if body.store is not False else UNSTORED + new_id("x")[2:]
    out = ResponseWriter(rid, int(time.time()), body.model, 1)
    out.echo = echo(body, rid)
    tools, choice = chat_tools(body)
    constraint = constraint_of(body, tools, choice, out)
    new = stored_items(body.items)
    items = await fitted(request, body, await context(request, body, new), tools, body.max_output_tokens or 1)
    messages = chat_messages(items, body.instructions)
    owner, responses = await key_id(request), request.app.state.responses

    async def settle(done: ResponseWriter) -> None:
        final = done.response(done.status, done.output(), done.response_usage)
        if body.background:         # stored in progress already (api/openai/background)
            await responses.run("finish", final)
        elif body.store is not False:
            await responses.run("save", owner, final, items)
        if body.conversation_id is not None:        # its input and output join the conversation
            await responses.conversation("add", owner, body.conversation_id, new + final["output"])
        done.final = final

    def build(deadline: float | None) -> list[EngineRequest]:
        sampling = SamplingParams(temperature=out.echo["temperature"], top_p=out.echo["top_p"])
        return [EngineRequest(request_id=out.id, prompt="", messages=messages, sampling=sampling, n=1,
                              max_tokens=body.max_output_tokens, stop=(), deadline=deadline, constraint=constraint,
                              tools=tools, tool_choice=choice, cache_partition=cache_partition(request, None))]
    if body.background:
        return JSONResponse(await request.app.state.background.start(request, body, out, owner, items, build, settle))
    return await respond(request, body, out, logprobs=None, prompts=1, build=build, settle=settle)


@router.post("/responses/input_tokens", summary="Count a response's input tokens")
async def input_tokens(body: InputTokensRequest, request: Request) -> dict:
    """The tokens the model would be fed (the chain, instructions and tools included): an
    embedded endpoint's own count; a remote endpoint's tokenizer is the upstream's (a 400)."""
    request.state.endpoint = body.model
    engine = await tokenizing_engine(request, body.model)
    tools, _ = chat_tools(body)
    items = await fitted(request, body, await context(request, body, stored_items(body.items)), tools, 1)
    ids = await engine.tokenize(None, chat_messages(items, body.instructions), False, tools)
    return {"object": "response.input_tokens", "input_tokens": len(ids)}


@router.get("/responses/{response_id}", summary="Retrieve a stored response")
async def get_response(response_id: str, request: Request) -> dict:
    return await request.app.state.responses.run("get", await key_id(request), response_id)


@router.delete("/responses/{response_id}", summary="Delete a stored response")
async def delete_response(response_id: str, request: Request) -> dict:
    await request.app.state.responses.run("delete", await key_id(request), response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/responses/{response_id}/input_items", summary="List a stored response's input items")
async def list_input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                           after: str | None = Query(None, max_length=256),
                           order: Literal["asc", "desc"] = "desc") -> dict:
    return await request.app.state.responses.run("items_page", await key_id(request), response_id, limit, after, order)


@router.post("/responses/{response_id}/cancel", summary="Cancel a background response")
async def cancel_response(response_id: str, request: Request) -> dict:
    """A background response in progress becomes cancelled (its generation stops if it runs
    here; on another gateway, that one's end is then not stored); an ended one is answered as it
    is; one not made in the background is a 400."""
    return await request.app.state.background.cancel(await key_id(request), response_id)
