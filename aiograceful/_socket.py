"""Socket-level helpers, with the platform truth about each.

Everything here works on the object ``transport.get_extra_info("socket")``
returns: asyncio's ``TransportSocket`` wrapper or uvloop's pseudo-socket. Both
forward ``setsockopt``/``getsockopt``/``fileno`` to the real socket and refuse
the calls that would disturb the loop (``recv``, ``close``...).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from typing import Any, Final

if sys.platform != "win32":
    import fcntl
    import termios

__all__ = [
    "INT_ZERO",
    "SIOCINQ",
    "SIOCOUTQ",
    "TCPI_LAST_DATA_RECV",
    "TCPI_LAST_DATA_SENT",
    "TCPI_SACKED",
    "TCPI_UNACKED",
    "TCP_CLOSE",
    "TCP_FAMILIES",
    "TCP_FIN_UNACKED",
    "bytes_acked",
    "detach_filter",
    "listen_overflows",
    "peer_uid",
    "receive_queue",
    "refuse_new_handshakes",
    "reset",
    "send_queue",
    "set_linger_zero",
    "shutdown_error",
    "stop_listening",
    "tcp_info_u32",
    "tcp_state",
]

# struct linger is {int l_onoff; int l_linger;} on Linux, the BSDs and macOS,
# and {u_short; u_short;} on Windows.
_LINGER_ZERO: Final = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)

_NETSTAT_PATH: Final = "/proc/net/netstat"


def _raw_socket(transport: asyncio.BaseTransport) -> Any:
    return transport.get_extra_info("socket")


def set_linger_zero(transport: asyncio.BaseTransport) -> bool:
    """Set SO_LINGER {on, 0 s} so that closing the socket sends a RST.

    Returns False when the transport has no socket any more (already closed) or
    the option could not be set.
    """
    sock = _raw_socket(transport)
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except (OSError, ValueError):
        # ValueError: asyncio's TransportSocket on a socket closed under it
        # (fileno -1). OSError: EBADF, or EINVAL on a socket already reset.
        return False
    return True


def reset(transport: asyncio.BaseTransport) -> None:
    """Abort ``transport`` with a real RST.

    ``transport.abort()`` alone is not one: asyncio's selector transport and
    uvloop both just close the file descriptor, and Linux sends a FIN when the
    receive queue happens to be empty. With SO_LINGER {1, 0} set first, the
    close that ``abort()`` schedules discards our unsent bytes and sends a RST
    whatever the queue holds. On a TLS transport the option reaches the TCP
    socket underneath, so the same holds (no close_notify is sent).
    """
    if transport.is_closing() and _raw_socket(transport) is None:
        return
    set_linger_zero(transport)
    transport.abort()  # type: ignore[attr-defined]  # every stream transport has it


def shutdown_error(transport: asyncio.WriteTransport) -> OSError | None:
    """Call ``transport.write_eof()``; return the ``OSError`` it raised, if any.

    This is the one place aiograceful turns an ``OSError`` into a connection
    event instead of letting it escape: asyncio's selector transport calls
    ``shutdown(SHUT_WR)`` synchronously when its buffer is empty, and on a
    connection the peer already reset Linux answers ENOTCONN (or EPIPE). uvloop
    reports the same failure later, through ``connection_lost``.
    """
    try:
        transport.write_eof()
    except OSError as exc:
        return exc
    return None


# Linux struct tcp_info: 8 one-byte fields, then u32s. On a listening socket
# tcpi_unacked is the accept queue's length and tcpi_sacked its capacity;
# on a connection tcpi_last_data_sent / tcpi_last_data_recv are milliseconds
# since data last moved each way.
_TCPI_U32_OFFSET: Final = 8
TCPI_UNACKED: Final = 4
TCPI_SACKED: Final = 5
TCPI_LAST_DATA_SENT: Final = 9
TCPI_LAST_DATA_RECV: Final = 11
TCPI_SIZE: Final = _TCPI_U32_OFFSET + 4 * 12


def tcp_info_u32(sock: Any, *indexes: int) -> tuple[int, ...] | None:
    """Read u32 fields of TCP_INFO (Linux only); None where unavailable."""
    if sys.platform != "linux" or sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_SIZE)
    except (OSError, ValueError, AttributeError):
        return None
    if len(raw) < TCPI_SIZE:
        return None
    return tuple(struct.unpack_from("I", raw, _TCPI_U32_OFFSET + 4 * i)[0] for i in indexes)


# include/net/tcp_states.h
TCP_CLOSE: Final = 7
#: States in which our FIN is queued or sent and not yet acknowledged.
TCP_FIN_UNACKED: Final = frozenset({4, 9, 11})  # FIN_WAIT1, LAST_ACK, CLOSING


def tcp_state(transport: asyncio.BaseTransport) -> int | None:
    """The kernel's TCP state of the transport's socket (TCP_INFO's first byte); None if unknown.

    Linux only. Used where the loops cannot tell: ``TCP_CLOSE`` under a
    transport still open means the peer reset the connection (or our
    retransmissions timed out) and the kernel dropped what we had queued; the
    loops learn of it only through a read or a write they are waiting on, and
    after the peer's FIN (no reader) with our buffer empty (no writer) neither
    is. FIN_WAIT1, LAST_ACK and CLOSING say that our FIN is in the send queue.
    """
    raw = _transport_tcp_info(transport, _TCPI_U32_OFFSET)
    return raw[0] if raw else None


def _transport_tcp_info(transport: asyncio.BaseTransport, size: int) -> bytes | None:
    """The first ``size`` bytes of TCP_INFO for the transport's socket (Linux), or None."""
    if sys.platform != "linux":
        return None
    sock = _raw_socket(transport)
    if sock is None:
        return None
    try:
        raw: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, size)
    except (OSError, ValueError, AttributeError):
        return None
    return raw


