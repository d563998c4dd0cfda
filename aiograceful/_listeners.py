"""Listening sockets: the backlog, the accept queue's statistics, and its drain.

Closing a listening socket resets every connection that finished its
handshake but was never ``accept()``-ed (hazard H4). :func:`close_and_drain`
closes an ``asyncio.Server`` without losing them: each listening socket is
duplicated first, the server closes its own descriptor (the kernel socket
lives on in the dup), and the queue is accepted dry through the dup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import Iterable
from typing import Final

from ._linger import logger
from ._socket import TCPI_SACKED, TCPI_UNACKED, listen_overflows, tcp_info_u32

__all__ = [
    "DEFAULT_BACKLOG",
    "AcceptQueueStats",
    "accept_queue_stats",
    "close_and_drain",
    "default_backlog",
]

#: Listen backlog, bounded by the system's ``somaxconn``. asyncio's default of
#: 100 overflows under a burst, leaving clients with half-established
#: connections (the handshake completed, the accept never came).
DEFAULT_BACKLOG: Final = 2048

_SOMAXCONN_PATH: Final = "/proc/sys/net/core/somaxconn"
# How many queued connections one drain pass takes at most (per listener).
_DRAIN_LIMIT: Final = 65536


@dataclasses.dataclass(frozen=True, slots=True)
class AcceptQueueStats:
    """The listening sockets' accept queue, where the platform tells.

    * ``depth``: connections that finished the handshake and wait for
      ``accept()`` (summed over the listening sockets).
    * ``backlog``: the queue's capacity (summed).
    * ``overflows``: the system-wide count of connections dropped because an
      accept queue was full (Linux ``TcpExt: ListenOverflows``), or None.
    """

    depth: int
    backlog: int
    overflows: int | None


def default_backlog() -> int:
    try:
        with open(_SOMAXCONN_PATH) as f:
            somaxconn = int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_BACKLOG
    return max(1, min(DEFAULT_BACKLOG, somaxconn))


def accept_queue_stats(sockets: Iterable[socket.socket]) -> AcceptQueueStats | None:
    """The accept queue of ``sockets`` (summed), or None where the platform does not tell.

    Linux only: TCP_INFO on a listening socket gives the queue's length
    (``tcpi_unacked``) and capacity (``tcpi_sacked``); ``ListenOverflows``
    in /proc/net/netstat counts drops system-wide. BSD and macOS keep these
    elsewhere (``netstat -L``), Windows not at all.
    """
    depth = backlog = 0
    found = False
    for sock in sockets:
        info = tcp_info_u32(sock, TCPI_UNACKED, TCPI_SACKED)
        if info is None:
            continue
        found = True
        depth += info[0]
        backlog += info[1]
    if not found:
        return None
    return AcceptQueueStats(depth=depth, backlog=backlog, overflows=listen_overflows())


async def close_and_drain(
    loop: asyncio.AbstractEventLoop, server: asyncio.Server
) -> list[socket.socket]:
    """Close ``server`` without resetting its accept queue; return the queued connections.

    The returned sockets are connected and non-blocking, for
    ``loop.connect_accepted_socket``.
    """
    # asyncio accepts in a reader callback on the listening socket and
    # makes each transport one task step later (_accept_connection2),
    # where asyncio.Server._attach asserts that the server is still open:
    # a connection accepted in the iteration in which the shutdown began
    # would be dropped without a word (logged in debug mode only). So stop
    # the loop's own accepting first, and give those transports a step to
    # be made; they join the shutdown as they attach. uvloop accepts and
    # attaches in one callback; remove_reader() of a descriptor it did not
    # add is a no-op there.
    for sock in server.sockets:
        loop.remove_reader(sock.fileno())
    await asyncio.sleep(0)  # the transports are made...
    await asyncio.sleep(0)  # ...and connection_made, scheduled by them, runs
    dups: list[socket.socket] = []
    for sock in server.sockets:
        try:
            dups.append(socket.socket(fileno=os.dup(sock.fileno())))
        except OSError:
            logger.warning("could not duplicate listening socket %r", sock)
    server.close()
    accepted: list[socket.socket] = []
    for dup in dups:
        with dup:
            dup.setblocking(False)
            for _ in range(_DRAIN_LIMIT):
                try:
                    conn_sock, _addr = dup.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    logger.exception("accept() failed while draining the queue")
                    break
                accepted.append(conn_sock)
    return accepted
