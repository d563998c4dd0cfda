"""GracefulProtocol over real loopback sockets (and H5: a plain abort() that sends a FIN)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import pytest
from _util import (
    HOST,
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    close_wait_count,
    connect,
    linux_only,
    paced_read,
    recv_until_eof,
    tcp_states,
    wait_for_tcp_state,
    wait_until,
)

from aiograceful import CloseOutcome, CloseResult, GracefulProtocol, HalfCloseState

MIB = 1024 * 1024
RESPONSE = bytes(range(256)) * (MIB // 256)


@contextlib.asynccontextmanager
async def protocol_server(
    factory: Callable[[], asyncio.BaseProtocol],
) -> AsyncIterator[int]:
    """Serve ``factory`` on 127.0.0.1, an ephemeral port; yield the port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def connected(factory: Callable[[], asyncio.BaseProtocol]) -> AsyncIterator[socket.socket]:
    """Serve ``factory`` (as :func:`protocol_server`) and yield a blocking client socket to it."""
    async with protocol_server(factory) as port:
        sock = connect(port)
        try:
            yield sock
        finally:
            sock.close()


class Recorder(GracefulProtocol):
    """Records what happens to it; one instance per connection, kept in ``made``."""

    made: list[Recorder]

    def __init__(self) -> None:
        self.received = bytearray()
        self.made_event = asyncio.Event()
        self.lost_exc: list[Exception | None] = []
        self.states: list[tuple[str, HalfCloseState, bool, bool]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.snapshot("made")
        self.made.append(self)
        self.made_event.set()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.snapshot("lost-before-super")
        super().connection_lost(exc)
        self.snapshot("lost")
        self.lost_exc.append(exc)

    def snapshot(self, label: str) -> None:
        self.states.append((label, self.state, self.peer_eof, self.eof_written))


def recorder_factory(cls: type[Recorder]) -> tuple[list[Recorder], Callable[[], Recorder]]:
    made: list[Recorder] = []

    def factory() -> Recorder:
        proto = cls()
        proto.made = made
        return proto

    return made, factory


async def accepted(made: list[Recorder]) -> Recorder:
    """The first connection the server accepted (waits up to 2 s)."""
    await wait_until(lambda: bool(made))
    return made[0]


class Answerer(Recorder):
    """Answers with 1 MiB a little after the peer has half-closed, then writes its EOF.

    The answer is deliberately late (not written inside the hook), so that it
    only arrives if the transport really stayed open after the peer's FIN.
    """

    def on_peer_eof(self) -> None:
        self.snapshot("peer-eof")
        assert bytes(self.received) == b"GET /big\n"
        asyncio.get_running_loop().call_later(0.05, self.answer)

    def answer(self) -> None:
        self.snapshot("answering")
        self.transport.write(RESPONSE)
        self.write_eof()
        self.snapshot("after-write-eof")


async def test_protocol_half_close_answer_after_peer_eof() -> None:
    """After the client's FIN the server still sends 1 MiB, read in full; EOF; no CLOSE_WAIT."""
    made, factory = recorder_factory(Answerer)
    async with protocol_server(factory) as port:
        sock = connect(port)
        try:
            sock.sendall(b"GET /big\n")
            sock.shutdown(socket.SHUT_WR)
            data, error = await asyncio.to_thread(recv_until_eof, sock)
            assert error is None
            assert data == RESPONSE
            proto = await accepted(made)
            result = await asyncio.wait_for(proto.wait_closed(), 2)
            assert result.outcome is CloseOutcome.CLEAN
            assert proto.lost_exc == [None]
            # Our client socket is still open, so a server socket left open
            # would sit in CLOSE_WAIT now.
            assert close_wait_count(port) == 0
        finally:
            sock.close()


async def test_protocol_naive_eof_true_leaves_close_wait() -> None:
    """Naive: a Protocol whose eof_received returns True and never closes sits in CLOSE_WAIT."""
    transports: list[asyncio.Transport] = []

    class Naive(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses.
            transports.append(cast(asyncio.Transport, transport))

        def eof_received(self) -> bool:
            return True

    async with protocol_server(Naive) as port:
        sock = connect(port)
        try:
            sock.shutdown(socket.SHUT_WR)
            await wait_until(lambda: close_wait_count(port) > 0)
            await asyncio.sleep(0.1)
            assert close_wait_count(port) == 1
            states = [state for local, _, state in tcp_states(port) if local == port]
            assert TCP_CLOSE_WAIT in states
        finally:
            sock.close()
            for transport in transports:
                transport.close()
            await asyncio.sleep(0.05)


async def test_protocol_states_through_a_connection() -> None:
    """state, peer_eof, eof_written follow the connection: OPEN, PEER_EOF, FLUSHING, CLOSED."""
    made, factory = recorder_factory(Answerer)
    async with connected(factory) as sock:
        proto = await accepted(made)
        # One tuple: after `assert proto.close_result is None`, mypy would take it as None for good.
        assert (proto.state, proto.peer_eof, proto.eof_written, proto.close_result) == (
            HalfCloseState.OPEN,
            False,
            False,
            None,
        )
        sock.sendall(b"GET /big\n")
        sock.shutdown(socket.SHUT_WR)
        await asyncio.to_thread(recv_until_eof, sock)
        await asyncio.wait_for(proto.wait_closed(), 2)
    # Right after write_eof() both directions are done: FLUSHING while the 1 MiB
    # answer is unacknowledged, CLOSING if loopback acknowledged it at once.
    assert proto.states[3][0] == "after-write-eof"
    assert proto.states[3][1] in (HalfCloseState.FLUSHING, HalfCloseState.CLOSING)
    assert proto.states[:3] + proto.states[4:] == [
        ("made", HalfCloseState.OPEN, False, False),
        ("peer-eof", HalfCloseState.PEER_EOF, True, False),
        ("answering", HalfCloseState.PEER_EOF, True, False),
        ("lost-before-super", HalfCloseState.CLOSING, True, True),
        ("lost", HalfCloseState.CLOSED, True, True),
    ]
    assert proto.close_result is not None
    assert proto.close_result.outcome is CloseOutcome.CLEAN


async def test_protocol_abort_sends_rst() -> None:
    """GracefulProtocol.abort() resets: the peer's recv raises ECONNRESET."""
    made, factory = recorder_factory(Recorder)
    async with connected(factory) as sock:
        proto = await accepted(made)
        proto.abort()
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert data == b""
        assert isinstance(error, ConnectionResetError)
        result = await asyncio.wait_for(proto.wait_closed(), 2)
        assert result.outcome is CloseOutcome.ABORTED
        proto.abort()  # a no-op once the connection is gone


async def test_protocol_plain_transport_abort_is_a_fin() -> None:
    """H5: a plain transport.abort() with an empty receive queue sends a FIN: the peer reads b""."""
    transports: list[asyncio.Transport] = []

    class Plain(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses.
            transports.append(cast(asyncio.Transport, transport))

    async with connected(Plain) as sock:
        await wait_until(lambda: bool(transports))
        transports[0].abort()
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"", None)


async def test_protocol_write_eof_twice_is_harmless() -> None:
    """write_eof() twice: one FIN, the peer can still send and is heard, then the close is CLEAN."""
    made, factory = recorder_factory(Recorder)
    async with connected(factory) as sock:
        proto = await accepted(made)
        proto.transport.write(b"bye")
        proto.write_eof()
        proto.write_eof()
        assert (proto.state, proto.eof_written, proto.peer_eof) == (
            HalfCloseState.EOF_WRITTEN,
            True,
            False,
        )
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"bye", None)
        sock.sendall(b"still talking")
        await wait_until(lambda: bytes(proto.received) == b"still talking")
        sock.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(proto.wait_closed(), 2)
        assert result.outcome is CloseOutcome.CLEAN
        proto.write_eof()  # after the end: still nothing raised


class Hooked(Recorder):
    def on_peer_eof(self) -> None:
        raise RuntimeError("hook failed on purpose")


async def test_protocol_hook_exception_is_logged_and_connection_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A raising on_peer_eof is logged on the 'aiograceful' logger; the connection still closes."""
    made, factory = recorder_factory(Hooked)
    with caplog.at_level(logging.ERROR, logger="aiograceful"):
        async with connected(factory) as sock:
            sock.shutdown(socket.SHUT_WR)
            data, error = await asyncio.to_thread(recv_until_eof, sock)
            assert (data, error) == (b"", None)
            proto = await accepted(made)
            result = await asyncio.wait_for(proto.wait_closed(), 2)
            assert result.outcome is CloseOutcome.CLEAN
    records = [r for r in caplog.records if r.name == "aiograceful"]
    assert len(records) == 1
    assert "on_peer_eof" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], RuntimeError)


async def test_protocol_data_received_is_the_users_own() -> None:
    """data_received is not wrapped: the class's own function, called by the transport."""
    made, factory = recorder_factory(Recorder)
    async with connected(factory) as sock:
        proto = await accepted(made)
        assert type(proto).data_received is Recorder.data_received
        assert "data_received" not in vars(proto)
        assert proto.transport.get_protocol() is proto
        sock.sendall(b"hello")
        await wait_until(lambda: bytes(proto.received) == b"hello")
        proto.abort()


async def test_protocol_default_on_peer_eof_closes_gracefully() -> None:
    """With the default hook, the peer's FIN ends the connection CLEAN and leaves no CLOSE_WAIT."""
    made, factory = recorder_factory(Recorder)
    async with protocol_server(factory) as port:
        sock = connect(port)
        try:
            sock.sendall(b"ping")
            sock.shutdown(socket.SHUT_WR)
            data, error = await asyncio.to_thread(recv_until_eof, sock)
            assert (data, error) == (b"", None)
            proto = await accepted(made)
            result = await asyncio.wait_for(proto.wait_closed(), 2)
            assert result.outcome is CloseOutcome.CLEAN
            assert bytes(proto.received) == b"ping"
            assert close_wait_count(port) == 0
        finally:
            sock.close()


async def test_protocol_close_gracefully_is_idempotent_with_one_result() -> None:
    """Repeated close_gracefully(): distinct futures, one result; later options are ignored."""
    made, factory = recorder_factory(Recorder)
    async with connected(factory) as sock:
        proto = await accepted(made)
        first = proto.close_gracefully(timeout=2.0, final=b"last words")
        second = proto.close_gracefully(timeout=0.0, final=b"ignored")
        assert first is not second
        assert proto.state is HalfCloseState.LINGERING
        assert proto.eof_written
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"last words", None)
        sock.close()
        results = await asyncio.wait_for(asyncio.gather(first, second), 2)
        third = await proto.close_gracefully()
        waited = await proto.wait_closed()
        assert results[0] is results[1] is third is waited
        assert third.outcome is CloseOutcome.CLEAN


