"""The drop-ins over TLS, in the test's loop, on asyncio and uvloop (certificates made by the
test; needs openssl).

asyncio's SSL transport cannot half-close. A server that closes it while the
client is still uploading makes asyncio's SSL shutdown meet the client's next
record and fail: the client never reads the early answer. Stock uvicorn and
hypercorn lose their early 413 that way on asyncio's loop (uvloop's SSL
shutdown lets the client read it). Each drop-in's close lingers over TLS too:
it keeps reading and discarding until the client closes, then closes with
close_notify. aiohttp reads the body away itself: its 413 arrives, stock and
drop-in alike.

The accept queue at shutdown, over TLS: the queued connections are served
with the listener's TLS context (the handshake happens once accepted).

Each check first shows the stock server, then the drop-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _dropins import HOST, answer, https_uploads, queued_connections

Contexts = tuple[ssl.SSLContext, ssl.SSLContext]
Files = tuple[Path, Path]

#: Far more than loopback's socket buffers: the client is still sending when the 413 comes.
UPLOAD = 8 << 20
ROUNDS = 3


def _is_uvloop() -> bool:
    return type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def _uploads(port: int, client: ssl.SSLContext) -> list[int | str]:
    return await asyncio.to_thread(https_uploads, port, ROUNDS, client, UPLOAD)


def _assert_stock_then_dropin(name: str, stock: list[int | str], dropin: list[int | str]) -> None:
    """The drop-in delivers every 413. Stock: lost on asyncio's loop (where ``name`` is one
    that closes while the body arrives); its figures are in the message either way."""
    assert dropin == [413] * ROUNDS, f"{name}: stock {stock}, drop-in {dropin}"


# -- uvicorn ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _uvicorn(
    http: Any, files: Files, server_class: Callable[[Any], Any] | None = None
) -> AsyncIterator[tuple[Any, int]]:
    """A uvicorn server over TLS on 127.0.0.1, protocol class ``http``; yields it and its port."""
    import uvicorn
    from _asgi_app import app

    cert, key = files
    config = uvicorn.Config(
        app,
        host=HOST,
        port=0,
        lifespan="off",
        log_level="warning",
        http=http,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
    )
    server = (server_class or uvicorn.Server)(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    try:
        yield server, server.servers[0].sockets[0].getsockname()[1]
    finally:
        # (should_exit is main_loop's flag, unused here: it marks a test's own shutdown.)
        if not server.should_exit:
            server.should_exit = True
            await asyncio.wait_for(server.shutdown(), 30)


@pytest.mark.parametrize("parser", ["h11", "httptools"])
async def test_dropins_tls_uvicorn_early_413(
    tls_files: Files, tls_contexts: Contexts, parser: str
) -> None:
    """Over TLS, stock uvicorn loses its early 413 to a ``Connection: close`` upload on
    asyncio's loop; the drop-in's protocol delivers it every time, on both loops."""
    pytest.importorskip("uvicorn")
    if parser == "httptools":
        pytest.importorskip("httptools")
    from aiograceful import uvicorn as graceful_uvicorn

    client = tls_contexts[1]
    async with _uvicorn(parser, tls_files) as (_server, port):
        stock = await _uploads(port, client)
    dropin_class = getattr(
        graceful_uvicorn, "H11Protocol" if parser == "h11" else "HttpToolsProtocol"
    )
    async with _uvicorn(dropin_class, tls_files) as (_server, port):
        dropin = await _uploads(port, client)
    if not _is_uvloop():
        assert stock.count(413) < ROUNDS, f"stock uvicorn delivered: {stock}"
    _assert_stock_then_dropin("uvicorn", stock, dropin)


async def test_dropins_tls_uvicorn_server_drains_the_accept_queue(tls_files: Files) -> None:
    """TLS connections queued at shutdown: ``uvicorn.Server`` resets them, aiograceful's
    ``Server`` accepts them, does the handshake and answers each."""
    pytest.importorskip("uvicorn")
    from aiograceful import uvicorn as graceful_uvicorn

    cert, _key = tls_files
    client = ssl.create_default_context(cafile=str(cert))
    answered = {}
    for name, server_class in (("stock", None), ("dropin", graceful_uvicorn.Server)):
        async with _uvicorn(graceful_uvicorn.H11Protocol, tls_files, server_class) as (
            server,
            port,
        ):
            socks = queued_connections(port, 4)  # the loop accepts none before the shutdown
            server.should_exit = True
            shutdown = asyncio.ensure_future(server.shutdown())
            got = await asyncio.gather(*(asyncio.to_thread(answer, s, client) for s in socks))
            await asyncio.wait_for(shutdown, 30)
        answered[name] = [_status(g) for g in got]
    assert answered["stock"].count(200) < 4, answered
    assert answered["dropin"] == [200] * 4, answered


def _status(got: bytes | str) -> int | str:
    """The status of an HTTP/1.1 answer, or what came instead."""
    if isinstance(got, bytes):
        return int(got[9:12]) if got.startswith(b"HTTP/1.1 ") else repr(got[:20])
    return got


# -- hypercorn ----------------------------------------------------------------------------


@contextlib.contextmanager
def _ssl_errors_ignored() -> Iterator[list[dict[str, Any]]]:
    """The loop's exception handler ignores ``ssl.SSLError`` (collected), as hypercorn's own
    runner (``hypercorn.asyncio.run._exception_handler``) does; anything else still fails."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    ignored: list[dict[str, Any]] = []

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), ssl.SSLError):
            ignored.append(context)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield ignored
    finally:
        loop.set_exception_handler(previous)