# struct tcp_info: after the 8 one-byte fields and 24 u32s, u64 tcpi_pacing_rate,
# tcpi_max_pacing_rate, then tcpi_bytes_acked (RFC 4898 HCThruOctetsAcked, Linux 4.1).
_TCPI_BYTES_ACKED_OFFSET: Final = 120
_TCPI_BYTES_ACKED_SIZE: Final = 128


def bytes_acked(transport: asyncio.BaseTransport) -> tuple[int, int] | None:
    """The TCP state and the count of our bytes the peer has acknowledged so far; None if unknown.

    Linux (TCP_INFO's ``tcpi_bytes_acked``): it only grows, and it grows only
    when the peer acknowledges new data, unlike ``tcpi_last_ack_recv``, which
    a zero-window peer refreshes by answering our window probes.
    """
    raw = _transport_tcp_info(transport, _TCPI_BYTES_ACKED_SIZE)
    if raw is None or len(raw) < _TCPI_BYTES_ACKED_SIZE:
        return None
    acked: int = struct.unpack_from("Q", raw, _TCPI_BYTES_ACKED_OFFSET)[0]
    return raw[0], acked


def listen_overflows() -> int | None:
    """The system-wide count of accept-queue overflows (Linux ``TcpExt: ListenOverflows``)."""
    try:
        with open(_NETSTAT_PATH) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:") and values.startswith("TcpExt:"):
            fields = dict(zip(header.split()[1:], values.split()[1:], strict=False))
            value = fields.get("ListenOverflows")
            return int(value) if value is not None else None
    return None


# SIOCOUTQ and SIOCINQ are TIOCOUTQ and FIONREAD on Linux (asm-generic/sockios.h).
SIOCOUTQ: Final[int | None] = termios.TIOCOUTQ if sys.platform == "linux" else None
SIOCINQ: Final[int | None] = termios.FIONREAD if sys.platform == "linux" else None
INT_ZERO: Final = bytes(4)


TCP_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6})
# SIOCINQ counts unread bytes on TCP and on Unix stream sockets alike. SIOCOUTQ
# is read on TCP only: on a Unix socket it counts the memory of the buffers the
# peer has not read (not bytes, and not acknowledgements).
_INQ_FAMILIES: Final = TCP_FAMILIES | {socket.AF_UNIX}


def _ioctl_int(
    transport: asyncio.BaseTransport, request: int | None, families: frozenset[int]
) -> int | None:
    if request is None or sys.platform == "win32":
        return None
    sock = _raw_socket(transport)
    if sock is None or getattr(sock, "family", None) not in families:
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), request, INT_ZERO)
    except (OSError, ValueError):
        # ValueError: asyncio's TransportSocket on a socket closed under it.
        return None
    value: int = struct.unpack("i", raw)[0]
    return value


def send_queue(transport: asyncio.BaseTransport) -> int | None:
    """Bytes in the kernel's send queue that the peer has not acknowledged; None if unknown.

    Linux: ``SIOCOUTQ``, i.e. ``write_seq - snd_una``: bytes not yet sent plus
    bytes sent and not yet acknowledged. Once ``shutdown(SHUT_WR)`` has queued
    our FIN, the FIN counts as one more until the peer acknowledges it.
    Elsewhere this returns None (the platforms do tell, differently: FreeBSD's
    ``FIONWRITE`` and macOS's ``SO_NWRITE`` count the whole send buffer, which
    holds data until it is acknowledged; Windows has ``SIO_TCP_INFO``'s
    ``BytesInFlight``; none of them is wired here).
    """
    return _ioctl_int(transport, SIOCOUTQ, TCP_FAMILIES)


