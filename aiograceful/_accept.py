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
from typing import Any, Final

from ._options import logger
from ._socket import (
    TCP_FAMILIES,
    TCPI_SACKED,
    TCPI_UNACKED,
    ForeignFilterError,
    connection_made,
    detach_filter,
    detach_reuseport_program,
    handshakes_under_way,
    listen_overflows,
    migrate_requests,
    probe_reuseport_program,
    refuse_new_handshakes,
    reuseport_group,
    set_reuseport_program,
    steer_reuseport_program,
    stop_listening,
    tcp_info_u32,
)

__all__ = [
    "DEFAULT_BACKLOG",
    "HANDSHAKE_SETTLE",
    "HANDSHAKE_SETTLE_LIMIT",
    "STEER_REUSEPORT",
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
#: for those already under way (their last ACK is one round trip away) where
#: the kernel does not say when they are done (no sock_diag: not Linux).
HANDSHAKE_SETTLE: Final = 0.01
#: Where the kernel tells (Linux sock_diag), the wait lasts until none of the
#: handshakes under way to the port when new ones were refused is still
#: under way, this many seconds at most (a client that vanished after its
#: SYN leaves its request sock for a minute); polled every ``_SETTLE_POLL``.
HANDSHAKE_SETTLE_LIMIT: Final = 1.0
_SETTLE_POLL: Final = 0.002
# How long the probe of a listener's place in its SO_REUSEPORT group waits
# for its connection, and for the connection to be found in the queue.
_PROBE_TIMEOUT: Final = 0.5
#: Whether a leaving ``SO_REUSEPORT`` listener has its group steer new
#: connections to a sibling (:func:`_steer_away`). False: its SYN filter
#: alone turns them away, and their clients retry a second later (the
#: fallback where steering cannot be done; set False to measure it, or for
#: a group whose members attach a reuseport program of their own, which
#: steering replaces for its duration and then detaches).
STEER_REUSEPORT = True
_PROBE_POLLS: Final = 200


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
    steered: list[socket.socket] = []
    try:
        for dup in dups:
            dup.setblocking(False)
        _accept_all(dups, accepted)
        if refuse_handshakes:
            watched = await _refuse_all(loop, dups, accepted, steered)
            if watched:
                # Connections made from now on inherit the filter: taken off each.
                _accept_all(watched, accepted, unfilter=True)
                await _settle(watched, accepted)
                _accept_all(watched, accepted, unfilter=True)
        for dup in steered:
            # The group's program goes with the listener: it would keep
            # sending every connection to one socket. From here to the
            # close the kernel's hash may pick this listener again: its
            # filter drops those SYNs (the client retries in a second).
            detach_reuseport_program(dup)
            _accept_all([dup], accepted, unfilter=True)
        steered.clear()
        if stop:
            _stop_all(dups, accepted)
    except BaseException:
        # Cancelled while it settled: nobody will serve what was taken.
        for conn_sock in accepted:
            conn_sock.close()
        raise
    finally:
        for dup in steered:
            detach_reuseport_program(dup)
        for dup in dups:
            dup.close()
    return accepted


async def _refuse_all(
    loop: asyncio.AbstractEventLoop,
    listeners: Sequence[socket.socket],
    accepted: list[socket.socket],
    steered: list[socket.socket],
) -> list[socket.socket]:
    """Turn new connections away from each of ``listeners``; return those it was done for.

    A TCP listener in a ``SO_REUSEPORT`` group first has the group steer new
    connections to a sibling (:func:`_steer_away`, appended to ``steered``),
    then drops the SYNs that still reach it (a filter, unless it has one of
    its own). A Unix listener stops listening: new connects are refused
    while its queue stays (accepted by the drain after).
    """
    watched: list[socket.socket] = []
    for listener in listeners:
        if listener.family == socket.AF_UNIX:
            # A Unix connect() is queued at once, with no handshake: one
            # made after the drain's last accept() is reset by the close,
            # after its client may have written. shutdown(SHUT_RD) makes the
            # kernel refuse new ones (ECONNREFUSED, nothing sent) and keeps
            # the queue, which the next drain takes (stop_listening).
            if stop_listening(listener):
                watched.append(listener)
            continue
        if listener.family not in TCP_FAMILIES:
            continue
        if STEER_REUSEPORT and await _steer_away(loop, listener, accepted):
            steered.append(listener)
        try:
            filtered = refuse_new_handshakes(listener)
        except ForeignFilterError as exc:
            if listener in steered and migrate_requests():
                # What still reaches it is handed to a sibling at the close.
                logger.info("%s; the kernel migrates its requests (tcp_migrate_req)", exc)
            else:
                logger.error(
                    "%s: a connection made on it before the close may be reset%s",
                    exc,
                    " (new ones are steered to a sibling)" if listener in steered else "",
                )
            filtered = False
        if filtered or listener in steered:
            watched.append(listener)
    return watched


async def _steer_away(
    loop: asyncio.AbstractEventLoop, listener: socket.socket, accepted: list[socket.socket]
) -> bool:
    """Have the ``SO_REUSEPORT`` group of ``listener`` send new connections to a sibling.

    Linux: a classic BPF program on the group picks the listener of each new
    connection by its index in the group. Which index is this listener's?
    A probe connection from a port of ours is sent to index 0 (a program
    that leaves every other connection to the hash); if it lands in this
    listener's queue, the sibling is index 1, else index 0. The probe is a
    connection made and closed (index 0's worker sees it open and end). A
    group of one (index 1 past its end) falls back to the hash, that is to
    this listener, whose filter then drops the SYNs as without a group.

    Two members leaving at once replace (the later attach wins) and then
    detach each other's program: one of them may be given new connections
    again for the rest of its settle, which its filter drops (latency, not
    data). A program of the application's own on the group is replaced for
    the duration and detached (``STEER_REUSEPORT`` False leaves it alone).

    False where it was not done: not a group (always, elsewhere than Linux:
    the listener then relies on its filter, or closes after the drain), no
    address to probe from, the probe not answered; the probe's program is
    detached then, and if this is cancelled.
    """
    if not reuseport_group(listener):
        return False
    host, port, *rest = listener.getsockname()
    family = listener.family
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
    attached = False
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        probe.setblocking(False)
        probe.bind((host, 0, *rest[:2]) if family == socket.AF_INET6 else (host, 0))
        local = probe.getsockname()
        attached = set_reuseport_program(listener, probe_reuseport_program(local[1], 0))
        if not attached:
            return False
        await asyncio.wait_for(loop.sock_connect(probe, (host, port, *rest)), _PROBE_TIMEOUT)
        mine = await _probe_landed(listener, local, (host, port), accepted)
        if mine is None:
            return False
        # Replaces the probe's program; close_and_drain detaches it.
        steering = set_reuseport_program(listener, steer_reuseport_program(1 if mine else 0))
        attached = not steering
        return steering
    except (OSError, TimeoutError):
        return False
    finally:
        probe.close()
        if attached:
            # Failed or cancelled with the probe's program on the group.
            detach_reuseport_program(listener)


async def _probe_landed(
    listener: socket.socket,
    probe: tuple[Any, ...],
    address: tuple[str, int],
    accepted: list[socket.socket],
) -> bool | None:
    """Whether the probe connection from ``probe`` is in the queue of ``listener``.

    The kernel queues it on one listener of the group; once sock_diag shows
    it made and the queue does not hold it, another listener has it. What
    else the queue holds is drained into ``accepted``. None: not found out.
    """
    found_made = False
    for _ in range(_PROBE_POLLS):
        for _n in range(_DRAIN_LIMIT):
            try:
                conn_sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return None
            if peer[:2] == probe[:2]:
                conn_sock.close()
                return True
            accepted.append(conn_sock)
        if found_made:
            return False
        made = connection_made(address, probe, listener.family)
        if made is None:
            return None
        # Made: it is queued, or about to be (the child is hashed just
        # before it joins the queue); one more look at the queue, then no.
        found_made = made
        await asyncio.sleep(0.001)
    return None


async def _settle(listeners: Sequence[socket.socket], accepted: list[socket.socket]) -> None:
    """Wait until the handshakes under way to the listeners' ports when they stopped taking new
    ones are done, draining meanwhile; ``HANDSHAKE_SETTLE_LIMIT`` at most.

    Those are the only ones that can still join the queues (the SYNs since
    were steered elsewhere or dropped). The kernel does not say which
    listener of a group a handshake is for: the siblings' are waited for too,
    each one round trip away. Where the kernel does not tell, a fixed
    ``HANDSHAKE_SETTLE``.
    """
    ports = {listener.getsockname()[1] for listener in listeners if listener.family in TCP_FAMILIES}
    if not ports:
        return
    # The filter and the group's program are read under RCU: a SYN the
    # kernel is handling on another CPU may still be given to the listener.
    await asyncio.sleep(_SETTLE_POLL)
    under_way = _handshakes(ports)
    if under_way is None:
        await asyncio.sleep(HANDSHAKE_SETTLE)
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANDSHAKE_SETTLE_LIMIT
    for _ in range(int(HANDSHAKE_SETTLE_LIMIT / _SETTLE_POLL)):
        if not under_way or loop.time() >= deadline:
            return
        await asyncio.sleep(_SETTLE_POLL)
        _accept_all(listeners, accepted, unfilter=True)
        now = _handshakes(ports)
        if now is None:
            return
        under_way &= now


def _handshakes(ports: set[int]) -> set[tuple[int, int, bytes, int, bytes]] | None:
    found: set[tuple[int, int, bytes, int, bytes]] = set()
    for port in ports:
        now = handshakes_under_way(port)
        if now is None:
            return None
        found.update((port, *key) for key in now)
    return found


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
