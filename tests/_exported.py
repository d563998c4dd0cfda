"""A server whose connections ended in different ways, for the exporters' tests.

Real loopback connections end with a clean close, a peer's reset (SO_LINGER
{1, 0} on the client) and a rejection at ``max_connections``; one more stays
open (the shutdown then ends it). The clients are blocking sockets driven
from threads, so the server's loop runs while they wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn
from _util import HOST, connect, set_linger_zero, wait_until

import aiograceful
import aiograceful.uvicorn as graceful_uvicorn
from aiograceful import CloseOutcome

#: The shutdown's bound for the connection left open: it is forced after this.
GRACE = 0.3
#: A grace long enough for a test to look at the shutdown while it runs, from
#: another thread, however loaded the machine (a scrape in a thread is not prompt).
LONG_GRACE = 2.0


async def _echo_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()


def _clean(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"one\n")
        assert sock.recv(16) == b"one\n"
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(16) == b""  # the server's FIN after ours


def _reset(port: int) -> None:
    sock = connect(port)
    sock.sendall(b"two\n")
    assert sock.recv(16) == b"two\n"
    set_linger_zero(sock)
    sock.close()  # a RST


def _rejected(port: int) -> None:
    with connect(port) as sock:
        assert sock.recv(16) == b""  # no on_reject: a graceful close, nothing written


def _read_to_end(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


@contextlib.asynccontextmanager
async def server_with_outcomes(grace: float = GRACE) -> AsyncIterator[aiograceful.GracefulServer]:
    """A server with a clean close, a peer reset and a rejection behind it, one connection open.

    On leaving, the server is shut down (if the test did not) and the open
    connection's client has read to its end.
    """
    server = await aiograceful.start_server(
        _echo_lines, HOST, 0, max_connections=1, grace=grace, force_timeout=0.2
    )
    port = server.sockets[0].getsockname()[1]
    holder: socket.socket | None = None
    try:
        await asyncio.to_thread(_clean, port)
        await wait_until(lambda: server.stats.outcomes[CloseOutcome.CLEAN] == 1)
        await asyncio.to_thread(_reset, port)
        await wait_until(lambda: server.stats.outcomes[CloseOutcome.PEER_RESET] == 1)
        holder = connect(port)
        await wait_until(lambda: server.connections == 1)
        await asyncio.to_thread(_rejected, port)
        await wait_until(lambda: server.stats.rejected == 1 and server.stats.closed == 3)
        yield server
    finally:
        if server.stats.phase is aiograceful.ShutdownPhase.SERVING:
            await server.shutdown()
        if holder is not None:
            await asyncio.to_thread(_read_to_end, holder)
            holder.close()


async def shut_down(server: aiograceful.GracefulServer) -> None:
    """Shut ``server`` down: the open connection is forced at the end of grace."""
    await asyncio.wait_for(server.shutdown(), 10)
    stats = server.stats
    assert stats.phase is aiograceful.ShutdownPhase.DONE
    assert stats.forced == 1, stats
    assert stats.active == 0, stats


def _uvicorn_config() -> uvicorn.Config:
    from _asgi_app import app

    return uvicorn.Config(
        app,
        host=HOST,
        port=0,
        lifespan="off",
        log_level="warning",
        http=graceful_uvicorn.H11Protocol,
    )


def _get_and_close(port: int) -> bytes:
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


def _get_and_keep(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


@contextlib.asynccontextmanager
async def uvicorn_with_a_request() -> AsyncIterator[tuple[graceful_uvicorn.Server, socket.socket]]:
    """The uvicorn drop-in's Server after one request and its close; a keep-alive one held open.

    On leaving, the server is shut down (if the test did not) and the held
    connection's client has read to its end.
    """
    config = _uvicorn_config()
    server = graceful_uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    port = server.servers[0].sockets[0].getsockname()[1]
    kept: socket.socket | None = None
    try:
        answer = await asyncio.to_thread(_get_and_close, port)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        await wait_until(lambda: server.stats.closed == 1)
        kept = await asyncio.to_thread(_get_and_keep, port)
        yield server, kept
    finally:
        if server.stats.phase is aiograceful.ShutdownPhase.SERVING:
            await server.shutdown()
        if kept is not None:
            await asyncio.to_thread(_read_to_end, kept)
            kept.close()
