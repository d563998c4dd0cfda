"""Socket-level helpers, with the platform truth about each.

Everything here works on the object ``transport.get_extra_info("socket")``
returns: asyncio's ``TransportSocket`` wrapper or uvloop's pseudo-socket. Both
forward ``setsockopt``/``getsockopt``/``fileno`` to the real socket and refuse
the calls that would disturb the loop (``recv``, ``close``...).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import sys
from collections.abc import Sequence
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
    "ForeignFilterError",
    "bytes_acked",
    "connection_made",
    "detach_filter",
    "detach_reuseport_program",
    "foreign_filter",
    "handshakes_under_way",
    "listen_overflows",
    "migrate_requests",
    "peer_uid",
    "probe_reuseport_program",
    "receive_queue",
    "refuse_new_handshakes",
    "reset",
    "reuseport_group",
    "send_queue",
    "set_linger_zero",
    "set_reuseport_program",
    "shutdown_error",
    "steer_reuseport_program",
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
_SO_GET_FILTER: Final = _SO_ATTACH_FILTER
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


class ForeignFilterError(RuntimeError):
    """The listener has a socket filter that is not aiograceful's: it is never replaced."""


def _fprog(program: Sequence[tuple[int, int, int, int]]) -> tuple[bytes, Any]:
    """``struct sock_fprog`` for ``program``, and the buffer it points into (keep it alive)."""
    import ctypes

    raw = b"".join(struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF) for code, jt, jf, k in program)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}
    return struct.pack("@HP", len(program), ctypes.addressof(buffer)), buffer


def _attach(sock: socket.socket, option: int, program: Sequence[tuple[int, int, int, int]]) -> bool:
    fprog, _buffer = _fprog(program)
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, fprog)
    except OSError:
        return False
    return True


