"""graceful_close(writer) and abort() behind asyncio's streams API."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from _util import (
    HOST,
    TCP_CLOSE,
    connect,
    linux_only,
    paced_read,
    recv_until_eof,
    set_linger_zero,
    stream_server,
    wait_for_tcp_state,
    wait_until,
)

import aiograceful._streams
from aiograceful import CloseOutcome, CloseResult, abort, graceful_close

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def one_connection() -> AsyncIterator[tuple[Streams, socket.socket]]:
    """A server-side stream pair and the blocking client socket it talks to."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Streams] = loop.create_future()
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))
        await release.wait()

    async with stream_server(handler) as port:
        sock = connect(port)
        try:
            streams = await asyncio.wait_for(accepted, 2)
            try:
                yield streams, sock
            finally:
                abort(streams[1])
                release.set()
                await asyncio.sleep(0)
        finally:
            sock.close()


def linger_repr(writer: asyncio.StreamWriter) -> str:
    """The repr of the writer's close record (it shows a deadline while a timer is armed)."""
    return repr(aiograceful._streams._LINGERS[writer])


async def test_streams_clean_close_and_wait_closed() -> None:
    """A peer that reads and closes: CLEAN, no timer left, and writer.wait_closed() completes."""
    async with one_connection() as ((_reader, writer), sock):
        writer.write(b"answer")
        task = asyncio.create_task(graceful_close(writer, timeout=5.0))
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"answer", None)
        sock.close()
        result = await asyncio.wait_for(task, 2)
        assert result.outcome is CloseOutcome.CLEAN
        assert result.discarded == 0
        assert result.trailing == b""
        assert 0.0 <= result.duration < 5.0
        await asyncio.wait_for(writer.wait_closed(), 2)
        assert writer.transport.is_closing()
        assert "deadline" not in linger_repr(writer)


async def test_streams_second_call_returns_the_same_result() -> None:
    """graceful_close is idempotent: a later call returns the first result, options ignored."""
    async with one_connection() as ((_reader, writer), sock):
        task = asyncio.create_task(graceful_close(writer, timeout=5.0))
        await asyncio.to_thread(recv_until_eof, sock)
        sock.close()
        first = await asyncio.wait_for(task, 2)
        second = await graceful_close(writer, timeout=0.0, final=b"ignored")
        assert second is first


async def test_streams_concurrent_calls_share_one_result() -> None:
    """Two concurrent graceful_close calls on one writer get the same result."""
    async with one_connection() as ((_reader, writer), sock):
        writer.write(b"once")
        first = asyncio.create_task(graceful_close(writer, timeout=5.0, final=b"!"))
        second = asyncio.create_task(graceful_close(writer, timeout=5.0, final=b"!"))
        data, _ = await asyncio.to_thread(recv_until_eof, sock)
        assert data == b"once!"  # final written once, not twice
        sock.close()
        a, b = await asyncio.wait_for(asyncio.gather(first, second), 2)
        assert a is b
        assert a.outcome is CloseOutcome.CLEAN


async def test_streams_cancel_mid_linger_hands_over_when_nothing_is_unread() -> None:
    """Cancelled mid-linger with nothing unread: a plain close (no RST), ABORTED; it propagates."""
    async with one_connection() as ((_reader, writer), sock):
        task = asyncio.create_task(graceful_close(writer, timeout=30.0, idle_timeout=None))
        # Our FIN arrives: the linger is under way.
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"", None)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(writer.wait_closed(), 2)
        # No RST: the peer stays in CLOSE_WAIT after our FIN; a RST would move it to CLOSE.
        assert await wait_for_tcp_state(sock, TCP_CLOSE, within=0.3) != TCP_CLOSE
        later = await graceful_close(writer)
        assert later.outcome is CloseOutcome.ABORTED
        assert "deadline" not in linger_repr(writer)


