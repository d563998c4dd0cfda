"""Socket-level helpers: SO_LINGER reset and the one place OSError is caught."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _util import (
    connect_outcome,
    recv_until_eof,
    set_linger_zero,
    silent_handshake,
    stream_server,
    tcp_state,
)

from aiograceful import GracefulProtocol, _socket

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


def _slow_peer_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, peer): TCP over loopback, small buffers both ends; the peer reads nothing yet."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        peer.connect(listener.getsockname())
        ours, _ = listener.accept()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    ours.setblocking(False)
    peer.setblocking(False)
    return ours, peer


def _raw_outq(sock: socket.socket) -> int:
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
    value: int = struct.unpack("i", raw)[0]
    return value


def _raw_inq(sock: socket.socket) -> int:
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4))
    value: int = struct.unpack("i", raw)[0]
    return value


async def _settled(sample: Callable[[], tuple[int, ...]], rounds: int = 200) -> tuple[int, ...]:
    """``sample()`` once it gives the same value twice, 20 ms apart (bounded: ``rounds`` tries)."""
    last = sample()
    for _ in range(rounds):
        await asyncio.sleep(0.02)
        now = sample()
        if now == last:
            return now
        last = now
    raise AssertionError(f"never settled: {last}")


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ and TCP_INFO are read on Linux only")
async def test_socket_outstanding_counts_unacked_bytes_and_leaves_our_fin_out() -> None:
    """outstanding() is our bytes the peer has not acknowledged: the buffer plus SIOCOUTQ, no FIN.

    The peer cannot have acknowledged more than reached it (what it read plus
    its receive queue), so the count is at least ``written - received``. Once
    our FIN is queued behind the data (FIN_WAIT1), the kernel's SIOCOUTQ counts it as
    one more byte; a close that counted it would wait for a byte that is not
    data, and one that subtracted it before the kernel queued it (uvloop
    defers shutdown()) would miss one.
    """
    ours, peer = _slow_peer_pair()
    proto = GracefulProtocol()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(lambda: proto, sock=ours)
    graceful = proto._graceful
    assert graceful is not None
    received = 0
    try:
        written = 2 * 1024 * 1024
        transport.write(bytes(written))

        def sample() -> tuple[int, ...]:
            total, exact = graceful.outstanding()
            buffered = transport.get_write_buffer_size()
            return total, int(exact), buffered, _raw_outq(ours), _raw_inq(peer)

        total, exact, buffered, outq, peer_inq = await _settled(sample)
        assert exact
        assert buffered > 0, (total, buffered)
        assert total == buffered + outq
        # The peer cannot have acknowledged more than reached it.
        assert total >= written - peer_inq

        # The peer reads until our transport's buffer is empty; the kernel
        # still holds data, and now our FIN behind it.
        proto.write_eof()
        for _ in range(500):
            if not transport.get_write_buffer_size():
                break
            with contextlib.suppress(BlockingIOError):
                received += len(peer.recv(8192))
            await asyncio.sleep(0.002)
        assert not transport.get_write_buffer_size()
        total, exact, buffered, outq, peer_inq = await _settled(sample)
        state = tcp_state(ours)
        assert state == 4, f"expected FIN_WAIT1 (our FIN queued behind data), got {state}"
        assert exact
        assert buffered == 0
        assert total == outq - 1  # the kernel counts the FIN; the library does not
        assert total >= written - received - peer_inq > 0

        # The peer reads the rest: nothing is outstanding, the FIN included.
        for _ in range(2000):
            try:
                data = peer.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.002)
                continue
            if not data:
                break
            received += len(data)
        assert received == written
        total, exact, buffered, outq, _ = await _settled(sample)
        assert (total, exact, buffered, outq) == (0, 1, 0, 0)
    finally:
        transport.abort()
        peer.close()
        await asyncio.sleep(0.01)


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ is read on Linux only")
async def test_socket_send_queue_is_not_read_on_unix_sockets() -> None:
    """On a Unix stream socket SIOCOUTQ counts buffer memory, not bytes: the library ignores it.

    The raw figure is larger than the bytes the peer has not read (each
    buffer's overhead counts), so treating it as unacknowledged bytes would
    report a wrong ``unacked`` and keep a quiet connection looking busy.
    SIOCINQ, though, counts unread bytes there as on TCP, and is read.
    """
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    proto = GracefulProtocol()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(lambda: proto, sock=ours)
    graceful = proto._graceful
    assert graceful is not None
    try:
        transport.write(b"x" * 1000)
        await _settled(lambda: (transport.get_write_buffer_size(),))
        assert not transport.get_write_buffer_size()
        assert _raw_outq(ours) > 1000  # memory, not the 1,000 bytes unread
        assert _socket.send_queue(transport) is None
        assert graceful.outstanding() == (0, False)
        transport.pause_reading()
        peer.sendall(b"y" * 1234)
        await asyncio.sleep(0.05)
        assert _socket.receive_queue(transport) == 1234
    finally:
        transport.abort()
        peer.close()
        await asyncio.sleep(0.01)


# -- refuse_new_handshakes ------------------------------------------------------------------


def _drained_then_connected(family: socket.AddressFamily, refuse: bool) -> str:
    """A listener drained dry, a client connecting and sending, the listener closed.

    What the client's next read sees: the window of a drain before a close,
    made wide. ``refuse`` attaches the SYN filter before the client comes.
    """
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(8)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # drained: nothing queued
        if refuse:
            assert _socket.refuse_new_handshakes(listener) is True
        address = listener.getsockname()[:2]
        client = socket.socket(family, socket.SOCK_STREAM)
        with client:
            client.settimeout(0.3)
            try:
                client.connect(address)
            except OSError as exc:
                listener.close()
                return f"connect: {type(exc).__name__}"
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            listener.close()
            try:
                return f"read: {client.recv(100)!r}"
            except OSError as exc:
                return f"read: {type(exc).__name__}"


@pytest.mark.skipif(sys.platform != "linux", reason="a Linux socket filter")
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_socket_refuse_new_handshakes_closes_the_window_after_a_drain(
    family: socket.AddressFamily,
) -> None:
    """Stock: a connection made after the drain is reset once its request is sent. Filtered:
    its handshake never completes, so nothing is sent (the client is refused on its retry)."""
    assert _drained_then_connected(family, refuse=False) == "read: ConnectionResetError"
    assert _drained_then_connected(family, refuse=True) == "connect: TimeoutError"


@pytest.mark.skipif(sys.platform != "linux", reason="a Linux socket filter")
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_socket_refuse_new_handshakes_drops_syns_and_keeps_the_queue(
    family: socket.AddressFamily,
) -> None:
    """After the filter a new connect() gets no answer; a queued connection and its bytes stay."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(8)
        address = listener.getsockname()[:2]
        queued = socket.create_connection(address, timeout=5)
        with queued:
            queued.sendall(b"request")
            assert _socket.refuse_new_handshakes(listener) is True
            assert connect_outcome(address[0], address[1], 0.3) == "TimeoutError"
            listener.settimeout(5)
            conn, _ = listener.accept()
            with conn:
                assert conn.recv(100) == b"request"  # data to a queued connection passes
                conn.sendall(b"answer")
                assert queued.recv(100) == b"answer"
        listener.close()
        # With the listener gone, the client's next SYN is refused.
        assert connect_outcome(address[0], address[1], 0.3) == "ConnectionRefusedError"


def test_socket_refuse_new_handshakes_is_false_where_it_does_not_apply(tmp_path: Path) -> None:
    """Not a TCP listener (a Unix socket, UDP): False, and the socket is untouched."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.bind(str(tmp_path / "s"))
        unix.listen(1)
        assert _socket.refuse_new_handshakes(unix) is False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(tmp_path / "s"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert _socket.refuse_new_handshakes(udp) is False


def _filter_length(sock: socket.socket) -> int:
    """The socket filter's length in instructions (SO_GET_FILTER); 0 without one."""
    return len(sock.getsockopt(socket.SOL_SOCKET, 26, 1024))


@pytest.mark.skipif(sys.platform != "linux", reason="a Linux socket filter")
def test_socket_detach_filter_takes_the_filter_off() -> None:
    """The filter a connection inherits from a refusing listener comes off; twice is harmless."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=5)
        conn, _ = listener.accept()
        with client, conn:
            # (A connection made after the listener's filter inherits it; on
            # loopback none is made then, so the filter is put on directly.)
            assert _socket.refuse_new_handshakes(conn) is True
            assert _filter_length(conn) == len(_socket._REFUSE_SYN_PROGRAM)
            _socket.detach_filter(conn)
            assert _filter_length(conn) == 0
            _socket.detach_filter(conn)
            conn.sendall(b"still a connection")
            assert client.recv(100) == b"still a connection"


# -- a socket filter of the user's; a SO_REUSEPORT group's program; sock_diag ---------------


def _attach_pass_all(sock: socket.socket) -> None:
    """A filter of the user's own: keep every packet whole (``ret #-1``)."""
    import ctypes

    program = struct.pack("HBBI", 0x06, 0, 0, 0xFFFFFFFF)
    buffer = ctypes.create_string_buffer(program, len(program))
    sock.setsockopt(socket.SOL_SOCKET, 26, struct.pack("@HP", 1, ctypes.addressof(buffer)))


@pytest.mark.skipif(sys.platform != "linux", reason="a Linux socket filter")
def test_socket_a_filter_of_the_users_is_read_back_and_never_replaced() -> None:
    """SO_GET_FILTER tells ours from the user's; refuse_new_handshakes will not replace theirs."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert _socket.foreign_filter(listener) is None  # none
        assert _socket.refuse_new_handshakes(listener) is True
        assert _socket.foreign_filter(listener) is None  # ours
        assert _socket.refuse_new_handshakes(listener) is True  # ours again: replaced
        _socket.detach_filter(listener)
        _attach_pass_all(listener)
        assert _socket.foreign_filter(listener) == "a classic BPF socket filter of 1 instructions"
        with pytest.raises(_socket.ForeignFilterError, match="does not replace it"):
            _socket.refuse_new_handshakes(listener)
        assert _filter_length(listener) == 1  # still the user's
        # It keeps every packet: a connection is still made.
        with socket.create_connection(listener.getsockname()[:2], timeout=5):
            conn, _ = listener.accept()
            conn.close()


def _group(size: int) -> list[socket.socket]:
    listeners: list[socket.socket] = []
    port = 0
    for _ in range(size):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        listeners.append(sock)
    return listeners


def _accepted_by(listeners: list[socket.socket]) -> list[list[int]]:
    """For each listener, the peer ports of the connections it has queued (accepted and closed)."""
    found: list[list[int]] = []
    for listener in listeners:
        ports = []
        for _ in range(64):
            try:
                conn, peer = listener.accept()
            except BlockingIOError:
                break
            conn.close()
            ports.append(peer[1])
        found.append(ports)
    return found


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="SO_REUSEPORT groups")
@pytest.mark.skipif(sys.platform != "linux", reason="a Linux reuseport program")
def test_socket_reuseport_programs_pick_the_listener_by_its_place_in_the_group() -> None:
    """The probe program sends only the probe's SYN to index k; the steering one sends all;
    detached, the hash picks again. Indexes are the order of joining."""
    listeners = _group(3)
    port = listeners[0].getsockname()[1]
    try:
        assert all(_socket.reuseport_group(sock) for sock in listeners)
        for k in range(3):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                probe_port = probe.getsockname()[1]
                program = _socket.probe_reuseport_program(probe_port, k)
                assert _socket.set_reuseport_program(listeners[2], program)
                probe.connect(("127.0.0.1", port))
                time.sleep(0.05)
                found = _accepted_by(listeners)
                assert [probe_port in ports for ports in found] == [i == k for i in range(3)]
        assert _socket.set_reuseport_program(listeners[0], _socket.steer_reuseport_program(2))
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]
        time.sleep(0.05)
        assert [len(ports) for ports in _accepted_by(listeners)] == [0, 0, 6]
        for client in clients:
            client.close()
        assert _socket.detach_reuseport_program(listeners[1]) is True
        assert _socket.detach_reuseport_program(listeners[1]) is False  # none left
    finally:
        for sock in listeners:
            sock.close()
    with socket.create_server(("127.0.0.1", 0)) as alone:
        assert not _socket.reuseport_group(alone)
        assert _socket.set_reuseport_program(alone, _socket.steer_reuseport_program(0)) is False


@pytest.mark.skipif(sys.platform != "linux", reason="Linux sock_diag")
def test_socket_sock_diag_sees_handshakes_under_way_and_connections() -> None:
    """A handshake that never completes is under way (SYN_RECV); a completed one is made."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert _socket.handshakes_under_way(port) == frozenset()
        with silent_handshake("127.0.0.1", port) as client:
            time.sleep(0.05)
            under_way = _socket.handshakes_under_way(port)
            assert under_way is not None
            assert {peer_port for _f, _l, peer_port, _p in under_way} == {client.getsockname()[1]}
        with socket.create_connection(("127.0.0.1", port), timeout=5) as made:
            local = ("127.0.0.1", port)
            assert _socket.connection_made(local, made.getsockname(), socket.AF_INET) is True
            assert _socket.connection_made(local, ("127.0.0.1", 1), socket.AF_INET) is False
