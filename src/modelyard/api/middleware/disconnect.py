"""A client that leaves cancels its request, whatever stage it is at.

Routes await engine work before any byte is sent (priming pulls the first event so that
errors are plain HTTP errors; non-streaming requests collect the whole answer): during those
waits nobody reads the connection, so a client that gives up would leave its request queued
or prefilling for nobody. This middleware reads the ASGI `receive` channel itself, for the
whole request: body messages are handed to the app as they come, and an `http.disconnect`
before the response has ended cancels the app's task. The cancellation reaches the engine
stream being awaited, whose `finally` aborts the request on the engine and frees its slots.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLIENT_GONE = 499      # nginx's "client closed request", for the request log and metrics


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        watcher: asyncio.Task | None = None
        ended = False          # the response's last byte was handed to the server
        left = False           # the client left before that: the app was cancelled for it

        async def watch() -> None:
            nonlocal left
            message = await receive()          # after the body, only http.disconnect comes
            inbox.put_nowait(message)
            if message["type"] == "http.disconnect" and not ended:
                left = True
                scope.setdefault("state", {})["client_gone"] = True
                task.cancel()

        async def app_receive() -> Message:
            nonlocal watcher
            if watcher is not None:            # the body is in: the watcher owns receive()
                message = await inbox.get()
                inbox.put_nowait(message)      # http.disconnect, for every later call too
                return message
            # The body is read on demand, never ahead of the app, so BodyLimits still bounds it.
            message = await receive()
            if message["type"] == "http.disconnect":
                return message
            if not message.get("more_body", False):
                watcher = asyncio.create_task(watch())
            return message

        async def app_send(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        task = asyncio.create_task(self.app(scope, app_receive, app_send))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and left:
                return                         # nobody is left to answer
            if not task.done():                # we were cancelled (server shutdown): so is the app
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