async def test_streams_cancel_mid_linger_resets_when_bytes_are_unread() -> None:
    """Cancelled with bytes unread (a close would reset anyway): RST now, ABORTED."""
    async with one_connection() as ((_reader, writer), sock):
        task = asyncio.create_task(graceful_close(writer, timeout=30.0, idle_timeout=None))
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"", None)
        # so that what the peer sends stays unread (StreamWriter types its transport as
        # a WriteTransport; a stream's is a Transport, which uvloop's does not subclass)
        cast(asyncio.Transport, writer.transport).pause_reading()
        await asyncio.to_thread(sock.sendall, b"u" * 1000)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The RST moves the peer from CLOSE_WAIT to CLOSE; a FIN alone would not.
        assert await wait_for_tcp_state(sock, TCP_CLOSE) == TCP_CLOSE
        await asyncio.wait_for(writer.wait_closed(), 2)
        assert (await graceful_close(writer)).outcome is CloseOutcome.ABORTED


async def test_streams_client_keeps_trailing_answers() -> None:
    """A client's graceful_close(keep_trailing=True) returns the server's last answers."""

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            await asyncio.sleep(0.02)  # answer late, after the client's FIN
            writer.write(b"ANS " + line[4:])
        writer.write(b"BYE\n")
        writer.close()
        await writer.wait_closed()

    async with stream_server(server) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"REQ 1\nREQ 2\nREQ 3\n")
        await writer.drain()
        # The first answer may already sit in the reader: it counts as trailing too.
        await asyncio.sleep(0.03)
        result = await asyncio.wait_for(graceful_close(writer, keep_trailing=True, timeout=5.0), 3)
    assert result.outcome is CloseOutcome.CLEAN
    assert result.trailing == b"ANS 1\nANS 2\nANS 3\nBYE\n"
    assert result.discarded == 0
    # The reader was emptied into trailing (_buffer is private: typeshed does not declare it).
    assert reader.at_eof() or not reader._buffer  # type: ignore[attr-defined]


async def test_streams_paused_reader_still_lingers() -> None:
    """A reader never read (paused at its limit) still lingers, ends CLEAN, counts every byte."""
    body = b"u" * (16 * 1024 * 1024)
    async with one_connection() as ((_reader, writer), sock):
        sent = asyncio.create_task(asyncio.to_thread(sock.sendall, body))
        await asyncio.sleep(0.1)  # the StreamReader fills past its limit and pauses
        assert not sent.done()  # the kernel buffers are full too: the peer is stalled
        writer.write(b"413")
        task = asyncio.create_task(graceful_close(writer, timeout=5.0))
        await asyncio.wait_for(sent, 3)
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"413", None)
        sock.close()
        result = await asyncio.wait_for(task, 3)
        assert result.outcome is CloseOutcome.CLEAN
        assert result.discarded == len(body)


async def test_streams_after_peer_fin_is_clean_at_once() -> None:
    """The peer's FIN already in the reader: the close has nothing to wait for and is CLEAN."""
    async with one_connection() as ((reader, writer), sock):
        sock.sendall(b"last")
        sock.shutdown(socket.SHUT_WR)
        assert await reader.read() == b"last"
        writer.write(b"answer")
        result = await asyncio.wait_for(graceful_close(writer, timeout=5.0), 2)
        assert result.outcome is CloseOutcome.CLEAN
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"answer", None)


async def test_streams_after_users_write_eof() -> None:
    """graceful_close after the app's own writer.write_eof() still lingers and ends CLEAN."""
    async with one_connection() as ((_reader, writer), sock):
        writer.write(b"done")
        writer.write_eof()
        task = asyncio.create_task(graceful_close(writer, timeout=5.0))
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"done", None)
        sock.sendall(b"trailing")
        sock.close()
        result = await asyncio.wait_for(task, 2)
        assert result.outcome is CloseOutcome.CLEAN
        assert result.discarded == len(b"trailing")


async def test_streams_final_after_users_write_eof_raises_and_touches_nothing() -> None:
    """final= after the app's own write_eof(): RuntimeError, and a plain close still works."""
    async with one_connection() as ((reader, writer), sock):
        sock.sendall(b"unread")
        await asyncio.sleep(0.05)  # the bytes reach the StreamReader's buffer
        writer.write(b"done")
        writer.write_eof()
        with pytest.raises(RuntimeError):
            await graceful_close(writer, final=b"late", timeout=5.0)
        assert await reader.read(6) == b"unread"  # the reader was not emptied
        task = asyncio.create_task(graceful_close(writer, timeout=5.0))
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"done", None)
        sock.close()
        result = await asyncio.wait_for(task, 2)
        assert result.outcome is CloseOutcome.CLEAN


