"""Run hypercorn or aiohttp, stock or with the aiograceful drop-in, on 127.0.0.1, port 0.

``python tests/_serve_main.py {hypercorn,aiohttp} {stock,dropin} {asyncio,uvloop} [GRACE]``
(GRACE: hypercorn's ``graceful_timeout``, aiohttp's ``shutdown_timeout``; 5 s by default).
Both log ``Running on http://127.0.0.1:PORT``; both serve ``_asgi_app``'s routes
(hypercorn the ASGI app itself, aiohttp the same answers as aiohttp handlers).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop


def _hypercorn(
    dropin: bool, run: Callable[[Coroutine[Any, Any, None]], None], grace: float
) -> None:
    from _asgi_app import app
    from hypercorn.config import Config

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = grace
    if dropin:
        from aiograceful.hypercorn import serve as dropin_serve

        run(dropin_serve(app, config))  # type: ignore[arg-type]
    else:
        from hypercorn.asyncio import serve

        run(serve(app, config))  # type: ignore[arg-type]


def _aiohttp(dropin: bool, loop: asyncio.AbstractEventLoop, grace: float) -> None:
    from aiohttp import web

    async def upload(request: web.Request) -> web.Response:
        return web.Response(status=413, text="too large\n")  # the body is not read

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(text="ok\n")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = b"data: " + b"x" * 1016 + b"\n\n"  # 1 KiB
        for _ in range(10_000_000):  # until cancelled (the bound: the server's grace)
            await response.write(event)
            await asyncio.sleep(0)  # as an event source waiting for its next event does
        return response

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for i in range(100):
            await ws.send_str(str(i))
        async for _message in ws:  # until the close
            pass
        return ws

    app = web.Application()
    app.add_routes(
        [
            web.get("/ws", websocket),
            web.post("/upload", upload),
            web.get("/slow", slow),
            web.get("/stream", stream),
            web.get("/", ok),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    if dropin:
        from aiograceful.aiohttp import run_app
    else:
        from aiohttp.web import run_app
    run_app(app, sock=sock, shutdown_timeout=grace, loop=loop, access_log=None)


def main() -> None:
    server, build, loop_name = sys.argv[1:4]
    grace = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    dropin = build == "dropin"
    new_loop = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.SelectorEventLoop
    if server == "hypercorn":
        with asyncio.Runner(loop_factory=new_loop) as runner:
            _hypercorn(dropin, runner.run, grace)
    else:
        _aiohttp(dropin, new_loop(), grace)


if __name__ == "__main__":
    main()