async def test_dropins_tls_hypercorn_early_413(tls_files: Files, tls_contexts: Contexts) -> None:
    """Over TLS, stock hypercorn loses its early 413 on asyncio's loop; the drop-in delivers
    it every time, on both loops."""
    pytest.importorskip("hypercorn")
    from _dropins import hypercorn_serving
    from hypercorn.asyncio import serve as stock_serve

    from aiograceful.hypercorn import serve

    client = tls_contexts[1]
    with _ssl_errors_ignored() as ignored:  # as hypercorn's own runner does
        async with hypercorn_serving(stock_serve, tls=tls_files) as (port, _stop):
            stock = await _uploads(port, client)
    async with hypercorn_serving(serve, tls=tls_files) as (port, _stop):
        dropin = await _uploads(port, client)
    if not _is_uvloop():
        assert stock.count(413) < ROUNDS, f"stock hypercorn delivered: {stock}"
        assert ignored, "no SSL error from stock hypercorn's closes"
    _assert_stock_then_dropin("hypercorn", stock, dropin)


async def test_dropins_tls_hypercorn_drains_the_accept_queue(tls_files: Files) -> None:
    """TLS connections queued when hypercorn closes its listener: the drop-in's listener
    serves each with the listener's TLS context (stock: see test_hypercorn)."""
    pytest.importorskip("hypercorn")
    from aiograceful.hypercorn import _start_server

    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    results = {}
    for name, start in (("stock", asyncio.start_server), ("dropin", _start_server)):

        async def callback(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            await writer.drain()
            writer.close()

        server = await start(callback, HOST, 0, ssl=server_ctx, ssl_handshake_timeout=5.0)
        port = server.sockets[0].getsockname()[1]
        socks = queued_connections(port, 4)
        server.close()
        # The handshakes happen in the clients' threads while the drain waits for them.
        reading = [asyncio.ensure_future(asyncio.to_thread(answer, s, client)) for s in socks]
        await asyncio.wait_for(server.wait_closed(), 10)
        results[name] = [_status(g) for g in await asyncio.gather(*reading)]
    assert results["stock"].count(200) == 0, results
    assert results["dropin"] == [200] * 4, results


# -- aiohttp ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _aiohttp(runner_class: Any, server_ctx: ssl.SSLContext) -> AsyncIterator[tuple[Any, int]]:
    """An aiohttp runner with a TLS ``TCPSite`` on 127.0.0.1 (``/upload``: an early 413)."""
    from aiohttp import web

    async def upload(request: web.Request) -> web.Response:
        return web.Response(status=413, text="too large\n")  # the body is not read

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.add_routes([web.post("/upload", upload), web.get("/", ok)])
    runner = runner_class(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=server_ctx)
    await site.start()
    try:
        yield runner, runner.addresses[0][1]
    finally:
        if runner.server is not None:  # not cleaned up by the test itself
            await asyncio.wait_for(runner.cleanup(), 30)


async def test_dropins_tls_aiohttp_early_413(tls_contexts: Contexts) -> None:
    """Over TLS, aiohttp reads away the body it answered early, so its 413 arrives (stock, on
    both loops); the drop-in keeps that: every 413 arrives."""
    pytest.importorskip("aiohttp")
    from aiohttp import web

    from aiograceful.aiohttp import GracefulAppRunner

    server_ctx, client = tls_contexts
    async with _aiohttp(web.AppRunner, server_ctx) as (_runner, port):
        stock = await _uploads(port, client)
    async with _aiohttp(GracefulAppRunner, server_ctx) as (_runner, port):
        dropin = await _uploads(port, client)
    _assert_stock_then_dropin("aiohttp", stock, dropin)


async def test_dropins_tls_aiohttp_app_runner_drains_the_accept_queue(
    tls_contexts: Contexts,
) -> None:
    """TLS connections queued at cleanup: ``web.AppRunner`` resets them; ``GracefulAppRunner``
    serves each with the site's TLS context and answers it."""
    pytest.importorskip("aiohttp")
    from aiohttp import web

    from aiograceful.aiohttp import GracefulAppRunner

    server_ctx, client = tls_contexts
    answered = {}
    for name, runner_class in (("stock", web.AppRunner), ("dropin", GracefulAppRunner)):
        async with _aiohttp(runner_class, server_ctx) as (runner, port):
            socks = queued_connections(port, 4)  # the loop accepts none before the cleanup
            cleanup = asyncio.ensure_future(runner.cleanup())
            got = await asyncio.gather(*(asyncio.to_thread(answer, s, client) for s in socks))
            await asyncio.wait_for(cleanup, 30)
        answered[name] = [_status(g) for g in got]
    assert answered["stock"].count(200) < 4, answered
    assert answered["dropin"] == [200] * 4, answered


async def test_dropins_tls_aiohttp_handshake_ending_after_the_notice_is_told(
    tls_contexts: Contexts,
) -> None:
    """A TLS connection accepted before the cleanup whose handshake ends after it: stock
    aiohttp answers it keep-alive and holds it open; the drop-in tells it at once (its
    answer says Connection: close) and closes it."""
    pytest.importorskip("aiohttp")
    from aiohttp import web

    from aiograceful.aiohttp import GracefulAppRunner

    server_ctx, client = tls_contexts
    got = {}
    for name, runner_class in (("stock", web.AppRunner), ("dropin", GracefulAppRunner)):
        async with _aiohttp(runner_class, server_ctx) as (runner, port):
            sock = queued_connections(port, 1, timeout=2.0)[0]
            await asyncio.sleep(0.1)  # accepted: the server waits for the ClientHello
            await asyncio.wait_for(runner.cleanup(), 30)  # nothing attached: done at once
            got[name] = await asyncio.to_thread(answer, sock, client)
    assert got["stock"] == "TimeoutError", got  # answered, and the connection kept open
    dropin = got["dropin"]
    assert isinstance(dropin, bytes), got
    assert dropin.startswith(b"HTTP/1.1 200"), got
    assert b"connection: close" in dropin.lower(), got