async def test_streams_after_connection_is_gone() -> None:
    """graceful_close on a writer whose connection is gone returns a result, raises nothing."""
    async with one_connection() as ((_reader, writer), _sock):
        writer.close()
        await writer.wait_closed()
        result = await asyncio.wait_for(graceful_close(writer), 2)
        assert result.outcome is CloseOutcome.CLEAN


async def test_streams_abort_writer_sends_rst() -> None:
    """abort(writer) resets: the peer's recv raises ECONNRESET, not b""."""
    async with one_connection() as ((_reader, writer), sock):
        abort(writer)
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert data == b""
        assert isinstance(error, ConnectionResetError)
        await asyncio.wait_for(writer.wait_closed(), 2)
        abort(writer)  # twice: harmless


async def test_streams_graceful_close_after_abort_reports_aborted() -> None:
    """graceful_close(writer) after abort(writer) returns the abort's result: ABORTED."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        abort(writer)
        result = await asyncio.wait_for(graceful_close(writer, timeout=1), 5)
        assert result.outcome is CloseOutcome.ABORTED
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_streams_abort_transport_sends_rst() -> None:
    """abort(transport) resets too, where transport.abort() alone is a FIN."""
    async with one_connection() as ((_reader, writer), sock):
        abort(writer.transport)
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert isinstance(error, ConnectionResetError)
        assert data == b""


async def test_streams_abort_during_linger_is_aborted() -> None:
    """abort(writer) during a linger ends it ABORTED."""
    async with one_connection() as ((_reader, writer), sock):
        task = asyncio.create_task(graceful_close(writer, timeout=30.0))
        await asyncio.to_thread(recv_until_eof, sock)
        abort(writer)
        result = await asyncio.wait_for(task, 2)
        assert result.outcome is CloseOutcome.ABORTED
        assert await wait_for_tcp_state(sock, TCP_CLOSE) == TCP_CLOSE


async def test_streams_abort_rejects_a_non_writer() -> None:
    """abort() of neither a writer nor a transport: TypeError naming the argument."""
    with pytest.raises(TypeError, match="writer_or_transport"):
        abort(object())  # type: ignore[arg-type]


BAD_ARGUMENTS: list[tuple[dict[str, object], type[Exception], str]] = [
    ({"timeout": -1.0}, ValueError, "timeout"),
    ({"timeout": math.nan}, ValueError, "timeout"),
    ({"timeout": math.inf}, ValueError, "timeout"),
    ({"timeout": "5"}, TypeError, "timeout"),
    ({"timeout": None}, TypeError, "timeout"),
    ({"idle_timeout": -1.0}, ValueError, "idle_timeout"),
    ({"idle_timeout": math.nan}, ValueError, "idle_timeout"),
    ({"idle_timeout": math.inf}, ValueError, "idle_timeout"),
    ({"max_discard": -1}, ValueError, "max_discard"),
    ({"max_discard": 1.5}, TypeError, "max_discard"),
    ({"max_discard": "1"}, TypeError, "max_discard"),
    ({"final": "text"}, TypeError, "final"),
    ({"final": 3}, TypeError, "final"),
    ({"keep_trailing": "yes"}, TypeError, "keep_trailing"),
    ({"reset_on_failure": 1}, TypeError, "reset_on_failure"),
]


async def test_streams_bad_arguments_touch_nothing() -> None:
    """Each bad argument raises naming it, before anything is touched: the connection works."""
    async with one_connection() as ((reader, writer), sock):
        for kwargs, exc_type, name in BAD_ARGUMENTS:
            with pytest.raises(exc_type, match=f"^{name} "):
                await graceful_close(writer, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^writer "):
            await graceful_close(object())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^writer "):
            await graceful_close(writer.transport)  # type: ignore[arg-type]
        assert writer not in aiograceful._streams._LINGERS
        writer.write(b"still here")
        await writer.drain()
        assert await asyncio.to_thread(sock.recv, 64) == b"still here"
        sock.sendall(b"me too")
        assert await asyncio.wait_for(reader.readexactly(6), 2) == b"me too"
        task = asyncio.create_task(graceful_close(writer, timeout=5.0))
        await asyncio.to_thread(recv_until_eof, sock)
        sock.close()
        assert (await asyncio.wait_for(task, 2)).outcome is CloseOutcome.CLEAN


# -- a bound that fires lets go: never less than close() ----------------------


async def test_streams_half_closed_peer_that_stops_reading_gets_everything() -> None:
    """A peer that half-closes, then reads only after send_timeout: all 64 KiB and a FIN."""
    size = 64 * 1024
    results: dict[bytes, CloseResult] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        how = (await reader.read()).strip()  # the peer's FIN ends the request
        writer.write(b"h" * size)
        if how == b"plain":
            writer.close()
        else:
            reset = how == b"reset"
            results[how] = await graceful_close(writer, send_timeout=1.0, reset_on_failure=reset)

    resume = threading.Event()
    async with stream_server(handler) as port:
        # Each client sends its FIN, then reads nothing (4 KiB buffer: a zero window).
        reads = asyncio.gather(
            *(
                asyncio.to_thread(
                    paced_read, port, how, math.inf, half_close=True, rcvbuf=4096, resume=resume
                )
                for how in (b"plain", b"reset", b"letgo")
            )
        )
        try:
            await wait_until(lambda: len(results) == 2, 5)
        finally:
            resume.set()
        plain, reset, letgo = await reads
    assert plain == (size, "FIN")
    assert letgo == (size, "FIN")
    assert reset[1] == "ConnectionResetError"
    assert reset[0] < size
    for how in (b"letgo", b"reset"):
        assert results[how].outcome is CloseOutcome.IDLE_TIMEOUT
        unacked = results[how].unacked
        assert unacked is not None
        assert unacked > 0


# -- a close cancelled from outside on a Unix socket hands over to the kernel --

MIB = 1024 * 1024
UNIX_SIZE = 8 * MIB
UNIX_RATE = 4 * MIB  # bytes/s of the paced reader
CANCEL_AFTER = 0.3  # s: the outside bound cancelling a close (the transfer takes ~2 s)


async def naive_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one line, write UNIX_SIZE bytes in one write, writer.close()."""
    await reader.readline()
    writer.write(b"x" * UNIX_SIZE)
    writer.close()