async def test_protocol_cancelling_one_future_gives_up_for_all() -> None:
    """Cancelling a close_gracefully() future ends it ABORTED for every caller, without a RST.

    Nothing is unread, so the close is handed to the kernel (a plain close):
    a RST would gain nothing and could drop what the kernel still sends.
    """
    made, factory = recorder_factory(Recorder)
    async with connected(factory) as sock:
        proto = await accepted(made)
        mine = proto.close_gracefully(timeout=5.0, idle_timeout=None)
        other = proto.close_gracefully()
        data, error = await asyncio.to_thread(recv_until_eof, sock)
        assert (data, error) == (b"", None)  # our FIN
        mine.cancel()
        result = await asyncio.wait_for(other, 2)
        assert result.outcome is CloseOutcome.ABORTED
        assert result.unacked == 0
        # No RST: the client is left in CLOSE_WAIT by our FIN, not reset to CLOSE.
        assert await wait_for_tcp_state(sock, TCP_CLOSE, within=0.3) != TCP_CLOSE


async def test_protocol_wait_closed_cancel_leaves_connection() -> None:
    """Cancelling wait_closed() does not touch the connection."""
    made, factory = recorder_factory(Recorder)
    async with connected(factory) as sock:
        proto = await accepted(made)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proto.wait_closed(), 0.05)
        assert proto.state is HalfCloseState.OPEN
        proto.transport.write(b"alive")
        assert await asyncio.to_thread(sock.recv, 16) == b"alive"
        sock.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(proto.wait_closed(), 2)
        assert result.outcome is CloseOutcome.CLEAN


