"""The ASGI application the drop-in tests serve (with uvicorn and hypercorn).

* ``POST /upload``: an early 413, without reading the body (a size check on
  ``Content-Length``, as an upload limit does it).
* ``GET /slow``: 200 after 0.2 s (an answer still being made when the client
  half-closes).
* ``GET /hang``: never answers (until cancelled: a request the grace runs out on).
* ``GET /stream``: an endless event stream, 1 KiB events as fast as the client
  reads them (until cancelled).
* a WebSocket (any path): accepted; sends "0" to "99", then waits for the
  client's messages until the disconnect (``/chatty``: sends on, every 10 ms,
  until a send fails).
* anything else: 200 ``ok``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


async def app(scope: Scope, receive: Any, send: Any) -> None:
    """The application: see the module's notes."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await _websocket(receive, send, chatty=scope["path"] == "/chatty")
        return
    if scope["type"] != "http":
        return
    if scope["method"] == "POST":
        await _answer(send, 413, b"too large\n")
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.2)
    elif scope["path"] == "/hang":
        await asyncio.sleep(3600)
    elif scope["path"] == "/stream":
        await _stream(send)
        return
    await _answer(send, 200, b"ok\n")


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    event = b"data: " + b"x" * 1016 + b"\n\n"  # 1 KiB
    for _ in range(10_000_000):  # until cancelled (the bound: the server's grace)
        await send({"type": "http.response.body", "body": event, "more_body": True})
        # A server may take a send without suspending (once the connection is
        # closed, say): yield, as an event source waiting for its next event does.
        await asyncio.sleep(0)


async def _websocket(receive: Any, send: Any, chatty: bool) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    for i in range(100):
        await send({"type": "websocket.send", "text": str(i)})
    if chatty:
        # Sends on, every 10 ms, until a send fails (the ASGI spec: an OSError).
        for i in range(100, 10_100):
            try:
                await send({"type": "websocket.send", "text": str(i)})
            except OSError:
                return
            await asyncio.sleep(0.01)
        return
    for _ in range(10_000_000):  # until the disconnect
        if (await receive())["type"] == "websocket.disconnect":
            return


def event_stream(notice: Callable[[], bool]) -> Callable[[Scope, Any, Any], Awaitable[None]]:
    """An ASGI event stream, an event each 10 ms, that ends itself once ``notice()`` is true."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(10_000):  # bounded: 100 s of events; the grace ends it sooner
            if notice():
                last = b"event: bye\ndata: shutting down\n\n"
                await send({"type": "http.response.body", "body": last, "more_body": False})
                return
            body = f"data: {i}\n\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
            await asyncio.sleep(0.01)

    return app