async def unix_download(
    path: str, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> tuple[int, str]:
    """Serve ``handler`` with plain asyncio on ``path``; one paced client's reading."""
    server = await asyncio.start_unix_server(handler, path)
    try:
        return await asyncio.to_thread(paced_read, path, b"GET\n", UNIX_RATE, timeout=10.0)
    finally:
        server.close()
        await server.wait_closed()


@linux_only
async def test_streams_unix_close_cancelled_by_timeout_delivers_everything(sock_dir: Path) -> None:
    """graceful_close cancelled by ``asyncio.timeout(0.3)`` on a Unix socket: all 8 MiB, then EOF.

    The client sent nothing more than its line, so nothing is unread: the
    cancelled close must hand the buffer over as writer.close() does, not
    abort the transport and drop the loop's buffer. The naive close on the
    same setup is the reference.
    """
    naive = await unix_download(str(sock_dir / "naive"), naive_bulk)
    assert naive == (UNIX_SIZE, "FIN")

    cut: list[bool] = []

    async def cancelled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"x" * UNIX_SIZE)
        try:
            async with asyncio.timeout(CANCEL_AFTER):
                await graceful_close(writer)
        except TimeoutError:
            cut.append(True)

    graceful = await unix_download(str(sock_dir / "graceful"), cancelled)
    assert cut == [True]  # the close was still under way when it was cancelled
    assert graceful == (UNIX_SIZE, "FIN")


# -- a peer that resets, at every step ---------------------------------------


async def test_streams_peer_reset_before_our_write_eof() -> None:
    """A RST before graceful_close began (shutdown() meets ENOTCONN): PEER_RESET, no escape."""
    async with one_connection() as ((_reader, writer), sock):
        sock.sendall(b"request")
        await asyncio.sleep(0.05)
        set_linger_zero(sock)
        sock.close()
        # No await between the reset and the close: the loop has not yet seen
        # the RST when graceful_close calls write_eof().
        result = await asyncio.wait_for(graceful_close(writer, timeout=5.0), 2)
        assert result.outcome is CloseOutcome.PEER_RESET
        assert "deadline" not in linger_repr(writer)
        # uvloop reports the reset through connection_lost, so the stream's
        # own wait_closed() raises it; asyncio's selector loop does not.
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait_for(writer.wait_closed(), 2)
    gc.collect()