async def test_protocol_peer_reset_while_open() -> None:
    """A peer reset on an open connection ends it as PEER_RESET; nothing escapes."""
    made, factory = recorder_factory(Recorder)
    async with protocol_server(factory) as port:
        sock = connect(port)
        proto = await accepted(made)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        result = await asyncio.wait_for(proto.wait_closed(), 2)
        assert result.outcome is CloseOutcome.PEER_RESET
        assert isinstance(result, CloseResult)
        assert proto.state is HalfCloseState.CLOSED
    gc.collect()


async def test_protocol_not_connected_raises() -> None:
    """Actions before connection_made are misuse: RuntimeError."""
    proto = GracefulProtocol()
    assert proto.state is HalfCloseState.OPEN
    assert not proto.peer_eof
    assert not proto.eof_written
    with pytest.raises(RuntimeError, match="not connected"):
        proto.write_eof()
    with pytest.raises(RuntimeError, match="not connected"):
        proto.abort()


async def test_protocol_close_gracefully_bad_arguments_touch_nothing() -> None:
    """Bad close_gracefully() arguments raise naming the argument; the connection still works."""
    made, factory = recorder_factory(Recorder)
    async with connected(factory) as sock:
        proto = await accepted(made)
        bad: list[tuple[dict[str, object], type[Exception], str]] = [
            ({"timeout": -1.0}, ValueError, "timeout"),
            ({"timeout": float("nan")}, ValueError, "timeout"),
            ({"timeout": float("inf")}, ValueError, "timeout"),
            ({"timeout": "1"}, TypeError, "timeout"),
            ({"idle_timeout": -0.5}, ValueError, "idle_timeout"),
            ({"max_discard": -1}, ValueError, "max_discard"),
            ({"max_discard": 1.5}, TypeError, "max_discard"),
            ({"final": "text"}, TypeError, "final"),
            ({"keep_trailing": 1}, TypeError, "keep_trailing"),
            ({"reset_on_failure": None}, TypeError, "reset_on_failure"),
        ]
        for kwargs, exc_type, name in bad:
            with pytest.raises(exc_type, match=name):
                proto.close_gracefully(**kwargs)  # type: ignore[arg-type]
            assert proto.state is HalfCloseState.OPEN
        proto.transport.write(b"alive")
        assert await asyncio.to_thread(sock.recv, 16) == b"alive"
        sock.sendall(b"me too")
        await wait_until(lambda: bytes(proto.received) == b"me too")
        proto.abort()