def foreign_filter(sock: socket.socket) -> str | None:
    """What socket filter ``sock`` has that is not aiograceful's, in words; None if none (or ours).

    Linux ``SO_GET_FILTER`` (the option number of ``SO_ATTACH_FILTER``) reads
    back a classic program as it was attached: asked with a length of 0 it
    answers with the program's length in instructions, 0 without a filter;
    an eBPF program (``SO_ATTACH_BPF``) cannot be read back (EACCES). The
    length is counted in instructions, not bytes, so Python's
    ``getsockopt(..., buflen)`` would let the kernel write 8 bytes per byte
    asked: the call goes through ctypes with a buffer of the right size.
    None elsewhere (no filter is attached there).
    """
    if sys.platform != "linux":
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    length = ctypes.c_uint(0)
    fd = sock.fileno()
    if libc.getsockopt(fd, socket.SOL_SOCKET, _SO_GET_FILTER, None, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        return "an eBPF socket filter" if err == errno.EACCES else f"unknown ({os.strerror(err)})"
    if length.value == 0:
        return None
    buffer = ctypes.create_string_buffer(8 * length.value)
    if libc.getsockopt(fd, socket.SOL_SOCKET, _SO_GET_FILTER, buffer, ctypes.byref(length)) != 0:
        return "a classic BPF socket filter (unreadable)"
    if buffer.raw[: 8 * length.value] == _fprog(_REFUSE_SYN_PROGRAM)[1].raw:
        return None
    return f"a classic BPF socket filter of {length.value} instructions"


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
    attached (another platform, not a TCP socket, the call refused: a
    filter locked with ``SO_LOCK_FILTER``). A filter of the socket's own
    (see :func:`foreign_filter`) is never replaced: :class:`ForeignFilterError`.
    It applies to the kernel socket, so every descriptor of it: never call it
    on a listener a successor shares. Connections made from the listener
    afterwards inherit it (:func:`detach_filter` takes it off).
    """
    if (
        sys.platform != "linux"
        or sock.family not in TCP_FAMILIES
        or sock.type != socket.SOCK_STREAM
    ):
        return False
    found = foreign_filter(sock)
    if found is not None:
        raise ForeignFilterError(f"{sock!r} has {found}: aiograceful does not replace it")
    return _attach(sock, _SO_ATTACH_FILTER, _REFUSE_SYN_PROGRAM)


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


# -- a SO_REUSEPORT group: steering new connections among its listeners ------------------

# Linux asm-generic/socket.h: SO_ATTACH_REUSEPORT_CBPF is 51; 52 is
# SO_ATTACH_REUSEPORT_EBPF (it takes a program's fd), and the detach of
# either, SO_DETACH_REUSEPORT_BPF, is 68 (Linux 5.3). Python has no names.
_SO_ATTACH_REUSEPORT_CBPF: Final = 51
_SO_DETACH_REUSEPORT_BPF: Final = 68
# A classic BPF load at this offset and beyond reads the network header
# (linux/filter.h): the program of a group runs with the packet's data past
# the TCP header, so the header's fields are reached from the IP header.
_SKF_NET_OFF: Final = -0x100000
#: The index a reuseport program returns to leave the choice to the kernel's
#: hash: an index past the group's last socket is ignored (run_bpf_filter).
_HASH: Final = 0xFFFFFFFF
_MIGRATE_REQ_PATH: Final = "/proc/sys/net/ipv4/tcp_migrate_req"

Program = tuple[tuple[int, int, int, int], ...]


def reuseport_group(sock: socket.socket) -> bool:
    """Whether ``sock`` is a TCP listener with ``SO_REUSEPORT`` (Linux): it may have siblings."""
    if (
        sys.platform != "linux"
        or sock.family not in TCP_FAMILIES
        or sock.type != socket.SOCK_STREAM
    ):
        return False
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    except (OSError, AttributeError):
        return False


def probe_reuseport_program(source_port: int, index: int) -> Program:
    """A reuseport program sending the SYN from ``source_port`` to socket ``index`` of the group.

    Every other packet gets the kernel's hash, as without a program: a probe
    of where socket ``index`` is, which leaves the group's traffic alone.
    The TCP source port is read through the IP header (IPv4 with its
    options, IPv6 without extension headers: a Linux client's SYN has none).
    """
    return (
        (0x30, 0, 0, _SKF_NET_OFF),  # ldb [net+0]        version and IHL
        (0x54, 0, 0, 0xF0),  # and #0xf0
        (0x15, 0, 2, 0x60),  # jeq #IPv6, v6, v4
        (0x28, 0, 0, _SKF_NET_OFF + 40),  # v6: ldh [net+40]    source port
        (0x05, 0, 0, 2),  # ja check
        (0xB1, 0, 0, _SKF_NET_OFF),  # v4: ldxb 4*([net+0]&0xf)
        (0x48, 0, 0, _SKF_NET_OFF),  # ldh [x+net+0]      source port
        (0x15, 0, 1, source_port),  # check: jeq #port, hit, hash
        (0x06, 0, 0, index),  # hit: ret #index
        (0x06, 0, 0, _HASH),  # hash: ret #past-the-end
    )


def steer_reuseport_program(index: int) -> Program:
    """A reuseport program sending every new connection to socket ``index`` of the group.

    Past the group's last socket (the group shrank) the kernel's hash picks.
    """
    return ((0x06, 0, 0, index),)


def set_reuseport_program(sock: socket.socket, program: Program) -> bool:
    """Attach ``program`` to the ``SO_REUSEPORT`` group of ``sock``, replacing any (Linux).

    The program is the group's, not the socket's: it picks the listener of
    every new connection to the group (returning its index; the indexes are
    the order of joining, and when a socket leaves, the last one takes its
    place), until it is detached or the group's last socket closes. False
    where it cannot be attached.
    """
    if not reuseport_group(sock):
        return False
    return _attach(sock, _SO_ATTACH_REUSEPORT_CBPF, program)


def detach_reuseport_program(sock: socket.socket) -> bool:
    """Detach the reuseport program of the group of ``sock`` (``SO_DETACH_REUSEPORT_BPF``).

    False where none was attached (ENOENT), ``sock`` left the group, or elsewhere than Linux.
    """
    if sys.platform != "linux":
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_REUSEPORT_BPF, 0)
    except OSError:
        return False
    return True


def migrate_requests() -> bool:
    """Whether ``net.ipv4.tcp_migrate_req`` is on in this network namespace (Linux 5.14).

    Then a listener that leaves its ``SO_REUSEPORT`` group hands its accept
    queue and its handshakes under way to a sibling instead of resetting
    them. The operator sets it (``sysctl -w net.ipv4.tcp_migrate_req=1``).
    """
    try:
        with open(_MIGRATE_REQ_PATH) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


# sock_diag (linux/sock_diag.h, linux/inet_diag.h) over a netlink socket.
_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 0x1
_NLM_F_DUMP: Final = 0x300
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_NLMSG_HEADER: Final = struct.Struct("=IHHII")
_DIAG_REQ: Final = struct.Struct("=BBBxI")
_DIAG_SOCKID: Final = struct.Struct("!HH16s16s")  # then u32 ifindex, u32 cookie[2]
_DIAG_MSG_HEAD: Final = 4  # family, state, timer, retrans
#: include/net/tcp_states.h
TCP_ESTABLISHED: Final = 1
TCP_SYN_RECV: Final = 3
_DIAG_MAX_MESSAGES: Final = 100_000


def _diag_request(family: int, states: int, sockid: bytes, flags: int) -> bytes:
    body = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, states) + sockid
    return (
        _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, flags, 1, 0) + body
    )


def _diag(request: bytes) -> list[tuple[int, int, int, bytes, int, bytes]] | None:
    """Send one sock_diag request; the sockets it answers: (family, state, sport, src, dport, dst).

    None where the answer could not be had (not Linux, netlink refused).
    Bounded: a 1 s timeout per read, ``_DIAG_MAX_MESSAGES`` messages.
    """
    if sys.platform != "linux":
        return None
    found: list[tuple[int, int, int, bytes, int, bytes]] = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.sendall(request)
            seen = 0
            while seen < _DIAG_MAX_MESSAGES:
                data = nl.recv(65536)
                offset = 0
                while offset + _NLMSG_HEADER.size <= len(data):
                    length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(data, offset)
                    if length < _NLMSG_HEADER.size:
                        return None
                    seen += 1
                    payload = offset + _NLMSG_HEADER.size
                    if kind == _NLMSG_DONE:
                        return found
                    if kind == _NLMSG_ERROR:
                        code = struct.unpack_from("=i", data, payload)[0]
                        return found if code in (0, -errno.ENOENT) else None
                    if kind == _SOCK_DIAG_BY_FAMILY:
                        fam, state = data[payload], data[payload + 1]
                        sport, dport, src, dst = _DIAG_SOCKID.unpack_from(
                            data, payload + _DIAG_MSG_HEAD
                        )
                        found.append((fam, state, sport, src, dport, dst))
                    offset += (length + 3) & ~3
                if not _is_dump(request):
                    return found
    except (OSError, struct.error, AttributeError):
        return None
    return None


def _is_dump(request: bytes) -> bool:
    """Whether a sock_diag request asks for a dump (answered until NLMSG_DONE)."""
    return bool(_NLMSG_HEADER.unpack_from(request)[2] & _NLM_F_DUMP == _NLM_F_DUMP)


def handshakes_under_way(port: int) -> frozenset[tuple[int, bytes, int, bytes]] | None:
    """The TCP handshakes under way (SYN_RECV) to local ``port``: (family, local, peer port, peer).

    Linux sock_diag: the request socks of every listener on the port, the
    ``SO_REUSEPORT`` siblings' too (nothing says which listener one is for).
    None where the kernel does not tell.
    """
    found: set[tuple[int, bytes, int, bytes]] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        request = _diag_request(family, 1 << TCP_SYN_RECV, bytes(48), _NLM_F_REQUEST | _NLM_F_DUMP)
        answered = _diag(request)
        if answered is None:
            return None
        found.update(
            (fam, src, dport, dst)
            for fam, state, sport, src, dport, dst in answered
            if sport == port and state == TCP_SYN_RECV
        )
    return frozenset(found)


def connection_made(local: tuple[Any, ...], peer: tuple[Any, ...], family: int) -> bool | None:
    """Whether the kernel has an established TCP connection ``local`` <-> ``peer`` (exact lookup).

    Linux sock_diag; None where the kernel does not tell.
    """
    try:
        src = socket.inet_pton(family, local[0]).ljust(16, b"\0")
        dst = socket.inet_pton(family, peer[0]).ljust(16, b"\0")
    except (OSError, ValueError):  # a scoped IPv6 address ("fe80::1%eth0"), say
        return None
    sockid = _DIAG_SOCKID.pack(local[1], peer[1], src, dst) + struct.pack(
        "=III", 0, 0xFFFFFFFF, 0xFFFFFFFF
    )
    answered = _diag(_diag_request(family, 1 << TCP_ESTABLISHED, sockid, _NLM_F_REQUEST))
    if answered is None:
        return None
    return any(state == TCP_ESTABLISHED for _fam, state, *_rest in answered)
