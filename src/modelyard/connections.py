"""What one client connection may hold: a deadline for each request head, and a cap on the
connections open at once. uvicorn's h11 protocol, subclassed, because uvicorn has neither.

- uvicorn arms no timer on a new connection, and cancels its keep-alive timer as soon as any
  byte of the next request arrives: a client that sends half a request head and then nothing
  (a slow-loris) holds its socket, its file descriptor and its buffers for ever. Here a
  connection gets `header_timeout` seconds from when it opens, or from the first byte of a
  later request on a kept-alive connection, to deliver that request's complete head; past it,
  the connection is closed without an answer (as nginx's client_header_timeout does: a client
  that cannot send a head in time is not reading answers, and a 408 written on an idle
  connection is read by some clients as the answer to their next request).
- h11's `max_incomplete_event_size` bounds only a head still incomplete in its buffer: a
  larger head that arrives whole is parsed. Here a complete head over `max_header_bytes` (its
  method, target, header names and values) is a protocol error too: uvicorn's 400, closed.
- uvicorn's `limit_concurrency` answers 503 only once a complete request head has arrived, so
  half-sent heads are held whatever the limit, and it counts the connection asking, so N lets
  N-1 connections work. Here at most `max_connections` are open: one past that is answered 503
  (OpenAI's error shape, Retry-After) as soon as it opens, and closed.
- An answer given while the client is still sending its body (a 413 for a body over the limit,
  a 401 before the body is read: api/middleware/body_limits) ends with `Connection: close`. A
  plain close() with the body's bytes still arriving makes the kernel answer them with a TCP
  reset, and a client that reads the reset before the answer sees "connection reset by peer"
  in place of the 413 that names its limit. Here such a connection is closed as nginx's
  lingering_close does it: the answer and a FIN go out (write_eof), what the client still
  sends is read and dropped (never held), and the socket closes when the client's FIN comes,
  or after LINGER_SECONDS or LINGER_BYTES, whichever is first.

Bodies are not timed here: a request's body is read by the app (api/middleware/body_limits.BodyLimits bounds
its size) and a whole request by [server] request_timeout; docs/reliability.md says what a
reverse proxy in front should still do.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import QueueFull

log = logging.getLogger("modelyard.connections")

# A lingering close's bounds (nginx: lingering_time 30 s, lingering_timeout 5 s, no byte bound):
# shorter here, and bounded in bytes too, because a refused client costs only this much.
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024


class _HeadLimited(h11.Connection):
    """h11's server side, refusing a complete head over `max_head` bytes as it does an
    incomplete one."""

    def __init__(self, max_head: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            # method, target, header names and values; separators and line ends not counted
            size = len(event.method) + len(event.target) + sum(
                len(name) + len(value) for name, value in event.headers.raw_items())
            if size > self.max_head:
                raise h11.RemoteProtocolError(f"request head of {size} bytes, over {self.max_head}")
        return event


class BoundedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout: float, max_connections: int, max_header_bytes: int,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _HeadLimited(max_header_bytes)       # in place of uvicorn's, before any byte
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._head_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:       # this one is not among them yet
            self._refused = True
            self.transport = transport
            transport.write(_too_many(self.max_connections))
            transport.close()
            return
        super().connection_made(transport)
        # In place of uvicorn's transport for everything uvicorn does with it, its cycles included.
        self.transport = _LingeringClose(transport, self)        # type: ignore[assignment]
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:        # never counted, never parsed: nothing to undo
            return
        self._cancel_head_deadline()
        if isinstance(self.transport, _LingeringClose):
            self.transport.lost()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if isinstance(self.transport, _LingeringClose) and self.transport.lingering:
            self.transport.dropped(len(data))       # the rest of a refused body: never parsed
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # Bytes of a head, not all of it yet: on a kept-alive connection uvicorn has just
            # cancelled its keep-alive timer, so the deadline starts now if none runs.
            if self._head_deadline is None and not self.transport.is_closing():
                self._arm_head_deadline()
        else:                   # the head is complete: the request is the app's now
            self._cancel_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection from %s: no complete request head within %ss",
                      self.client, self.header_timeout)
            self.transport.close()


class _LingeringClose:
    """The connection's transport, whose close() lingers while the client is still sending its
    request body (see the module's docstring); every other call goes to the transport."""

    def __init__(self, transport: asyncio.Transport, protocol: BoundedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False
        self.lingering = False
        self._dropped = 0
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._protocol.conn.their_state is not h11.SEND_BODY or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()         # after what is buffered: the whole answer, then FIN
        self._transport.resume_reading()    # uvicorn may have paused it at its body high-water mark
        self._timer = self._protocol.loop.call_later(LINGER_SECONDS, self._transport.close)

    def dropped(self, n: int) -> None:
        self._dropped += n
        if self._dropped > LINGER_BYTES:
            self._transport.close()

    def lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _too_many(limit: int) -> bytes:
    error = QueueFull(f"this server already holds its limit of {limit} open connections "
                      "([server] max_connections); retry shortly", code="too_many_connections")
    body = json.dumps(error.body()).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"retry-after: 1\r\nconnection: close\r\ncontent-length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


def protocol(header_timeout: float, max_connections: int, max_header_bytes: int) -> Callable[..., BoundedH11Protocol]:
    """The `http` protocol factory for uvicorn.Config."""
    return functools.partial(BoundedH11Protocol, header_timeout=header_timeout, max_connections=max_connections,
                             max_header_bytes=max_header_bytes)
