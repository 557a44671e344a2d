"""Request and response bodies, exactly per the spec plus the OpenAI fields clients send.

A field sent as null means absent (official clients send "seed": null, "logprobs": null).
Unknown fields are ignored. Validation failures become FastAPI's 422 {"detail": [...]}.
"""

from __future__ import annotations

import re
from typing import Annotated, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, WithJsonSchema,
                      field_validator, model_validator)

from ..engine.types import Constraint
from .structured import StructuredFields


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

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Union[str, Annotated[list[str], Field(min_length=1)], TokenIds,
               Annotated[list[TokenIds], Field(min_length=1)]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class GenerationRequest(StructuredFields):
    """Fields shared by /completions and /chat/completions, validated the same way (with the
    structured-output fields of api/structured)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    n: int | None = Field(None, ge=1)
    stop: Union[str, Annotated[list[str], Field(min_length=1)], None] = None
    max_tokens: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    user: str | None = None

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
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], str):
            return list(p)
        if isinstance(p[0], int):
            return [tuple(p)]
        return [tuple(ids) for ids in p]

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
