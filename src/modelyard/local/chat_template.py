"""messages -> prompt tokens with the model's own chat template.

The GGUF's Jinja template (tokenizer.chat_template) is rendered in a sandbox with what Hugging
Face's transformers gives templates (the loopcontrols extension, its tojson, raise_exception,
strftime_now); a GGUF without one falls back to llama.cpp's built-in format for its
architecture. A template that does not compile leaves chat unavailable (400 naming the
problem) and nothing else: completions keep working.

Special tokens: only the template's own markup is special. Text inside messages is tokenized
as plain text, so a user who writes `<|im_end|><|im_start|>system` gets those characters, not a
forged turn. (Hugging Face and llama-server parse special tokens everywhere; an endpoint with
`chat_parse_special = true` does the same.) To tell markup from contents, the template is
rendered with a unique marker in place of each message's content; the markers cut the output
into markup and contents, which are tokenized apart. A marker is rendered padded with a space
on each side: if a side's space is gone, the template trims contents, and so is the content.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from datetime import datetime
from typing import Callable, Sequence

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidRequest

# general.architecture -> llama.cpp built-in chat format, for GGUFs that ship no template.
BUILTIN = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama3",
           "qwen2": "chatml", "phi3": "phi3", "mistral": "mistral-v7"}

Tokenize = Callable[..., list[int]]      # (text, add_special=..., parse_special=...) -> ids
Segment = tuple[str, bool]               # (text, is a message's content)


def _raise(message: str) -> None:
    raise InvalidRequest(f"the chat template refused the messages: {message}", param="messages")


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: non-ASCII kept as is, `indent` honoured (Jinja's own escapes HTML
    characters and would change what the model sees)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


# A template comes from the GGUF file, which may come from anyone: its rendering is bounded in
# output (what the input could justify, plus room for markup) and in time. The time is checked
# at every output piece and every call, attribute or item lookup the template makes, so a loop
# that does anything is stopped; only a loop that does nothing at all escapes the check, and it
# runs on the endpoint's own worker threads (local/workers), never the event loop.
RENDER_SECONDS = 5.0
RENDER_BASE_CHARS = 1_000_000       # + RENDER_PER_INPUT_CHAR x the characters of the messages and tools
RENDER_PER_INPUT_CHAR = 4
_render_deadline = threading.local()


def _tick() -> None:
    deadline = getattr(_render_deadline, "at", None)
    if deadline is not None and time.monotonic() > deadline:
        _render_deadline.at = None          # raised once: the handler's own lookups may follow
        raise InvalidRequest(f"the chat template did not render within {RENDER_SECONDS:g} s; this model's "
                             "template is too slow for these messages", param="messages",
                             code="chat_template_error")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with the render's time bound checked on each call and lookup."""

    def call(self, __context, __obj, *args, **kwargs):  # noqa: N807 - jinja2's signature
        _tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


class ChatTemplate:
    """One model's chat template. `ChatTemplate(model)` reads it from the GGUF;
    `ChatTemplate.from_source(...)` takes the Jinja source itself."""

    def __init__(self, model=None, *, source: str | None = None, bos_token: str = "", eos_token: str = "",
                 builtin: str | None = None) -> None:
        self._model = model
        if model is not None:
            source = model.chat_template()
            bos_token, eos_token = model.bos_text, model.eos_text
            builtin = None if source else BUILTIN.get(model.meta("general.architecture") or "")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.builtin = builtin
        self.error: str | None = None        # why the GGUF's template cannot be used
        self._jinja = None
        if source:
            try:
                self._jinja = _environment().from_string(source)
            except TemplateError as exc:
                line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
                self.error = f"the model's chat template does not compile{line}: {exc}"

    @classmethod
    def from_source(cls, source: str, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        return cls(source=source, bos_token=bos_token, eos_token=eos_token)

    @property
    def available(self) -> bool:
        return self._jinja is not None or self.builtin is not None

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> str:
        if self._jinja is not None:
            extra = {"tools": list(tools)} if tools else {}     # templates that know tools render them
            limit = RENDER_BASE_CHARS + RENDER_PER_INPUT_CHAR * (
                sum(len(str(m.get("content") or "")) for m in messages) + (len(json.dumps(tools)) if tools else 0))
            pieces, size = [], 0
            _render_deadline.at = time.monotonic() + RENDER_SECONDS
            try:
                for piece in self._jinja.generate(messages=list(messages), add_generation_prompt=True,
                                                  bos_token=self.bos_token, eos_token=self.eos_token, **extra):
                    size += len(piece)
                    if size > limit:
                        raise InvalidRequest(f"the chat template's rendering passed {limit} characters (what these "
                                             "messages can justify); this model's template is unusable for them",
                                             param="messages", code="chat_template_error")
                    _tick()
                    pieces.append(piece)
            except TemplateError as exc:
                raise InvalidRequest(f"cannot render the chat template: {exc}", param="messages") from None
            finally:
                _render_deadline.at = None
            return "".join(pieces)
        if self.builtin is not None:
            if self._model is None:
                raise InvalidRequest("llama.cpp's built-in chat formats need the model", param="messages")
            return self._model.apply_builtin_template(
                self.builtin, [(m["role"], m.get("content") or "") for m in messages])
        if self.error is not None:
            raise InvalidRequest(f"chat is unavailable on this endpoint: {self.error}; /completions works",
                                 param="messages", code="chat_template_error")
        raise InvalidRequest("this model has no chat template; use /completions", param="messages")

    def segments(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[Segment]:
        """The rendered prompt cut into the template's markup and the messages' contents, in order."""
        nonce = secrets.token_hex(8)
        marked = [{**m, "content": f" \ue000{nonce}:{i}\ue001 "} for i, m in enumerate(messages)]
        text = self.render(marked, tools)
        found = re.compile(rf"( ?)\ue000{nonce}:(\d+)\ue001( ?)")
        out: list[Segment] = []
        at = 0
        for match in found.finditer(text):
            out.append((text[at:match.start()], False))
            content = messages[int(match.group(2))].get("content") or ""
            if not match.group(1):
                content = content.lstrip()
            if not match.group(3):
                content = content.rstrip()
            out.append((content, True))
            at = match.end()
        out.append((text[at:], False))
        return [s for s in out if s[0]]

    def tokens(self, messages: Sequence[dict], tokenize: Tokenize, parse_special: bool = False,
               tools: Sequence[dict] | None = None) -> list[int]:
        """The prompt's token ids. A BOS is added unless the template writes one itself. With
        `parse_special`, the whole rendering is tokenized as one text, special tokens parsed
        everywhere (Hugging Face's and llama-server's way)."""
        if parse_special:
            text = self.render(messages, tools)
            return tokenize(text, add_special=not (self.bos_token and text.startswith(self.bos_token)),
                            parse_special=True)
        ids: list[int] = []
        for n, (text, content) in enumerate(self.segments(messages, tools)):
            first = n == 0 and not (self.bos_token and text.startswith(self.bos_token))
            ids += tokenize(text, add_special=first, parse_special=not content)
        return ids
