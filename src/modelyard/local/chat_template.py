"""messages -> prompt text with the model's own chat template.

The GGUF's Jinja template (tokenizer.chat_template) is rendered in a sandbox, as Hugging Face
does; a GGUF without one falls back to llama.cpp's built-in format for its architecture.
"""

from __future__ import annotations

from datetime import datetime
from typing import Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidRequest
from .ffi import LlamaModel

# general.architecture -> llama.cpp built-in chat format, for GGUFs that ship no template.
BUILTIN = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama3",
           "qwen2": "chatml", "phi3": "phi3", "mistral": "mistral-v7"}


def _raise(message: str) -> None:
    raise InvalidRequest(f"the chat template refused the messages: {message}", param="messages")


class ChatTemplate:
    def __init__(self, model: LlamaModel) -> None:
        self._model = model
        source = model.chat_template()
        self.builtin = None if source else BUILTIN.get(model.meta("general.architecture") or "")
        self._jinja = None
        if source:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_raise,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self._jinja = env.from_string(source)

    @property
    def available(self) -> bool:
        return self._jinja is not None or self.builtin is not None

    def render(self, messages: Sequence[dict]) -> str:
        if self._jinja is not None:
            try:
                return self._jinja.render(messages=list(messages), add_generation_prompt=True,
                                          bos_token=self._model.bos_text, eos_token=self._model.eos_text)
            except TemplateError as exc:
                raise InvalidRequest(f"cannot render the chat template: {exc}", param="messages") from None
        if self.builtin is not None:
            return self._model.apply_builtin_template(
                self.builtin, [(m["role"], m.get("content") or "") for m in messages])
        raise InvalidRequest("this model has no chat template; use /completions", param="messages")
