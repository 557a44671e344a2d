"""OpenAI's Conversations API: `POST /conversations`, `GET`/`POST`/`DELETE /conversations/{id}`,
`GET`/`POST /conversations/{id}/items`, `GET`/`DELETE /conversations/{id}/items/{item_id}`.

A conversation is a list of items kept in the control database (control/conversations), owned
by the key that made it (another key: 404). A response created with `conversation`
(api/openai/responses) reads its items as the context and appends its input and output.
Items are stored in the shape `input_items` lists them (api/openai/responses.stored_items).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request

from .response_schemas import ConversationCreate, ConversationUpdate, ItemsCreate
from .responses import key_id, stored_items

router = APIRouter()


async def _run(request: Request, method: str, *args: object) -> object:
    return await request.app.state.responses.conversation(method, await key_id(request), *args)


@router.post("/conversations", summary="Create a conversation")
async def create_conversation(body: ConversationCreate, request: Request) -> dict:
    return await _run(request, "create", body.metadata or {}, stored_items(body.items or []))


@router.get("/conversations/{conversation_id}", summary="Retrieve a conversation")
async def get_conversation(conversation_id: str, request: Request) -> dict:
    return await _run(request, "get", conversation_id)


@router.post("/conversations/{conversation_id}", summary="Update a conversation's metadata")
async def update_conversation(conversation_id: str, body: ConversationUpdate, request: Request) -> dict:
    return await _run(request, "update", conversation_id, body.metadata)


@router.delete("/conversations/{conversation_id}", summary="Delete a conversation and its items")
async def delete_conversation(conversation_id: str, request: Request) -> dict:
    await _run(request, "delete", conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.get("/conversations/{conversation_id}/items", summary="List a conversation's items")
async def list_items(conversation_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                     after: str | None = Query(None, max_length=256),
                     order: Literal["asc", "desc"] = "desc") -> dict:
    return await _run(request, "page", conversation_id, limit, after, order)


@router.post("/conversations/{conversation_id}/items", summary="Add items to a conversation")
async def add_items(conversation_id: str, body: ItemsCreate, request: Request) -> dict:
    data = await _run(request, "add", conversation_id, stored_items(body.items))
    return {"object": "list", "data": data, "first_id": data[0]["id"], "last_id": data[-1]["id"], "has_more": False}


@router.get("/conversations/{conversation_id}/items/{item_id}", summary="Retrieve a conversation's item")
async def get_item(conversation_id: str, item_id: str, request: Request) -> dict:
    return await _run(request, "item", conversation_id, item_id)


@router.delete("/conversations/{conversation_id}/items/{item_id}", summary="Delete a conversation's item")
async def delete_item(conversation_id: str, item_id: str, request: Request) -> dict:
    return await _run(request, "delete_item", conversation_id, item_id)