async def test_streams_peer_reset_before_final_write() -> None:
    """A RST met by the write of ``final``: PEER_RESET, nothing escapes."""
    async with one_connection() as ((_reader, writer), sock):
        sock.sendall(b"request")
        await asyncio.sleep(0.05)
        set_linger_zero(sock)
        sock.close()
        result = await asyncio.wait_for(graceful_close(writer, final=b"reply", timeout=5.0), 2)
        assert result.outcome is CloseOutcome.PEER_RESET
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), 2)
    gc.collect()


async def test_streams_peer_reset_noticed_by_the_loop_first() -> None:
    """A RST the loop already handled before graceful_close: a result, nothing escapes."""
    async with one_connection() as ((reader, writer), sock):
        set_linger_zero(sock)
        sock.close()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 2)
        result = await asyncio.wait_for(graceful_close(writer, timeout=5.0), 2)
        assert result.outcome is CloseOutcome.PEER_RESET
    gc.collect()


async def test_streams_peer_reset_while_lingering() -> None:
    """A RST while we linger (after our FIN): PEER_RESET, no timer left."""
    async with one_connection() as ((_reader, writer), sock):
        writer.write(b"reply")
        task = asyncio.create_task(graceful_close(writer, timeout=30.0))
        data, _ = await asyncio.to_thread(recv_until_eof, sock)
        assert data == b"reply"
        set_linger_zero(sock)
        sock.close()
        result = await asyncio.wait_for(task, 2)
        assert result.outcome is CloseOutcome.PEER_RESET
        assert "deadline" not in linger_repr(writer)
    gc.collect()


async def test_streams_peer_reset_while_we_flush() -> None:
    """A RST while our large reply is still being flushed: PEER_RESET."""
    async with one_connection() as ((_reader, writer), sock):
        writer.write(b"r" * (16 * 1024 * 1024))
        task = asyncio.create_task(graceful_close(writer, timeout=30.0))
        await asyncio.sleep(0.05)
        assert writer.transport.get_write_buffer_size() > 0
        set_linger_zero(sock)
        sock.close()
        result = await asyncio.wait_for(task, 2)
        assert result.outcome is CloseOutcome.PEER_RESET
    gc.collect()


# -- TLS: no half-close in asyncio -------------------------------------------


async def test_streams_tls_peer_never_reads_is_bounded(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """TLS with a peer that never reads: graceful_close returns within send_timeout + margin."""
    server_ctx, client_ctx = tls_contexts
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[tuple[object, float]] = loop.create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"z" * (8 * 1024 * 1024))
        start = time.monotonic()
        result = await graceful_close(writer, timeout=0.1, idle_timeout=None, send_timeout=0.5)
        closed.set_result((result, time.monotonic() - start))

    async with stream_server(handler, ssl=server_ctx) as port:
        raw = await asyncio.to_thread(connect, port)
        tls = await asyncio.to_thread(client_ctx.wrap_socket, raw, server_hostname=HOST)
        try:
            await asyncio.to_thread(tls.sendall, b"hello\n")
            result, elapsed = await asyncio.wait_for(closed, 5)
        finally:
            with contextlib.suppress(OSError):
                tls.close()
    assert isinstance(result, CloseResult)
    assert result.outcome is CloseOutcome.IDLE_TIMEOUT, result
    assert result.unacked, result
    assert elapsed < 0.5 + 2.0


async def test_streams_tls_peer_reads_and_closes(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """TLS with a peer that reads the reply and closes: the reply arrives and the close is CLEAN."""
    server_ctx, client_ctx = tls_contexts
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[object] = loop.create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"tls reply")
        closed.set_result(await graceful_close(writer, timeout=2.0))

    async with stream_server(handler, ssl=server_ctx) as port:
        reader, writer = await asyncio.open_connection(
            HOST, port, ssl=client_ctx, server_hostname=HOST
        )
        writer.write(b"hello\n")
        assert await asyncio.wait_for(reader.read(), 3) == b"tls reply"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        result = await asyncio.wait_for(closed, 5)
    assert result.outcome is CloseOutcome.CLEAN  # type: ignore[attr-defined]
