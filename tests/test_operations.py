"""Operations: drain_delay (the notice phase), server.stats, and Unix stream servers."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from aiograceful import (
    CloseOutcome,
    GracefulProtocol,
    ServerStats,
    create_unix_server,
    start_server,
    start_unix_server,
)

HOST = "127.0.0.1"
UPLOAD = 4 * 1024 * 1024
HEAD = b"POST /upload HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % UPLOAD
REPLY_413 = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer ``REQ x`` lines with ``ANS x`` until EOF."""
    for _ in range(1000):
        line = await reader.readline()
        if not line:
            return
        writer.write(b"ANS " + line[4:])


def bye(writer: asyncio.StreamWriter) -> None:
    writer.write(b"BYE\n")


# -- drain_delay -------------------------------------------------------------------------


async def test_drain_delay_zero_refuses_connections_once_shutdown_begins() -> None:
    """Without drain_delay, a connection made just after shutdown() began is refused."""
    server = await start_server(lines, HOST, 0, on_notice=bye, grace=1.0)
    port = server.sockets[0].getsockname()[1]
    shutdown = asyncio.ensure_future(server.shutdown())
    await asyncio.sleep(0.05)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)
    await shutdown


async def test_drain_delay_keeps_accepting_and_tells_new_connections_at_once() -> None:
    """With drain_delay, the notice is set, open connections are told, new ones are accepted and
    told at once and still answered; then the listener closes and the grace period runs."""
    server = await start_server(lines, HOST, 0, on_notice=bye, grace=2.0, drain_delay=1.5)
    port = server.sockets[0].getsockname()[1]
    r1, w1 = await asyncio.open_connection(HOST, port)
    w1.write(b"REQ 1\n")
    assert await r1.readline() == b"ANS 1\n"
    shutdown = asyncio.ensure_future(server.shutdown())
    try:
        async with asyncio.timeout(5):
            assert await r1.readline() == b"BYE\n"  # told at once
            assert server.notice.is_set()
            r2, w2 = await asyncio.open_connection(HOST, port)  # still accepted
            assert await r2.readline() == b"BYE\n"  # told at once
            w2.write(b"REQ 2\n")
            assert await r2.readline() == b"ANS 2\n"  # and still answered
            for reader, writer in ((r1, w1), (r2, w2)):
                writer.write_eof()
                assert await reader.read() == b""
                writer.close()
            report = await shutdown
    finally:
        shutdown.cancel()
    assert report.connections == 2
    assert report.closed_clean == 2
    assert report.duration >= 1.5  # the delay, then the shutdown order
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)


async def test_drain_delay_is_checked() -> None:
    """A negative or NaN drain_delay is a ValueError naming it."""
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="drain_delay"):
            await start_server(lines, HOST, 0, drain_delay=bad)
    with pytest.raises(TypeError, match="drain_delay"):
        await start_server(lines, HOST, 0, drain_delay="1")  # type: ignore[arg-type]  # on purpose


# -- stats -------------------------------------------------------------------------------


