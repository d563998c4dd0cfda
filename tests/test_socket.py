"""Socket-level helpers: SO_LINGER reset and the one place OSError is caught."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

from _util import recv_until_eof, set_linger_zero, stream_server

from aiograceful import _socket

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def accept_one(port: int, accepted: asyncio.Future[Streams]) -> tuple[Streams, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return await asyncio.wait_for(accepted, 2), sock


def server_side() -> tuple[asyncio.Future[Streams], asyncio.Event, object]:
    accepted: asyncio.Future[Streams] = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))
        await release.wait()

    return accepted, release, handler


async def test_socket_set_linger_zero_sets_the_option() -> None:
    """set_linger_zero() sets SO_LINGER {1, 0} on the transport's socket."""
    accepted, release, handler = server_side()
    async with stream_server(handler) as port:  # type: ignore[arg-type]
        (_, writer), sock = await accept_one(port, accepted)
        try:
            assert _socket.set_linger_zero(writer.transport)
            raw = writer.transport.get_extra_info("socket")
            onoff, seconds = struct.unpack(
                "ii", raw.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
            )
            assert (onoff, seconds) == (1, 0)
        finally:
            _socket.reset(writer.transport)
            release.set()
            sock.close()


async def test_socket_reset_sends_rst_and_is_idempotent() -> None:
    """reset() makes the peer see ECONNRESET; again, or on a gone transport, is a no-op."""
    accepted, release, handler = server_side()
    async with stream_server(handler) as port:  # type: ignore[arg-type]
        (_, writer), sock = await accept_one(port, accepted)
        try:
            _socket.reset(writer.transport)
            _socket.reset(writer.transport)
            data, error = await asyncio.to_thread(recv_until_eof, sock)
            assert data == b""
            assert isinstance(error, ConnectionResetError)
            await asyncio.wait_for(writer.wait_closed(), 2)
            _socket.reset(writer.transport)
            assert not _socket.set_linger_zero(writer.transport)
        finally:
            release.set()
            sock.close()


async def test_socket_shutdown_error_after_peer_reset() -> None:
    """shutdown_error() returns, not raises, the OSError of write_eof() on a reset connection."""
    accepted, release, handler = server_side()
    async with stream_server(handler) as port:  # type: ignore[arg-type]
        (_, writer), sock = await accept_one(port, accepted)
        try:
            set_linger_zero(sock)
            sock.close()
            # asyncio's selector transport calls shutdown() at once and meets
            # ENOTCONN; uvloop queues the shutdown and reports it later.
            exc = _socket.shutdown_error(writer.transport)
            assert exc is None or exc.errno in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET)
            if isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop):
                assert exc is not None
        finally:
            _socket.reset(writer.transport)
            release.set()
            await asyncio.sleep(0.01)


async def test_socket_shutdown_error_none_on_a_healthy_connection() -> None:
    """shutdown_error() on a live connection half-closes it (the peer reads EOF), returns None."""
    accepted, release, handler = server_side()
    async with stream_server(handler) as port:  # type: ignore[arg-type]
        (_, writer), sock = await accept_one(port, accepted)
        try:
            writer.write(b"x")
            assert _socket.shutdown_error(writer.transport) is None
            assert await asyncio.to_thread(recv_until_eof, sock) == (b"x", None)
        finally:
            _socket.reset(writer.transport)
            release.set()
            sock.close()
