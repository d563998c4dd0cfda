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

__all__ = ["reset", "set_linger_zero", "shutdown_error"]

# struct linger is {int l_onoff; int l_linger;} on Linux, the BSDs and macOS,
# and {u_short; u_short;} on Windows.
_LINGER_ZERO: Final = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)


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