async def test_stats_count_outcomes_rejections_and_discarded_bytes() -> None:
    """server.stats counts every close by outcome (rejected ones too) and the bytes discarded."""
    hold = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line == b"HOLD\n":
            await hold.wait()
        writer.write(b"ok\n")  # returns with any further bytes unread: they are discarded

    def reject(transport: asyncio.BaseTransport) -> None:
        transport.write(b"busy\n")  # type: ignore[attr-defined]

    server = await start_server(handler, HOST, 0, max_connections=1, on_reject=reject, grace=2)
    port = server.sockets[0].getsockname()[1]
    assert server.stats == ServerStats(
        active=0,
        closed=0,
        outcomes=dict.fromkeys(CloseOutcome, 0),
        rejected=0,
        drained=0,
        discarded=0,
        unacked=0,
        unacked_unknown=0,
    )

    async def talk(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(data)
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer

    async with asyncio.timeout(10):
        for _ in range(3):
            assert await talk(b"hi\n") == b"ok\n"
        assert await talk(b"hi\n" + b"x" * 10_000) == b"ok\n"
        held_r, held_w = await asyncio.open_connection(HOST, port)
        held_w.write(b"HOLD\n")
        while server.connections == 0:  # noqa: ASYNC110 - nothing announces the attach
            await asyncio.sleep(0.005)
        assert await talk(b"hi\n") == b"busy\n"  # over the limit
        assert server.stats.active == 1
        hold.set()
        assert await held_r.read() == b"ok\n"
        held_w.close()
        while server.stats.closed < 6:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        # A peer that resets.
        rst = socket.create_connection((HOST, port), timeout=5)
        rst.sendall(b"hi\n")
        rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rst.close()
        while server.stats.closed < 7:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    stats = server.stats
    await server.shutdown()
    assert stats.closed == 7
    assert stats.active == 0
    assert stats.rejected == 1
    assert stats.outcomes[CloseOutcome.CLEAN] == 6
    assert stats.outcomes[CloseOutcome.PEER_RESET] == 1
    assert sum(stats.outcomes.values()) == stats.closed
    assert stats.discarded >= 10_000
    assert 0 <= stats.unacked_unknown <= stats.closed
    assert stats.unacked >= 0


# -- Unix stream servers ------------------------------------------------------------------


def upload_then_read(path: str) -> tuple[bytes, str | None]:
    """As http.client does: send the whole upload, then read; (reply, error met)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(HEAD)
            chunk = b"x" * 65536
            for _ in range(UPLOAD // len(chunk)):
                sock.sendall(chunk)
        except OSError as exc:
            return b"", type(exc).__name__
        data = b""
        for _ in range(100):
            try:
                part = sock.recv(65536)
            except OSError as exc:
                return data, type(exc).__name__
            if not part:
                return data, None
            data += part
        return data, "too long"


async def early_413(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(REPLY_413)


async def test_unix_naive_close_with_unread_data_fails_the_uploading_client(
    sock_dir: Path,
) -> None:
    """A Unix stream socket closed with unread data: the client still sending fails (EPIPE)."""
    path = str(sock_dir / "s")
    done = asyncio.Event()

    async def naive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await early_413(reader, writer)
        writer.close()
        done.set()

    server = await asyncio.start_unix_server(naive, path)
    try:
        reply, error = await asyncio.to_thread(upload_then_read, path)
    finally:
        server.close()
        await server.wait_closed()
    assert reply == b""
    assert error in ("BrokenPipeError", "ConnectionResetError")


async def test_unix_graceful_close_delivers_the_early_reply(sock_dir: Path) -> None:
    """start_unix_server lingers on a Unix socket too: the uploading client reads its 413."""
    path = str(sock_dir / "s")
    server = await start_unix_server(early_413, path, grace=2.0)
    try:
        reply, error = await asyncio.to_thread(upload_then_read, path)
        async with asyncio.timeout(5):
            while server.stats.closed < 1:  # noqa: ASYNC110 - nothing announces the close
                await asyncio.sleep(0.005)
        stats = server.stats
    finally:
        await server.shutdown()
    assert error is None
    assert reply == REPLY_413
    assert stats.outcomes[CloseOutcome.CLEAN] == 1
    assert stats.discarded > 0


class LineProtocol(GracefulProtocol):
    """``REQ x`` -> ``ANS x``; the notice is a ``BYE`` line."""

    def data_received(self, data: bytes) -> None:
        for line in data.splitlines():
            self.transport.write(b"ANS " + line[4:] + b"\n")

    def on_shutdown_notice(self) -> None:
        self.transport.write(b"BYE\n")


async def test_unix_protocol_server_drains_its_queue_and_notifies(sock_dir: Path) -> None:
    """create_unix_server: queued connections are drained at shutdown, told, and answered."""
    path = str(sock_dir / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    server = await create_unix_server(LineProtocol, sock=listener, start_serving=False, grace=2)
    clients = []
    for i in range(3):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect(path)
        c.sendall(b"REQ %d\n" % i)
        clients.append(c)
    shutdown = asyncio.ensure_future(server.shutdown())

    def finish(c: socket.socket) -> bytes:
        data = b""
        for _ in range(10):
            data += c.recv(100)
            if data.count(b"\n") >= 2:
                break
        c.shutdown(socket.SHUT_WR)
        rest = c.recv(100)
        c.close()
        return data + rest

    answers = [await asyncio.to_thread(finish, c) for c in clients]
    report = await shutdown
    assert report.drained == 3
    assert report.closed_clean == 3
    for i, answer in enumerate(answers):
        assert sorted(answer.splitlines()) == sorted([b"ANS %d" % i, b"BYE"])


async def test_unix_handoff_passes_the_unix_listener(sock_dir: Path) -> None:
    """A Unix server hands its listening socket over; its path still serves afterwards."""
    path = str(sock_dir / "s")
    handoff = str(sock_dir / "h")

    def tagged(
        tag: bytes,
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(tag)

        return handler

    async def ask() -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"hi\n")
        try:
            return await reader.read()
        finally:
            writer.close()

    a = await start_unix_server(tagged(b"A"), path, handoff=handoff, grace=1.0)
    assert await ask() == b"A"
    b = await start_unix_server(tagged(b"B"), path, handoff=handoff, grace=1.0)
    try:
        async with asyncio.timeout(5):
            await a.notice.wait()
            await a.shutdown()
        assert a.handed_off
        assert await asyncio.to_thread(os.path.exists, path)  # not unlinked by A's close
        assert await ask() == b"B"
    finally:
        await b.shutdown()


async def test_unix_server_rejects_reuse_port() -> None:
    """reuse_port has no meaning on a Unix socket: TypeError naming it."""
    with pytest.raises(TypeError, match="reuse_port"):
        await start_unix_server(lines, "/nonexistent/x", reuse_port=True)
