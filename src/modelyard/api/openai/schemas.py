"""Request and response bodies of the data plane (completions, chat with its messages and tools,
embeddings, errors), exactly per the spec plus the OpenAI fields clients send.

A field sent as null means absent (official clients send "seed": null, "logprobs": null).
Unknown fields are ignored. Validation failures become FastAPI's 422 {"detail": [...]}.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, WithJsonSchema,
                      field_validator, model_validator)

from ...engine.types import Constraint
from ...settings import MAX_KEEP_ALIVE, MAX_NAME, NEVER
from .structured import StructuredFields, json_constraint, tool_call_schema


# A token id as a JSON object key: ASCII digits only. `str.isdigit` also accepts "²" and "٣",
# which int() then rejects (a 500); the one pattern serves validation and the OpenAPI document,
# so fuzzing from the schema generates real token ids as well as malformed keys.
TOKEN_ID_KEY = r"^(0|[1-9][0-9]*)$"


def _token_id_key(key: str) -> str:
    if not re.fullmatch(TOKEN_ID_KEY, key, re.ASCII):
        raise ValueError(f"logit_bias keys must be token ids (non-negative integers without sign or "
                         f"leading zeros), got {key!r}")
    return key


LogitBias = Annotated[
    dict[Annotated[str, AfterValidator(_token_id_key)], Annotated[float, Field(ge=-100, le=100)]],
    WithJsonSchema({"type": "object", "propertyNames": {"type": "string", "pattern": TOKEN_ID_KEY},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})]

# Every field a client sends has a maximum, checked before any work (stop strings: [limits]
# max_stop and max_stop_chars, checked by api/openai/pipeline).
MAX_LOGIT_BIAS = 1024       # token ids biased in one request
MAX_CACHE_SALT = 256        # characters of a cache_salt (only ever compared)

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Union[str, Annotated[list[str], Field(min_length=1)], TokenIds,
               Annotated[list[TokenIds], Field(min_length=1)]]


def each_prompt(p: Prompt) -> tuple[str | tuple[int, ...], ...]:
    """A prompt field (completions' `prompt`, embeddings' `input`) as its separate items: a
    string is one, a list of ids is one, a list of strings or of id lists is one per entry."""
    if isinstance(p, str):
        return (p,)
    if isinstance(p[0], str):
        return tuple(p)  # type: ignore[arg-type]
    if isinstance(p[0], int):
        return (tuple(p),)  # type: ignore[arg-type]
    return tuple(tuple(ids) for ids in p)  # type: ignore[union-attr]


def _keep_alive(value: float) -> float:
    if not (value == NEVER or value >= 0):
        raise ValueError(f"keep_alive must be -1 (never unload) or from 0 to {MAX_KEEP_ALIVE} seconds")
    return value


# Ollama's field: seconds the model stays loaded after this request (-1: never unload); the
# longest a pending request asked for wins (registry/lifecycle). Numbers only, not "5m".
KeepAlive = Annotated[float, Field(ge=-1, le=MAX_KEEP_ALIVE, allow_inf_nan=False, strict=True),
                     AfterValidator(_keep_alive)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class GenerationRequest(StructuredFields):
    """Fields shared by /completions and /chat/completions, validated the same way (with the
    structured-output fields of api/openai/structured)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_NAME)
    temperature: float | None = Field(None, ge=0, le=2)
    n: int | None = Field(None, ge=1)
    stop: Union[str, Annotated[list[str], Field(min_length=1)], None] = None   # [limits] max_stop, max_stop_chars
    max_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    top_p: float | None = Field(None, gt=0, le=1)
    # vLLM's extension (not OpenAI's): draw among the k most likely tokens; 0 or -1: all of them
    top_k: int | None = Field(None, ge=-1, le=1_000_000)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: Annotated[LogitBias, Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = Field(None, max_length=MAX_NAME)
    # vLLM's field: prompts reuse cached prefixes only of requests with the same salt (within the
    # key's partition, api/openai/cache_scope), so a client can keep its prompts apart even from its own.
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)
    keep_alive: KeepAlive | None = None

    _constraint: Constraint | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _one_constraint(self) -> "GenerationRequest":
        self._constraint = self.constraint()       # two constraints: a 422 naming both
        return self

    @property
    def structured(self) -> Constraint | None:
        return self._constraint

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    # OpenAI completions fields beyond the spec
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if v is not None and v != n:
            raise ValueError(f"best_of other than n is not supported (best_of={v}, n={n}); "
                             "request n choices and rank them client-side")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this server")
        return v

    # -- derived, absent-means-default -----------------------------------------------

    @property
    def prompts(self) -> list[str | tuple[int, ...]]:
        return list(each_prompt(self.prompt))

