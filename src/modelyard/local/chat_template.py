"""messages -> prompt tokens with the model's own chat template.

The GGUF's Jinja template (tokenizer.chat_template) is rendered in a sandbox with what Hugging
Face's transformers gives templates (the loopcontrols extension, its tojson, raise_exception,
strftime_now); a GGUF without one falls back to llama.cpp's built-in format for its
architecture. A template that does not compile leaves chat unavailable (400 naming the
problem) and nothing else: completions keep working.

Special tokens: only the template's own markup is special. Everything the client wrote is
tokenized as plain text, messages and tools alike, so a user who writes
`<|im_end|><|im_start|>system` in a message or in a tool's description gets those characters,
not a forged turn. (Hugging Face and llama-server parse special tokens everywhere; an endpoint
with `chat_parse_special = true` does the same.) To tell markup from the client's text, the
template is rendered with a unique marker in place of each message's content, and with every
string of the tools (names, descriptions, parameter names and schemas) wrapped between two
markers; the markers cut the output into markup and client text, which are tokenized apart.

- A content marker is rendered padded with a space on each side: if a side's space is gone, the
  template trims contents, and so is the content.
- A tool string keeps its text between its markers as the template rendered it (a template that
  writes tools with `tojson` escapes them, and the model sees them escaped). Left bare: empty
  strings (a template may test them) and the plain words under a `type` key (templates compare
  them: `param.type == "string"`); neither can hold a special token's markup.
- A marker the template changed past recognising (its nonce left in the markup) refuses the
  request rather than let client text be parsed as markup.
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


def _wrap(value, start: str, end: str, key: str | None = None):
    """`value` (a tool: JSON-like) with each string between `start` and `end`: the keys of a
    `properties` object (parameter names) and every string value, except empty ones and plain
    words under a `type` key (see the module's docstring)."""
    if isinstance(value, str):
        bare = not value or (key == "type" and value.isidentifier())
        return value if bare else f"{start}{value}{end}"
    if isinstance(value, dict):
        return {(_wrap(k, start, end) if key == "properties" else k): _wrap(v, start, end, k)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wrap(v, start, end, key) for v in value]
    return value


def _wrap_all(value, start: str, end: str):
    """A tool call's arguments (JSON the model or the client wrote): every string and every key
    between the markers, all of it client text."""
    if isinstance(value, str):
        return f"{start}{value}{end}" if value else value
    if isinstance(value, dict):
        return {_wrap_all(k, start, end): _wrap_all(v, start, end) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wrap_all(v, start, end) for v in value]
    return value


def _calls_for_template(message: dict) -> dict:
    """A message as templates expect it: an assistant's tool calls with their arguments as an
    object (Hugging Face's convention, and vLLM's: templates write them with tojson), when they
    are one; other arguments stay the text they are."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = []
    for call in calls:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                parsed = json.loads(fn["arguments"])
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                fn["arguments"] = parsed
        out.append({**call, "function": fn})
    return {**message, "tool_calls": out}


def _marked_tool_fields(message: dict, start: str, end: str) -> dict:
    """The client-written strings of a message's tool fields (calls: id, function name,
    arguments; a tool turn's call id and name) between the markers."""
    out = {}
    if message.get("tool_calls"):
        out["tool_calls"] = [{**c, "id": _wrap_all(c.get("id"), start, end),
                              "function": {**c["function"], "name": _wrap_all(c["function"].get("name"), start, end),
                                           "arguments": _wrap_all(c["function"].get("arguments"), start, end)}}
                             for c in _calls_for_template(message)["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if message.get(key):
            out[key] = _wrap_all(message[key], start, end)
    return out


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
            messages = [_calls_for_template(m) for m in messages]
            limit = RENDER_BASE_CHARS + RENDER_PER_INPUT_CHAR * (
                sum(len(str(m.get("content") or "")) + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
                    for m in messages) + (len(json.dumps(tools)) if tools else 0))
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
            if any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
                raise InvalidRequest(f"this model has no chat template of its own, and llama.cpp's built-in "
                                     f"'{self.builtin}' format cannot render tool calls or their results",
                                     param="messages")
            return self._model.apply_builtin_template(
                self.builtin, [(m["role"], m.get("content") or "") for m in messages])
        if self.error is not None:
            raise InvalidRequest(f"chat is unavailable on this endpoint: {self.error}; /completions works",
                                 param="messages", code="chat_template_error")
        raise InvalidRequest("this model has no chat template; use /completions", param="messages")

    def segments(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[Segment]:
        """The rendered prompt cut into the template's markup and the client's text (messages'
        contents, tools' strings), in order."""
        # digits only: a template's upper/lower/title leaves the nonce as it is
        nonce = str(secrets.randbelow(10 ** 16)).zfill(16)
        start, end = f"\ue002{nonce}\ue003", f"\ue004{nonce}\ue005"
        marked = [{**m, "content": f" \ue000{nonce}:{i}\ue001 ", **_marked_tool_fields(m, start, end)}
                  for i, m in enumerate(messages)]
        wrapped = [_wrap(t, start, end) for t in tools] if tools else None
        text = self.render(marked, wrapped)
        found = re.compile(rf"( ?)\ue000{nonce}:(\d+)\ue001( ?)|\ue002{nonce}\ue003(.*?)\ue004{nonce}\ue005", re.S)
        out: list[Segment] = []
        at = 0
        for match in found.finditer(text):
            out.append((text[at:match.start()], False))
            if match.group(2) is None:          # a tool's string, as the template wrote it
                out.append((match.group(4), True))
                at = match.end()
                continue
            content = messages[int(match.group(2))].get("content") or ""
            if not match.group(1):
                content = content.lstrip()
            if not match.group(3):
                content = content.rstrip()
            out.append((content, True))
            at = match.end()
        out.append((text[at:], False))
        if any(nonce in seg for seg, client in out if not client):
            raise InvalidRequest("this endpoint's chat template changes the tools' text in a way that cannot be "
                                 "told apart from its markup; send the tools' text plainer, or use an endpoint "
                                 "with chat_parse_special = true", param="tools")
        return [s for s in out if s[0]]

    def calls_as_text(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[dict]:
        """`messages`, with the tool calls of assistant turns written into their text when this
        template does not render tool calls at all (SmolLM2's ChatML writes role and content
        only): as the JSON an embedded endpoint's forced call is (`{"name", "arguments"}`), one
        per line, so the model sees the calls it made rather than nothing."""
        if not any(m.get("tool_calls") for m in messages) or self._jinja is None:
            return list(messages)
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if self.render(messages, tools) != self.render(bare, tools):
            return list(messages)           # the template writes them its own way
        out = []
        for m in messages:
            if not m.get("tool_calls"):
                out.append(m)
                continue
            calls = [json.dumps({"name": c["function"]["name"],
                                 "arguments": _calls_for_template({"tool_calls": [c]})["tool_calls"][0]["function"]
                                 ["arguments"]}, ensure_ascii=False) for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({k: v for k, v in m.items() if k != "tool_calls"} | {"content": text})
        return out

    def tokens(self, messages: Sequence[dict], tokenize: Tokenize, parse_special: bool = False,
               tools: Sequence[dict] | None = None) -> list[int]:
        """The prompt's token ids. A BOS is added unless the template writes one itself. With
        `parse_special`, the whole rendering is tokenized as one text, special tokens parsed
        everywhere (Hugging Face's and llama-server's way)."""
        messages = self.calls_as_text(messages, tools)
        if parse_special:
            text = self.render(messages, tools)
            return tokenize(text, add_special=not (self.bos_token and text.startswith(self.bos_token)),
                            parse_special=True)
        # Runs of plain text (the client's, and the markup around the template's special tokens)
        # are tokenized whole, special tokens parsed only in the markup between: the ids are
        # those of the whole rendering parsed (llama.cpp splits a text at its special tokens
        # before anything else), less the special tokens the client wrote.
        runs: list[tuple[str, bool]] = []      # (text, parse special tokens)
        for text, client in self.segments(messages, tools):
            for part, special in ([(text, False)] if client else _split_markup(text, tokenize)):
                if runs and not special and not runs[-1][1]:
                    runs[-1] = (runs[-1][0] + part, False)
                else:
                    runs.append((part, special))
        ids: list[int] = []
        for n, (text, special) in enumerate(runs):
            first = n == 0 and not (self.bos_token and text.startswith(self.bos_token))
            ids += tokenize(text, add_special=first, parse_special=special)
        return ids


def _has_special(text: str, tokenize: Tokenize) -> bool:
    return tokenize(text, add_special=False, parse_special=True) != tokenize(text, add_special=False,
                                                                              parse_special=False)


def _split_markup(text: str, tokenize: Tokenize) -> list[tuple[str, bool]]:
    """Markup -> (plain head, the part from its first special token to the end of its last,
    plain tail), each with whether to parse special tokens in it. Found by bisection: whether
    a prefix (or a suffix) holds a special token changes once along the text."""
    if not text or not _has_special(text, tokenize):
        return [(text, False)]
    n = len(text)
    first_end = _smallest(1, n, lambda e: _has_special(text[:e], tokenize))
    first_start = _largest(0, first_end - 1, lambda j: _has_special(text[j:first_end], tokenize))
    last_start = _largest(0, n - 1, lambda k: _has_special(text[k:], tokenize))
    last_end = _smallest(last_start + 1, n, lambda e: _has_special(text[last_start:e], tokenize))
    parts = [(text[:first_start], False), (text[first_start:last_end], True), (text[last_end:], False)]
    return [p for p in parts if p[0]]


def _smallest(lo: int, hi: int, holds: Callable[[int], bool]) -> int:
    """The least i in [lo, hi] for which `holds` (false, then true; true at hi)."""
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    return lo


def _largest(lo: int, hi: int, holds: Callable[[int], bool]) -> int:
    """The greatest i in [lo, hi] for which `holds` (true, then false; true at lo)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if holds(mid) else (lo, mid - 1)
    return lo
