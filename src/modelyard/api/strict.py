"""`StrictBody`: the base of request bodies that refuse unknown fields (Anthropic's Messages and
OpenAI's Responses APIs both answer 400 naming such a field), while a null field is an absent
one: a client sends back the blocks or items it was given, and the fields this server does not
use are null in them (`caller`, `toolset_name`, an output item's logprobs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data
