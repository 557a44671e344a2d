"""Anthropic's Messages API request bodies (`POST /v1/messages`, `/v1/messages/count_tokens`),
as its reference defines them, each field bounded.

Unknown fields are refused (400 naming them), as Anthropic's API does: a field this server
does not implement (images, documents, extended thinking, server tools) must not be ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field

from ...settings import MAX_NAME
from ..strict import StrictBody

MAX_MESSAGES = 2048          # as /chat/completions
MAX_BLOCKS = 1024            # content blocks of one message
MAX_TOOLS = 128
MAX_ID = 256
MAX_STOP_SEQUENCES = 4       # the server's [limits] max_stop applies too (api/openai/pipeline)


class TextBlock(StrictBody):
    type: Literal["text"]
    text: str
    cache_control: dict | None = None        # a prompt-caching hint: this server caches prefixes by itself


class ToolUseBlock(StrictBody):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=MAX_ID)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    input: dict[str, Any]
    cache_control: dict | None = None


class ToolResultBlock(StrictBody):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=MAX_ID)
    content: Union[str, Annotated[list[TextBlock], Field(max_length=MAX_BLOCKS)], None] = None
    is_error: bool | None = None
    cache_control: dict | None = None

    @property
    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content or [])
        return f"Error: {text}" if self.is_error else text


ContentBlock = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock], Field(discriminator="type")]


class MessageParam(StrictBody):
    role: Literal["user", "assistant"]
    content: Union[str, Annotated[list[ContentBlock], Field(min_length=1, max_length=MAX_BLOCKS)]]


class Tool(StrictBody):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict | None = None


class ToolChoice(StrictBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    disable_parallel_tool_use: bool | None = None


class Metadata(StrictBody):
    user_id: str | None = Field(None, max_length=256)


class OutputFormat(StrictBody):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(StrictBody):
    """Structured output: the answer is JSON valid against `format.schema` (constrained as
    /chat/completions' json_schema is). `effort` means nothing to these models: refused."""
    format: OutputFormat | None = None
    effort: None = None


class CountTokensRequest(StrictBody):
    model: str = Field(min_length=1, max_length=MAX_NAME)
    messages: Annotated[list[MessageParam], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: Union[str, Annotated[list[TextBlock], Field(max_length=MAX_BLOCKS)], None] = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=1_000_000)
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    # Sampling: Anthropic's API had these (its current client no longer sends them: pass them in
    # extra_body); unset, temperature is 1 (Anthropic's default), so an answer is sampled
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    stream: bool | None = False

    # What api/openai/pipeline.respond reads of any generation request.
    @property
    def n(self) -> int:
        return 1

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop_sequences or ())

    @property
    def include_usage(self) -> bool:
        return True
