"""The accept queue: the backlog, its depth, and its drain when a server closes.

Closing a listening socket resets every connection that finished its
handshake but was never ``accept()``-ed (hazard H4). :func:`close_and_drain`
closes an ``asyncio.Server`` without losing them: each listening socket is
duplicated first, the server closes its own descriptor (the kernel socket
lives on in the dup), and the queue is accepted dry through the dup. A
listener nobody else holds then drops new SYNs before its last ``accept()``,
so that no connection is made on it between that and the close.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Final

from ._options import logger
from ._socket import (
    TCPI_SACKED,
    TCPI_UNACKED,
    detach_filter,
    listen_overflows,
    refuse_new_handshakes,
    stop_listening,
    tcp_info_u32,
)

__all__ = [
    "DEFAULT_BACKLOG",
    "HANDSHAKE_SETTLE",
    "AcceptQueueStats",
    "accept_queue_stats",
    "close_and_drain",
    "close_listeners",
    "default_backlog",
]

#: Listen backlog, bounded by the system's ``somaxconn``. asyncio's default of
#: 100 overflows under a burst, leaving clients with half-established
#: connections (the handshake completed, the accept never came).
DEFAULT_BACKLOG: Final = 2048

_SOMAXCONN_PATH: Final = "/proc/sys/net/core/somaxconn"
# How many queued connections one drain pass takes at most (per listener).
_DRAIN_LIMIT: Final = 65536
#: Seconds :func:`close_and_drain` waits, once new handshakes are refused,
#: for those already under way (their last ACK is one round trip away) before
#: it drains the queue a last time. A handshake slower than that (a path with
#: a longer round trip) is reset by the close.
HANDSHAKE_SETTLE: Final = 0.01


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
    loop: asyncio.AbstractEventLoop,
    server: asyncio.Server,
    *,
    refuse_handshakes: bool = False,
    stop: bool = False,
) -> list[socket.socket]:
    """Close ``server`` without resetting its accept queue; return the queued connections.

    The returned sockets are connected, for ``loop.connect_accepted_socket``
    (which makes them non-blocking).

    A connection that completes its handshake between the drain's last
    ``accept()`` and the close would be reset after its client sent a
    request. With ``refuse_handshakes``, once the queue is drained, new
    connection requests are refused (a SYN-dropping filter, Linux:
    :func:`~aiograceful._socket.refuse_new_handshakes`), the queue is drained
    again, and once more ``HANDSHAKE_SETTLE`` later, for the handshakes that
    were under way; then the socket closes. A client whose SYN was dropped
    retries about a second later: on a successor or a ``SO_REUSEPORT``
    sibling, or refused.

    ``refuse_handshakes`` only for listening sockets this process made and
    shares with nobody, or with ``stop`` (which takes the filter off once
    the socket stops listening): the filter is on the kernel socket, and would turn
    away every connection for another holder of it (workers forked or
    spawned with it, systemd's socket, a successor's handoff) for good. A
    process that forks after it bound its listener shares it too: give such
    a server the socket with ``sock=``. The filter replaces any socket filter
    of the listener's own.

    ``stop``: once drained, the kernel socket stops listening, for every
    holder of it (:func:`~aiograceful._socket.stop_listening`), and what a
    Unix listener still holds queued is drained once more. For a listener
    held by another process that does not accept from it (a successor that
    took it and never acknowledged): its queue would otherwise fill with
    connections nobody accepts, whose clients hang; they are refused instead.
    With ``refuse_handshakes`` the drain goes first, as above, so that the
    stop resets no connection that was made before it.
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
    try:
        for dup in dups:
            dup.setblocking(False)
        _accept_all(dups, accepted)
        refused = [dup for dup in dups if refuse_handshakes and refuse_new_handshakes(dup)]
        if refused:
            # Connections made from now on inherit the filter: taken off each.
            _accept_all(refused, accepted, unfilter=True)
            await asyncio.sleep(HANDSHAKE_SETTLE)
            _accept_all(refused, accepted, unfilter=True)
        if stop:
            _stop_all(dups, accepted)
    except BaseException:
        # Cancelled while it settled: nobody will serve what was taken.
        for conn_sock in accepted:
            conn_sock.close()
        raise
    finally:
        for dup in dups:
            dup.close()
    return accepted


def _accept_all(
    listeners: Sequence[socket.socket], accepted: list[socket.socket], *, unfilter: bool = False
) -> None:
    """Accept what each of ``listeners`` has queued (``_DRAIN_LIMIT`` at most) into ``accepted``.

    ``unfilter``: detach the socket filter each accepted socket inherited.
    """
    for listener in listeners:
        for _ in range(_DRAIN_LIMIT):
            try:
                conn_sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                logger.exception("accept() failed while draining the queue")
                break
            if unfilter:
                detach_filter(conn_sock)
            accepted.append(conn_sock)


def _stop_all(listeners: Sequence[socket.socket], accepted: list[socket.socket]) -> None:
    """Stop each of ``listeners`` listening; accept what a Unix listener still holds queued."""
    for listener in listeners:
        if not stop_listening(listener):
            logger.warning("could not stop listening socket %r from listening", listener)
            continue
        # A filter of ours would drop SYNs for a holder that listens again.
        detach_filter(listener)
        # A stopped TCP listener reset its queue and left LISTEN; a Unix one
        # keeps its queue, which the last holder's close resets.
        if listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            _accept_all([listener], accepted)


async def close_listeners(loop: asyncio.AbstractEventLoop, server: asyncio.Server) -> None:
    """Stop accepting on ``server`` and close its descriptors, leaving its queue alone.

    For a server whose listening sockets a successor holds too (a handoff):
    closing one descriptor of a kernel socket others hold does not reset its
    queue; only the last close does (and ``shutdown()`` on a listening socket
    would, for every holder: it is never called here). The successor accepts
    what is queued.
    """
    for sock in server.sockets:
        loop.remove_reader(sock.fileno())
    await asyncio.sleep(0)  # as in close_and_drain: transports made in this
    await asyncio.sleep(0)  # iteration attach before the server closes
    server.close()