# -- chat -----------------------------------------------------------------------------------

class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


MAX_CALL_ARGUMENTS = 100_000   # characters of one tool call's arguments in the history
MAX_CALL_ID = 256


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    arguments: str = Field(max_length=MAX_CALL_ARGUMENTS)     # JSON text, as the model wrote it


class ToolCall(BaseModel):
    """A call an assistant turn made, sent back in the history (an agent's loop)."""
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=MAX_CALL_ID)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None     # assistant turns
    tool_call_id: str | None = Field(None, max_length=MAX_CALL_ID)                 # tool turns: the call answered
    name: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _tool_fields(self) -> "Message":
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role!r} ones")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"tool_call_id belongs to tool messages, not {self.role!r} ones")
        return self

    def as_dict(self) -> dict:
        """The message as the engines take it: text content, and the tool fields when set (the
        chat template renders the calls; an upstream gets them as OpenAI's fields)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out: dict = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class ToolName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: ToolName


MAX_MESSAGES = 2048      # a conversation's turns in one request (each is templated: work per item)
MAX_TOOLS = 128          # OpenAI's own limit on tools


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    _tool_names: list[str] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _tool_call(self) -> "ChatRequest":
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools")
        if not self.tools:
            return self
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tools: function names must be unique, got {names}")
        choice = self.tool_choice
        wanted = choice.model_dump() if isinstance(choice, NamedToolChoice) else (choice or "auto")
        if wanted == "auto":
            return self     # the engine decides whether it can (embedded: a 400 saying what works)
        made = tool_call_schema([t.model_dump() for t in self.tools], wanted)
        if made is not None:
            if self._constraint is not None:
                raise ValueError(f"tool_choice {wanted if isinstance(wanted, str) else 'function'} "
                                 f"constrains the output already; drop {self._constraint.field}")
            schema, self._tool_names = made
            self._constraint = json_constraint(schema, "tools")
        return self

    @property
    def tool_names(self) -> list[str] | None:
        """The functions the output is a call of (tool_choice required or named), else None."""
        return self._tool_names

    @property
    def tool_mode(self) -> str | dict | None:
        """tool_choice as given (its default with tools: "auto"); None without tools."""
        if not self.tools:
            return None
        c = self.tool_choice
        return c.model_dump() if isinstance(c, NamedToolChoice) else (c or "auto")

    @property
    def k_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CreateEmbeddingRequest(BaseModel):
    """OpenAI's embeddings body, plus `truncate` (modelyard's, as TEI's): an input longer than
    the model's context is cut to it instead of answering 400."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_NAME)
    input: Prompt = Field(description="A string, a list of strings, a list of token ids, or a list of "
                                      "token-id lists; each is embedded separately, in order.")
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded (OpenAI's)")
    dimensions: int | None = Field(None, ge=1, description="Output size, for models that can reduce theirs")
    user: str | None = None
    truncate: bool | None = Field(False, description="Cut inputs longer than the model's context to it "
                                                     "(default: such an input is a 400 naming it)")
    keep_alive: KeepAlive | None = None

    @field_validator("input")
    @classmethod
    def _no_empty_input(cls, v: Prompt) -> Prompt:
        texts = [v] if isinstance(v, str) else v
        empty = next((i for i, t in enumerate(texts) if isinstance(t, str) and not t), None)
        if empty is not None:
            raise ValueError(f"input {empty} is an empty string; every input must have at least one character")
        return v

    @property
    def inputs(self) -> tuple[str, ...] | tuple[tuple[int, ...], ...]:
        """One entry per vector asked for: a string input becomes (string,), ids ((ids),)."""
        return each_prompt(self.input)  # type: ignore[return-value]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody | None = None