def receive_queue(transport: asyncio.BaseTransport) -> int | None:
    """Bytes in the kernel's receive queue, not yet read (``SIOCINQ``); None if unknown.

    Read on TCP and Unix stream sockets (Linux).
    """
    return _ioctl_int(transport, SIOCINQ, _INQ_FAMILIES)


def peer_uid(sock: Any) -> int | None:
    """The user id of the process at the other end of a Unix socket; None where unknown.

    Linux ``SO_PEERCRED`` (``struct ucred {pid, uid, gid}``): for a connected
    socket, the credentials of the peer when it called ``connect()`` or
    ``listen()``. The BSDs and macOS have ``getpeereid()`` / ``LOCAL_PEERCRED``
    instead, which Python does not wrap; there the socket file's mode (0600)
    is the only check.
    """
    if sys.platform != "linux":
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


# Linux SO_ATTACH_FILTER and SO_DETACH_FILTER (asm-generic/socket.h); Python
# has no names for them.
_SO_ATTACH_FILTER: Final = 26
_SO_DETACH_FILTER: Final = 27
# A classic BPF program over a TCP segment (offset 0 is the TCP header when
# the filter of a listening socket runs): drop a segment whose flags carry
# SYN without ACK, keep everything else. Each instruction is struct
# sock_filter {u16 code; u8 jt; u8 jf; u32 k}.
_REFUSE_SYN_PROGRAM: Final = (
    (0x30, 0, 0, 13),  # ldb [13]         the flags byte
    (0x54, 0, 0, 0x12),  # and #SYN|ACK
    (0x15, 0, 1, 0x02),  # jeq #SYN, drop, keep
    (0x06, 0, 0, 0),  # drop: ret #0
    (0x06, 0, 0, 0xFFFFFFFF),  # keep: ret #-1 (the whole segment)
)


def refuse_new_handshakes(sock: socket.socket) -> bool:
    """Drop the connection requests (SYNs) a listening TCP socket receives from now on.

    The accept queue, and handshakes already under way, are untouched: the
    handshake's last ACK still reaches the listener and its connection is
    queued. A dropped SYN is retransmitted by the client about a second
    later, when the listener is gone (refused: nothing was sent, nothing
    lost) or a successor or a ``SO_REUSEPORT`` sibling listens (it is
    answered there). Without this, a connection that completes its handshake
    between the drain's last ``accept()`` and the close is reset after its
    client sent a request on it.

    Linux only (a classic BPF socket filter); False where it cannot be
    attached (another platform, not a TCP socket, the call refused). It
    applies to the kernel socket, so every descriptor of it: never call it
    on a listener a successor shares. Connections made from the listener
    afterwards inherit it (:func:`detach_filter` takes it off).
    """
    if (
        sys.platform != "linux"
        or sock.family not in TCP_FAMILIES
        or sock.type != socket.SOCK_STREAM
    ):
        return False
    import ctypes

    program = b"".join(struct.pack("HBBI", *ins) for ins in _REFUSE_SYN_PROGRAM)
    buffer = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}
    fprog = struct.pack("@HP", len(_REFUSE_SYN_PROGRAM), ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def detach_filter(sock: socket.socket) -> None:
    """Take the socket filter off ``sock`` (Linux ``SO_DETACH_FILTER``); nothing if it has none.

    A connection accepted from a listener that refuses new handshakes
    inherits its filter, which would drop a SYN on it (and with it the
    challenge ACK of RFC 5961 that tells a restarted peer to reset).
    """
    if sys.platform != "linux":
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
    except OSError:
        pass  # ENOENT: it had none


def stop_listening(sock: socket.socket) -> bool:
    """Make the kernel socket behind a listener stop listening, for every holder of it.

    ``shutdown(SHUT_RD)`` on a listening socket. Linux: a TCP listener goes
    to CLOSE (``tcp_disconnect``): the connections in its accept queue and
    its handshakes under way are reset, ``accept()`` fails with EINVAL, and
    a new SYN to its port is answered with a reset (connection refused),
    unless another socket listens there. A Unix listener stays in LISTEN
    with its queue (``accept()`` still takes it) and refuses new connects
    (ECONNREFUSED). It applies to the kernel socket, so to every descriptor
    of it, in every process: the way to turn away clients from a listener
    that another process holds and does not serve. The port stays bound
    (a later ``listen()`` on it listens again). Elsewhere (BSD, macOS) a
    listening socket's shutdown is not documented to do this, and may fail
    with ENOTCONN. False wherever the call fails.
    """
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        return False
    return True