async def test_protocol_second_eof_after_resume_reading_is_ignored() -> None:
    """uvloop reads the FIN again after resume_reading(); the close still ends CLEAN."""
    made, factory = recorder_factory(LateCloser)
    async with connected(factory) as sock:
        sock.sendall(b"hi")
        sock.shutdown(socket.SHUT_WR)
        proto = await accepted(made)
        result = await asyncio.wait_for(proto.wait_closed(), 5)
        assert result.outcome is CloseOutcome.CLEAN


class LateCloser(Recorder):
    """Resumes reading after the peer's FIN (as flow-control code does), then closes."""

    def on_peer_eof(self) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, self.transport.resume_reading)
        loop.call_later(0.1, self.close_gracefully)


# -- a cancelled close_gracefully() on a Unix socket hands over to the kernel --

UNIX_SIZE = 8 * MIB
UNIX_RATE = 4 * MIB  # bytes/s of the paced reader
CANCEL_AFTER = 0.3  # s: the outside bound cancelling a close (the transfer takes ~2 s)


class NaiveBulkProtocol(asyncio.Protocol):
    """On the first data: write UNIX_SIZE bytes, transport.close()."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.write(b"x" * UNIX_SIZE)
            self.transport.close()


class CancelledBulkProtocol(GracefulProtocol):
    """On the first data: write UNIX_SIZE bytes, close_gracefully(), cancel that after 0.3 s."""

    def __init__(self, closes: list[asyncio.Future[CloseResult]], results: list[CloseResult]):
        self.closes = closes
        self.results = results
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.write(b"x" * UNIX_SIZE)
            close = self.close_gracefully()
            asyncio.get_running_loop().call_later(CANCEL_AFTER, close.cancel)
            self.closes.append(close)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        result = self.close_result
        assert result is not None
        self.results.append(result)


async def unix_protocol_download(
    path: str, factory: Callable[[], asyncio.BaseProtocol]
) -> tuple[int, str]:
    """Serve ``factory``'s protocol on ``path``; one paced client's reading."""
    server = await asyncio.get_running_loop().create_unix_server(factory, path)
    try:
        return await asyncio.to_thread(paced_read, path, b"GET\n", UNIX_RATE, timeout=10.0)
    finally:
        server.close()
        await server.wait_closed()


@linux_only
async def test_protocol_unix_cancelled_close_gracefully_delivers_everything(
    sock_dir: Path,
) -> None:
    """The close_gracefully() future cancelled after 0.3 s on a Unix socket: all 8 MiB, then EOF.

    The outcome is ABORTED (grace was given up), but the bytes go out as
    after transport.close(), the naive reference on the same setup.
    """
    naive = await unix_protocol_download(str(sock_dir / "naive"), NaiveBulkProtocol)
    assert naive == (UNIX_SIZE, "FIN")

    closes: list[asyncio.Future[CloseResult]] = []
    results: list[CloseResult] = []
    graceful = await unix_protocol_download(
        str(sock_dir / "graceful"), lambda: CancelledBulkProtocol(closes, results)
    )
    await wait_until(lambda: len(results) == 1, 5)
    assert len(closes) == 1
    assert closes[0].cancelled()
    assert results[0].outcome is CloseOutcome.ABORTED
    assert graceful == (UNIX_SIZE, "FIN")
