"""OpenAI's Responses API request bodies (`POST /responses`, `POST /responses/input_tokens`), each
field bounded.

Unknown fields are refused (400 naming them, api/errors), as OpenAI's API does: a field this
server does not implement (`reasoning`, built-in tools, images) must not be ignored; `include` is
taken only empty (api/openai/responses refuses the rest).
The openai client sends only the fields its caller set, so a refusal names something the caller
asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from ...settings import MAX_NAME
from ..strict import StrictBody
from .schemas import MAX_CALL_ARGUMENTS, MAX_CALL_ID, MAX_MESSAGES, MAX_TOOLS

MAX_PARTS = 1024             # content parts of one message item
MAX_ID = 256                 # an item's or a response's id, as a client sends it back
MAX_METADATA = 16            # OpenAI's bounds on metadata: pairs, key and value characters
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class TextPart(StrictBody):
    # output_text: an assistant message sent back (its annotations and logprobs are not used)
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None
    logprobs: list | None = None


class MessageItem(StrictBody):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, Annotated[list[TextPart], Field(max_length=MAX_PARTS)]]
    id: str | None = Field(None, max_length=MAX_ID)
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(StrictBody):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=MAX_CALL_ID)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    arguments: str = Field(max_length=MAX_CALL_ARGUMENTS)
    id: str | None = Field(None, max_length=MAX_ID)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(StrictBody):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=MAX_CALL_ID)
    output: str
    id: str | None = Field(None, max_length=MAX_ID)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


InputItem = Annotated[Union[MessageItem, FunctionCallItem, FunctionCallOutputItem], Field(discriminator="type")]
Metadata = Annotated[dict[Annotated[str, Field(max_length=MAX_METADATA_KEY)],
                          Annotated[str, Field(max_length=MAX_METADATA_VALUE)]], Field(max_length=MAX_METADATA)]
MAX_ADDED_ITEMS = 20         # items one request adds to a conversation (OpenAI's limit)


def typed(v: Any) -> Any:
    """OpenAI's "easy" input message, {"role", "content"}, is a message item without its type."""
    if isinstance(v, list):
        return [{**x, "type": "message"} if isinstance(x, dict) and "type" not in x and "role" in x else x for x in v]
    return v


class FunctionTool(StrictBody):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(StrictBody):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class TextFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _json_schema_fields(self) -> "TextFormat":
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("text.format of type json_schema needs name and schema")
        if self.type != "json_schema" and (self.name or self.schema_ is not None or self.strict is not None):
            raise ValueError(f"name, schema and strict belong to text.format of type json_schema, not {self.type}")
        return self


class TextParam(StrictBody):
    format: TextFormat | None = None


class ConversationRef(StrictBody):
    id: str = Field(min_length=1, max_length=MAX_ID)


class InputTokensRequest(StrictBody):
    """What the model would be fed: `POST /responses/input_tokens` takes these fields only."""

    model: str = Field(min_length=1, max_length=MAX_NAME)
    input: Union[str, Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=MAX_ID)
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunction, None] = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    truncation: Literal["auto", "disabled"] | None = None

    conversation: Union[Annotated[str, Field(min_length=1, max_length=MAX_ID)], ConversationRef, None] = None

    _typed = field_validator("input", mode="before")(typed)

    @property
    def conversation_id(self) -> str | None:
        return self.conversation.id if isinstance(self.conversation, ConversationRef) else self.conversation

    @model_validator(mode="after")
    def _tools(self) -> "InputTokensRequest":
        names = [t.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"tools: function names must be unique, got {names}")
        if isinstance(self.tool_choice, NamedFunction) and self.tool_choice.name not in names:
            raise ValueError(f"tool_choice names function {self.tool_choice.name!r}, which is not in tools")
        if self.tool_choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools")
        return self

    @property
    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)


class ResponseRequest(InputTokensRequest):
    store: bool | None = True
    stream: bool | None = False
    background: bool | None = None
    # what else to return (logprobs, reasoning, tool outputs): none of it is implemented, so only
    # an empty list is taken (OpenAI's Agents SDK always sends one); anything else: a 400 (responses.py)
    include: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=16)] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    metadata: Metadata | None = None
    user: str | None = Field(None, max_length=MAX_NAME)

    # what api/openai/pipeline reads of a generation request (no client field: one choice, no
    # stop strings, usage always in the final event)
    @property
    def n(self) -> int:
        return 1

    @property
    def stops(self) -> tuple[str, ...]:
        return ()

    @property
    def include_usage(self) -> bool:
        return False


# -- conversations (api/openai/conversations) ---------------------------------------------------

class ConversationCreate(StrictBody):
    items: Annotated[list[InputItem], Field(max_length=MAX_ADDED_ITEMS)] | None = None
    metadata: Metadata | None = None

    _typed = field_validator("items", mode="before")(typed)


class ConversationUpdate(StrictBody):
    metadata: Metadata


class ItemsCreate(StrictBody):
    items: Annotated[list[InputItem], Field(min_length=1, max_length=MAX_ADDED_ITEMS)]

    _typed = field_validator("items", mode="before")(typed)
