"""The Response object (OpenAI's Responses API) and its semantic stream events, written from the
same generation events a chat completion is made of (`ResponseWriter` is a `ChatCompletion`).

Output items: a `message` with one `output_text` part (none when the answer is only tool calls),
then one `function_call` item per call. A forced call on an embedded endpoint is constrained JSON
text until its choice ends, so calls are sent whole at the end, as chat sends them (one
`function_call_arguments.delta` with the complete arguments); text streams as it comes.

Every event carries an increasing `sequence_number`. The final event (`response.completed`, or
`response.incomplete` when `max_output_tokens` cut the answer) carries the Response as stored:
the route stores it (`settle`) before that event is written, so a client that has seen it can
retrieve it, and a server killed after it keeps it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ...control.records import new_id
from ...engine.types import ChoiceDelta
from .. import sse
from .chat import ChatCompletion


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class ResponseWriter(ChatCompletion):
    echo: dict = field(default_factory=dict)     # the request's fields the Response repeats
    seq: int = 0
    msg_id: str = field(default_factory=lambda: new_id("msg"))
    text_open: bool = False        # the message item is streaming
    sent: int = 0                  # output items whose output_item.added has been sent
    final: dict | None = None      # the Response as stored (set by the route's settle)
    _output: list[dict] | None = None

    # -- the object ----------------------------------------------------------------------------

    @property
    def cut(self) -> bool:
        return self.finish.get(0) == "length"

    @property
    def status(self) -> str:
        return "incomplete" if self.cut else "completed"

    def output(self) -> list[dict]:
        """The output items, made once (a call's id is made with it, and must not change)."""
        if self._output is None:
            message, _ = self._message(0)
            items = []
            calls = message.get("tool_calls") or []
            if message.get("content") or not calls:
                items.append({"id": self.msg_id, "type": "message", "role": "assistant", "status": self.status,
                              "content": [text_part(message.get("content") or "")]})
            for call in calls:
                items.append({"id": new_id("fc"), "type": "function_call", "status": "completed",
                              "call_id": call["id"] or f"call_{uuid.uuid4().hex[:24]}",
                              "name": call["function"]["name"], "arguments": call["function"]["arguments"]})
            self._output = items
        return self._output

    @property
    def response_usage(self) -> dict:
        # cached_tokens: what the prefix cache held of the input (the key's own partition)
        return {"input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens if self.cached_visible else 0,
                                         "cache_write_tokens": 0},
                "output_tokens": self.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def response(self, status: str, output: list[dict], usage: dict | None, error: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": error, "incomplete_details": incomplete, "model": self.model, "output": output,
                **({"usage": usage} if usage is not None else {}), **self.echo}   # the document's usage is never null

    def body(self) -> dict:
        return self.final or self.response(self.status, self.output(), self.response_usage)

    # -- the stream ----------------------------------------------------------------------------

    def _event(self, kind: str, **fields: object) -> str:
        self.seq += 1
        return sse.event(kind, {"type": kind, "sequence_number": self.seq - 1, **fields})

    def sse_start(self) -> list[str]:
        start = self.response("in_progress", [], None)
        return [self._event("response.created", response=start), self._event("response.in_progress", response=start)]

    def _open_text(self) -> list[str]:
        self.text_open, self.sent = True, self.sent + 1
        item = {"id": self.msg_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        return [self._event("response.output_item.added", output_index=0, item=item),
                self._event("response.content_part.added", item_id=self.msg_id, output_index=0, content_index=0,
                            part=text_part(""))]

    def _close_text(self, item: dict) -> list[str]:
        self.text_open = False
        part = item["content"][0]
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        return [self._event("response.output_text.done", **where, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", **where, part=part),
                self._event("response.output_item.done", output_index=0, item=item)]

    def _call(self, index: int, item: dict) -> list[str]:
        self.sent += 1
        where = {"item_id": item["id"], "output_index": index}
        return [self._event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"}),
                self._event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
                self._event("response.function_call_arguments.done", **where, name=item["name"],
                            arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=index, item=item)]

    def sse_delta(self, prompt: int, d: ChoiceDelta, include_usage: bool) -> list[str]:
        self.collect(prompt, d)
        out: list[str] = []
        if d.text and self.tool_names is None:      # a forced call's constrained text is not the answer's text
            if not self.text_open:
                out += self._open_text()
            out.append(self._event("response.output_text.delta", item_id=self.msg_id, output_index=0,
                                   content_index=0, delta=d.text, logprobs=[]))
        if d.finish_reason is None:
            return out
        for index, item in enumerate(self.output()):
            if item["type"] == "message":
                out += ([] if self.text_open else self._open_text()) + self._close_text(item)
            else:
                out += self._call(index, item)
        return out

    def sse_end(self, include_usage: bool) -> list[str]:
        body = self.body()
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        return [self._event(kind, response=body)]

    def sse_error(self, status: int, body: dict) -> str:
        error = body.get("error") or {}
        message = error.get("message") or "error"
        failed = self.response("failed", [], None, {"code": "server_error", "message": message})
        return (self._event("error", code=error.get("type"), message=message, param=error.get("param"))
                + self._event("response.failed", response=failed))

    def sse_close(self) -> list[str]:
        return []
