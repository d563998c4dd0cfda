"""GracefulServer: asymmetric shutdown, grace then force, a drained accept queue.

Theory of operation
-------------------
TCP's own close is symmetric, and a symmetric shutdown loses requests: if the
server half-closes while a client's last request is in flight, the server can
no longer answer it. So the server's shutdown is asymmetric: it first *tells*
every peer in protocol terms (the notice: a GOAWAY, a ``Connection: close``, a
BYE line) and keeps both directions open; the client finishes and half-closes;
the server answers what it received before that FIN and closes. Peers that
ignore the notice are closed after ``grace`` with a short linger, then let go.

The order of :meth:`GracefulServer.shutdown`:

1. Stop accepting, without losing the accept queue. Closing a listening socket
   resets every connection that finished its handshake but was never
   ``accept()``-ed. So each listening socket is first duplicated; asyncio's
   server closes its own descriptor (the kernel socket lives on in the dup),
   and the queue is drained through the dup with ``accept()`` until it is
   empty, each connection handed to ``loop.connect_accepted_socket``.
2. Notify every connection once, while its write side is open.
3. Wait up to ``grace`` for connections to close themselves.
4. Close the rest gracefully, with ``force_timeout`` as the linger bound.
5. Let go of whatever is still open (a plain close: a FIN, what the kernel
   holds still sent); wait for ``connection_lost``.

Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

from ._connections import _Connection, _ProtocolConnection, _ProtocolGate, _StreamConnection
from ._linger import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_DISCARD,
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_TIMEOUT,
    CloseOutcome,
    Linger,
    LingerOptions,
    check_seconds,
    logger,
)
from ._listeners import (
    DEFAULT_BACKLOG,
    HANDOFF_TIMEOUT,
    AcceptQueueStats,
    HandoffOffer,
    Taken,
    accept_queue_stats,
    check_handoff,
    close_and_drain,
    close_listeners,
    default_backlog,
    take_listeners,
)
from ._protocol import GracefulProtocol

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_FORCE_TIMEOUT",
    "DEFAULT_GRACE",
    "AcceptQueueStats",
    "GracefulServer",
    "ServerStats",
    "ShutdownReport",
    "create_server",
    "create_unix_server",
    "start_server",
    "start_unix_server",
]

#: Seconds connections get, after the notice, to close themselves.
DEFAULT_GRACE: Final = 10.0
#: Linger bound for connections still open when the grace period ends.
DEFAULT_FORCE_TIMEOUT: Final = 1.0
# Bound on waiting for connection_lost after an abort (it is scheduled at once).
_LOST_WAIT: Final = 1.0


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
NoticeHook = Callable[[asyncio.StreamWriter], "Awaitable[None] | None"]
RejectHook = Callable[[asyncio.Transport], None]


@dataclasses.dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What a shutdown did.

    * ``connections``: open when the shutdown began, plus those drained from
      the accept queue (and any accepted while it ran).
    * ``closed_clean``: of those, closed within ``grace`` with outcome CLEAN.
    * ``forced``: still open when ``grace`` ran out (closed with a short
      linger, then let go if need be).
    * ``duration``: seconds from the start of the shutdown to this report.
    * ``outcomes``: how many connections ended with each :class:`CloseOutcome`.
    * ``drained``: connections taken from the accept queue.
    * ``rejected``: connections turned away at the limit during the server's life.
    """

    connections: int
    closed_clean: int
    forced: int
    duration: float
    outcomes: Mapping[CloseOutcome, int]
    drained: int = 0
    rejected: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ServerStats:
    """Counts since the server started: what an operator graphs (see :attr:`GracefulServer.stats`).

    * ``active``: connections open now (as :attr:`GracefulServer.connections`).
    * ``closed``: connections that have ended, rejected ones included.
    * ``outcomes``: of those, how many ended with each :class:`CloseOutcome`
      (every outcome is a key): ``CLEAN`` is the good case; ``PEER_RESET``
      and ``ABORTED`` are the ones worth an alert.
    * ``rejected``: connections turned away at ``max_connections``.
    * ``drained``: connections taken from the accept queue at shutdown.
    * ``discarded``: bytes the peers sent that nobody read (lingering closes).
    * ``unacked``: bytes written that the peers had not acknowledged when the
      sockets were closed (lost in the network or in a reset).
    * ``unacked_unknown``: closes for which the platform could not tell
      ``unacked`` (counted as 0 bytes there).
    """

    active: int
    closed: int
    outcomes: Mapping[CloseOutcome, int]
    rejected: int
    drained: int
    discarded: int
    unacked: int
    unacked_unknown: int


class _Notice:
    """Set once the server starts shutting down. ``is_set()`` and ``await wait()``."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def is_set(self) -> bool:
        """True once the shutdown has begun."""
        return self._event.is_set()

    async def wait(self) -> None:
        """Wait until the shutdown begins."""
        await self._event.wait()

    def _set(self) -> None:
        self._event.set()

    def __repr__(self) -> str:
        return f"<Notice {'set' if self.is_set() else 'unset'}>"


def _check_seconds(name: str, value: object, *, allow_none: bool = False) -> float | None:
    return check_seconds(name, value, allow_none=allow_none)


class GracefulServer:
    """A TCP server whose shutdown loses nothing; see :func:`start_server`, :func:`create_server`.

    * ``async with server:`` shuts it down on exit.
    * :meth:`serve_forever` serves until SIGTERM or SIGINT, which start
      :meth:`shutdown`; it returns once the shutdown is done.
    * :meth:`shutdown` runs the asymmetric shutdown (see the module's notes)
      and returns a :class:`ShutdownReport`. Idempotent: concurrent and later
      callers share the one shutdown.
    * :attr:`connections` is the live count; :attr:`sockets` the listening
      sockets; :attr:`notice` is set when the shutdown begins, for handlers
      that prefer to await it (and for a readiness probe).
    * :attr:`stats` counts since start (:class:`ServerStats`);
      :attr:`handed_off` is True once a successor took the listening sockets
      (``handoff=``), which also starts the shutdown.
    """

    def __init__(
        self,
        *,
        handler: StreamHandler | None,
        protocol_factory: Callable[[], GracefulProtocol] | None,
        grace: float,
        force_timeout: float,
        linger: LingerOptions,
        max_connections: int | None,
        on_reject: RejectHook | None,
        on_notice: NoticeHook | None,
        idle_timeout: float | None,
        create_kwargs: dict[str, Any],
        drain_delay: float = 0.0,
        handoff: str | None = None,
        unix: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._handler: StreamHandler = handler if handler is not None else _no_handler
        self._protocol_factory = protocol_factory
        self._grace = grace
        self._force_timeout = force_timeout
        self._linger_options = linger
        self._max_connections = max_connections
        self._on_reject = on_reject
        self._on_notice = on_notice
        self._idle_timeout = idle_timeout
        self._create_kwargs = create_kwargs
        self._drain_delay = drain_delay
        self._handoff = handoff
        self._unix = unix
        self._servers: list[asyncio.Server] = []
        self._offer: HandoffOffer | None = None
        self._taken: Taken | None = None
        self._owns_listeners = False
        self._handed_off = asyncio.Event()
        # Lifetime counters (stats): plain ints, nothing kept per connection.
        self._outcome_counts: dict[CloseOutcome, int] = dict.fromkeys(CloseOutcome, 0)
        self._closed_total = 0
        self._discarded_total = 0
        self._unacked_total = 0
        self._unacked_unknown = 0
        self._conns: dict[Linger, _Connection] = {}
        self._rejected_live: set[Linger] = set()
        self._rejected_total = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self._notice = _Notice()
        self._shutdown_task: asyncio.Task[ShutdownReport] | None = None
        self._report_conns: set[Linger] | None = None
        self._grace_over = False
        self._drained = 0
        # Set once the listeners close and the accept queue is drained: from
        # then on no connection is rejected (the kernel accepted them all
        # before the shutdown reached them). During drain_delay the limit holds.
        self._draining = False

    # -- construction --------------------------------------------------------

    def _make_protocol(self) -> asyncio.BaseProtocol:
        # The limit is checked in connection_made (see _connections), where a
        # burst of accepts is counted one by one and a failed TLS handshake
        # never took a slot. Connections drained during the shutdown are
        # never rejected: they were accepted by the kernel before it began.
        factory = self._protocol_factory
        if factory is None:
            reader = asyncio.StreamReader(limit=self._create_kwargs.get("limit", 2**16))
            return _StreamConnection(self, reader)
        if self._max_connections is not None and not self._draining:
            return _ProtocolGate(self)
        return self._new_protocol()

    def _new_protocol(self) -> GracefulProtocol:
        factory = self._protocol_factory
        assert factory is not None
        proto = factory()
        if not isinstance(proto, GracefulProtocol):
            raise TypeError(
                f"protocol_factory must return a GracefulProtocol, got {type(proto).__name__}"
            )
        proto._linger_options = self._linger_options
        proto._graceful_attach = self._attach_protocol
        return proto

    def _over_limit(self) -> bool:
        """True when a connection attaching now would exceed ``max_connections``."""
        limit = self._max_connections
        return limit is not None and len(self._conns) >= limit and not self._draining

    async def _start(self, host: Any, port: Any, backlog: int, reuse_port: bool | None) -> None:
        kwargs = {k: v for k, v in self._create_kwargs.items() if k != "limit"}
        loop = self._loop
        if self._handoff is not None:
            if self._unix and _takes_cleanup_socket(loop):
                # Python 3.13+ unlinks a Unix server's path when it closes;
                # after a handoff that path is the successor's.
                kwargs.setdefault("cleanup_socket", False)
            self._taken = await asyncio.to_thread(take_listeners, self._handoff, HANDOFF_TIMEOUT)
        taken = self._taken
        # Only a listener bound here, by this server, is known to be shared
        # with nobody (close_and_drain's refuse_handshakes): not one passed
        # in (sock=: a supervisor's, a pre-fork parent's), taken from a
        # predecessor, or offered to a successor.
        self._owns_listeners = taken is None and "sock" not in kwargs and self._handoff is None
        try:
            if taken is not None:
                _check_taken(taken, host, port, self._unix)
                kwargs.pop("sock", None)
                for sock in taken.sockets:
                    if self._unix:
                        server = await loop.create_unix_server(
                            self._make_protocol, sock=sock, backlog=backlog, **kwargs
                        )
                    else:
                        server = await loop.create_server(
                            self._make_protocol, sock=sock, backlog=backlog, **kwargs
                        )
                    self._servers.append(server)
            elif self._unix:
                self._servers.append(
                    await loop.create_unix_server(
                        self._make_protocol, host, backlog=backlog, **kwargs
                    )
                )
            else:
                self._servers.append(
                    await loop.create_server(
                        self._make_protocol,
                        host,
                        port,
                        backlog=backlog,
                        reuse_port=reuse_port,
                        **kwargs,
                    )
                )
            if self._handoff is not None:
                self._offer = HandoffOffer(loop, self._handoff, self._listening, self._on_taken)
                self._offer.publish()
        except BaseException:
            for server in self._servers:
                server.close()
            if taken is not None:
                taken.abandon()  # the predecessor serves on
            raise
        if taken is not None and self.is_serving():
            self._ack_predecessor()

    def _listening(self) -> list[Any]:
        return [] if self._notice.is_set() and not self.is_serving() else list(self.sockets)

    def _ack_predecessor(self) -> None:
        taken = self._taken
        if taken is None:
            return
        self._taken = None
        if not taken.ack():
            logger.warning("handoff: predecessor pid %s had gone before the ack", taken.pid)
        else:
            logger.info("handoff: took the listening sockets of pid %s", taken.pid)

    def _on_taken(self) -> None:
        """A successor has the listening sockets and serves: stop accepting, shut down."""
        self._handed_off.set()
        self._begin_shutdown(None)

    # -- registry --------------------------------------------------------------

    def _attach_protocol(self, protocol: GracefulProtocol) -> None:
        self._attach(_ProtocolConnection(protocol))

    def _attach(self, conn: _Connection) -> None:
        graceful = conn._graceful
        assert graceful is not None
        self._conns[graceful] = conn
        graceful.on_lost = self._detach
        if self._idle_timeout is not None:
            graceful.watch_idle(self._idle_timeout, conn._idle)
        if self._notice.is_set():
            # Accepted while shutting down (drained from the queue, or in
            # flight when the listener closed): it joins the shutdown.
            if self._report_conns is not None:
                self._report_conns.add(graceful)
            self._loop.call_soon(conn._notify)
            if self._grace_over:
                # Too late for grace (a TLS handshake that ended after it,
                # say): the notice, then the force linger, so it is bounded.
                self._loop.call_soon(conn._force, self._force_timeout)

    def _detach(self, graceful: Linger) -> None:
        self._conns.pop(graceful, None)
        self._count(graceful)

    def _rejected_lost(self, graceful: Linger) -> None:
        self._rejected_live.discard(graceful)
        self._count(graceful)

    def _count(self, graceful: Linger) -> None:
        result = graceful.result
        if result is None:
            return
        self._closed_total += 1
        self._outcome_counts[result.outcome] += 1
        self._discarded_total += result.discarded
        unacked = result.unacked
        if unacked is None:
            self._unacked_unknown += 1
        else:
            self._unacked_total += unacked

    def _track(self, fut: asyncio.Future[Any]) -> None:
        self._tasks.add(fut)
        fut.add_done_callback(self._tasks.discard)

    # -- public ------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """How many connections are open now (rejected ones not counted)."""
        return len(self._conns)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets, as ``asyncio.Server.sockets`` gives them."""
        return tuple(sock for server in self._servers for sock in server.sockets)

    @property
    def stats(self) -> ServerStats:
        """Counts since the server started (a snapshot): see :class:`ServerStats`."""
        return ServerStats(
            active=len(self._conns),
            closed=self._closed_total,
            outcomes=dict(self._outcome_counts),
            rejected=self._rejected_total,
            drained=self._drained,
            discarded=self._discarded_total,
            unacked=self._unacked_total,
            unacked_unknown=self._unacked_unknown,
        )

    @property
    def handed_off(self) -> bool:
        """True once a successor took the listening sockets (``handoff=``)."""
        return self._handed_off.is_set()

    @property
    def notice(self) -> _Notice:
        """Set when the shutdown begins: ``notice.is_set()``, ``await notice.wait()``."""
        return self._notice

    def is_serving(self) -> bool:
        """True while the server accepts connections."""
        return any(server.is_serving() for server in self._servers)

    async def start_serving(self) -> None:
        """Start accepting connections (for a server made with ``start_serving=False``).

        A server that took its sockets from a predecessor (``handoff=``)
        tells it here that it serves; the predecessor then stops accepting.
        """
        if not self._servers or self._notice.is_set():
            raise RuntimeError("the server is shut down")
        for server in self._servers:
            await server.start_serving()
        self._ack_predecessor()

    async def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT starts :meth:`shutdown`; return once it is done.

        Signal handlers are installed only where the loop allows (the main
        thread, on Unix); elsewhere this serves until :meth:`shutdown` is
        called by other means.
        """
        await self.start_serving()
        installed: list[signal.Signals] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            installed.append(signum)
        try:
            await self._notice.wait()
            assert self._shutdown_task is not None
            await asyncio.shield(self._shutdown_task)
        finally:
            for signum in installed:
                self._loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        logger.info("signal %s: shutting down", signal.Signals(signum).name)
        self._begin_shutdown(None)

    async def shutdown(self, grace: float | None = None) -> ShutdownReport:
        """Shut down: stop accepting, drain the queue, notify, wait ``grace``, force.

        ``grace`` defaults to the server's. Idempotent: concurrent and later
        callers share one shutdown (and its report); their ``grace`` is
        ignored. Cancelling the wait does not stop the shutdown.
        """
        if grace is not None:
            _check_seconds("grace", grace)
        return await asyncio.shield(self._begin_shutdown(grace))

    def accept_queue(self) -> AcceptQueueStats | None:
        """The accept queue's depth, capacity and overflow count; None where unknown.

        Linux only (TCP_INFO on the listening sockets, ``ListenOverflows``);
        see :func:`aiograceful._listeners.accept_queue_stats`.
        """
        return accept_queue_stats(self.sockets)

    async def __aenter__(self) -> GracefulServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        state = "shutting down" if self._notice.is_set() else "serving"
        if self.handed_off:
            state = "handed off"
        if self._shutdown_task is not None and self._shutdown_task.done():
            state = "shut down"
        names = [s.getsockname() for s in self.sockets]
        return f"<GracefulServer {state} sockets={names} connections={self.connections}>"

    # -- the shutdown ------------------------------------------------------------

    def _begin_shutdown(self, grace: float | None) -> asyncio.Task[ShutdownReport]:
        task = self._shutdown_task
        if task is None:
            task = self._shutdown_task = self._loop.create_task(
                self._shutdown(self._grace if grace is None else grace)
            )
        return task

    async def _shutdown(self, grace: float) -> ShutdownReport:
        loop = self._loop
        started = loop.time()
        report_conns = self._report_conns = set(self._conns)
        self._notice._set()
        await self._drain_delay_phase(report_conns)
        grace_started = loop.time()
        # 2. The notice, once per connection: the open ones now (the drain
        # below takes a few milliseconds), those the drain takes from the
        # queue as they attach.
        self._notify_all(report_conns)
        await self._stop_accepting()
        self._notify_all(report_conns)  # any that attached meanwhile
        # 3. Grace (it starts after drain_delay). Connections drained from
        # the queue attach a little later.
        grace_end = grace_started + grace
        adopting = [t for t in self._tasks if not t.done()]
        if adopting:
            await asyncio.wait(adopting, timeout=max(0.0, grace_end - loop.time()))
        await self._wait_closed(lambda: report_conns, grace_end)
        self._grace_over = True
        forced = [g for g in report_conns if g.result is None]
        closed_clean = sum(
            1
            for g in report_conns
            if g.result is not None and g.result.outcome is CloseOutcome.CLEAN
        )
        closed_in_grace = len(report_conns) - len(forced)
        # (A connection that attaches after this, an in-flight TLS handshake,
        # say, counts as forced.)
        # 4. Close the rest with a short linger (the rejected ones too).
        leftovers = [self._conns.get(g) for g in forced]
        for conn in leftovers:
            if conn is not None:
                conn._force(self._force_timeout)
        for graceful in list(self._rejected_live):
            graceful.shorten(self._force_timeout)

        def everyone() -> set[Linger]:
            return report_conns | set(self._conns) | self._rejected_live

        await self._wait_closed(everyone, loop.time() + self._force_timeout + 0.1)
        # 5. Let go of what is left, and wait (briefly) for connection_lost.
        for graceful in everyone():
            if graceful.result is None:
                graceful.let_go()
        await self._wait_closed(everyone, loop.time() + _LOST_WAIT)
        await self._finish_tasks()
        outcomes: collections.Counter[CloseOutcome] = collections.Counter()
        for graceful in report_conns:
            if graceful.result is not None:
                outcomes[graceful.result.outcome] += 1
        self._report_conns = set()  # late arrivals still join; drop the references
        return ShutdownReport(
            connections=len(report_conns),
            closed_clean=closed_clean,
            forced=len(report_conns) - closed_in_grace,
            duration=loop.time() - started,
            outcomes=dict(outcomes),
            drained=self._drained,
            rejected=self._rejected_total,
        )

    def _notify_all(self, report_conns: set[Linger]) -> None:
        for graceful in list(report_conns):
            conn = self._conns.get(graceful)
            if conn is not None:
                conn._notify()

    async def _drain_delay_phase(self, report_conns: set[Linger]) -> None:
        """``drain_delay``: the notice is out, and the server keeps accepting for a while.

        Every open connection is told now, and each new one as it attaches,
        so that load balancers see the notice (a failing readiness probe,
        ``Connection: close``) and stop sending before the listener closes.
        A handoff ends the phase at once: the successor accepts.
        """
        delay = self._drain_delay
        if delay <= 0 or self._handed_off.is_set() or not self.is_serving():
            return
        for graceful in list(report_conns):
            conn = self._conns.get(graceful)
            if conn is not None:
                conn._notify()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._handed_off.wait(), delay)

    async def _stop_accepting(self) -> None:
        """Close the listeners without resetting the queue; serve what it held.

        After a handoff the queue is the successor's: the listeners are
        closed here without draining it (the kernel socket lives on there).
        """
        self._draining = True
        offer = self._offer
        if offer is not None:
            await offer.settle()  # a successor taking the sockets now: its ack, or its failure
            offer.close()
        for server in self._servers:
            if self._handed_off.is_set():
                await close_listeners(self._loop, server)
                continue
            queued = await close_and_drain(
                self._loop, server, refuse_handshakes=self._owns_listeners
            )
            for sock in queued:
                self._drained += 1
                self._track(asyncio.ensure_future(self._adopt(sock)))

    async def _adopt(self, sock: socket.socket) -> None:
        """Serve a connection taken from the accept queue during the shutdown."""
        ssl = self._create_kwargs.get("ssl")
        try:
            await self._loop.connect_accepted_socket(self._make_protocol, sock, ssl=ssl)
        except Exception:
            logger.exception("could not serve a connection drained from the accept queue")
            sock.close()

    async def _wait_closed(self, lingers: Callable[[], Iterable[Linger]], deadline: float) -> None:
        """Wait until every Linger ``lingers()`` names has its result, or ``deadline``."""
        for _ in range(1000):  # each pass waits; the bound is the deadline
            pending = [g.future() for g in lingers() if g.result is None]
            timeout = deadline - self._loop.time()
            if not pending or timeout <= 0:
                return
            await asyncio.wait(pending, timeout=timeout)

    async def _finish_tasks(self) -> None:
        """Wait (bounded) for the server's tasks, handlers included; cancel what is left.

        A handler may go on after its connection ended (the peer closed, the
        handler still works): it is one of the server's tasks all the same,
        and none may be left pending when the shutdown returns.
        """
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=_LOST_WAIT)
        left = [t for t in tasks if not t.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=_LOST_WAIT)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _LOST_WAIT)


async def _no_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    raise AssertionError("unreachable: a protocol server has no stream handler")


async def _serve(
    handler: StreamHandler | None,
    protocol_factory: Callable[[], GracefulProtocol] | None,
    host: Any,
    port: Any,
    *,
    grace: object,
    force_timeout: object,
    linger_timeout: object,
    linger_idle_timeout: object,
    max_discard: object,
    reset_on_failure: object,
    send_timeout: object,
    max_connections: object,
    on_reject: Any,
    on_notice: Any,
    idle_timeout: object,
    backlog: object,
    reuse_port: bool | None,
    create_kwargs: dict[str, Any],
    drain_delay: object = 0.0,
    handoff: object = None,
    unix: bool = False,
) -> GracefulServer:
    """Validate the options of start_server/create_server, then make and start the server."""
    grace_s = _check_seconds("grace", grace)
    force_s = _check_seconds("force_timeout", force_timeout)
    drain_s = _check_seconds("drain_delay", drain_delay)
    assert grace_s is not None
    assert force_s is not None
    assert drain_s is not None
    handoff_path = check_handoff(handoff)
    try:
        linger = LingerOptions(
            timeout=linger_timeout,  # type: ignore[arg-type]
            idle_timeout=linger_idle_timeout,  # type: ignore[arg-type]
            max_discard=max_discard,  # type: ignore[arg-type]
            reset_on_failure=reset_on_failure,  # type: ignore[arg-type]
            send_timeout=send_timeout,  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as exc:
        # Name the server's argument, not the LingerOptions field.
        message = str(exc)
        for field in ("idle_timeout", "timeout"):
            if message.startswith(field):
                message = "linger_" + message
                break
        raise type(exc)(message) from None
    if max_connections is not None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError(
                f"max_connections must be an int or None, got {type(max_connections).__name__}"
            )
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    for name, hook in (("on_reject", on_reject), ("on_notice", on_notice)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{name} must be callable or None, got {type(hook).__name__}")
    idle_s = _check_seconds("idle_timeout", idle_timeout, allow_none=True)
    if idle_s == 0:
        raise ValueError("idle_timeout must be > 0 or None")
    if backlog is None:
        backlog_n = default_backlog()
    elif isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"backlog must be an int or None, got {type(backlog).__name__}")
    elif backlog < 0:
        raise ValueError(f"backlog must be >= 0, got {backlog}")
    else:
        backlog_n = backlog
    server = GracefulServer(
        handler=handler,
        protocol_factory=protocol_factory,
        grace=grace_s,
        force_timeout=force_s,
        linger=linger,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=on_notice,
        idle_timeout=idle_s,
        create_kwargs=create_kwargs,
        drain_delay=drain_s,
        handoff=handoff_path,
        unix=unix,
    )
    await server._start(host, port, backlog_n, reuse_port)
    return server


def _takes_cleanup_socket(loop: asyncio.AbstractEventLoop) -> bool:
    """True where ``create_unix_server`` has ``cleanup_socket`` (asyncio on Python 3.13+)."""
    try:
        return "cleanup_socket" in inspect.signature(loop.create_unix_server).parameters
    except (TypeError, ValueError):  # no signature to read (a compiled loop)
        return False


def _check_taken(taken: Taken, host: Any, port: Any, unix: bool) -> None:
    """The sockets a predecessor passed must be the ones this server was asked to serve."""
    if unix:
        if host is not None and os.fspath(host) not in taken.addresses:
            raise ValueError(
                f"handoff: the predecessor listens on {taken.addresses}, not on {host!r}"
            )
        return
    if port:
        ports = {a[1] for a in taken.addresses if isinstance(a, list) and len(a) >= 2}
        if ports != {int(port)}:
            raise ValueError(
                f"handoff: the predecessor listens on {taken.addresses}, not on port {port}"
            )


async def start_server(
    client_connected_cb: StreamHandler,
    host: str | Iterable[str] | None = None,
    port: int | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    linger_timeout: float = DEFAULT_TIMEOUT,
    linger_idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_discard: int | None = DEFAULT_MAX_DISCARD,
    reset_on_failure: bool = False,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    on_notice: NoticeHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    reuse_port: bool | None = None,
    drain_delay: float = 0.0,
    handoff: str | os.PathLike[str] | None = None,
    limit: int = 2**16,
    **kwargs: Any,
) -> GracefulServer:
    """Start a streams server, like ``asyncio.start_server``, that closes without losing data.

    ``client_connected_cb(reader, writer)`` is a coroutine function; when it
    returns (or raises: the exception is logged on the ``aiograceful``
    logger), its writer is closed with :func:`graceful_close`.

    Options (defaults beside nginx's; see the README for the full table):

    * ``grace``: seconds connections get after the shutdown notice (10 s).
    * ``force_timeout``: linger bound for those still open after ``grace`` (1 s).
    * ``send_timeout``, ``linger_timeout``, ``linger_idle_timeout``,
      ``max_discard``, ``reset_on_failure``: the linger options of every
      graceful close the server does (60 s, 30 s, 5 s, 64 MiB, False; nginx:
      send_timeout 60 s, lingering_time 30 s, lingering_timeout 5 s). A close
      waits ``send_timeout`` at most for each byte of ours to be acknowledged,
      and the other bounds start once all are: a slow download is never cut.
    * ``max_connections``: over it, a connection is rejected: ``on_reject(transport)``
      writes the rejection (a 503, say), then a lingering close reads the
      request away, so the client reads the rejection. Default: no limit.
    * ``on_notice(writer)``: the shutdown notice in protocol terms; may return
      an awaitable. Called once per connection, only while its write side is
      open. Handlers may instead await ``server.notice.wait()``.
    * ``idle_timeout``: seconds without traffic before a graceful close: no
      byte read from the peer or acknowledged by it, nothing buffered either
      way, and the handler waiting on a read (default: None, no idle close;
      nginx keepalive_timeout 75 s). A slow download, or a handler pushing
      events while a read is pending, is not idle.
    * ``backlog``: listen backlog (2048, bounded by ``somaxconn``).
    * ``drain_delay``: on SIGTERM or :meth:`~GracefulServer.shutdown`, first
      set the notice and keep accepting for this long (new connections are
      told at once), so that load balancers stop sending; then the shutdown
      (default 0).
    * ``handoff``: a Unix socket path. On start, take the listening sockets
      of a predecessor offering them there instead of binding; then offer
      this server's at the path. When a successor takes them, this server
      stops accepting (the queue is the successor's now) and shuts down
      gracefully. A restart: start the new process with the same path.
    * ``reuse_port``, ``limit`` and any other ``loop.create_server`` keyword
      (``ssl``, ``sock``, ``start_serving``, ``family``...) pass through.

    Bad arguments raise ``TypeError``/``ValueError`` naming the argument.
    """
    if not callable(client_connected_cb):
        raise TypeError(
            "client_connected_cb must be a coroutine function, "
            f"got {type(client_connected_cb).__name__}"
        )
    return await _serve(
        client_connected_cb,
        None,
        host,
        port,
        grace=grace,
        force_timeout=force_timeout,
        linger_timeout=linger_timeout,
        linger_idle_timeout=linger_idle_timeout,
        max_discard=max_discard,
        reset_on_failure=reset_on_failure,
        send_timeout=send_timeout,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=on_notice,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=reuse_port,
        create_kwargs={**kwargs, "limit": limit},
        drain_delay=drain_delay,
        handoff=handoff,
    )


async def create_server(
    protocol_factory: Callable[[], GracefulProtocol],
    host: str | Iterable[str] | None = None,
    port: int | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    linger_timeout: float = DEFAULT_TIMEOUT,
    linger_idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_discard: int | None = DEFAULT_MAX_DISCARD,
    reset_on_failure: bool = False,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    reuse_port: bool | None = None,
    drain_delay: float = 0.0,
    handoff: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> GracefulServer:
    """Start a protocol server, like ``loop.create_server``, that closes without losing data.

    ``protocol_factory()`` must return a :class:`GracefulProtocol`; its
    ``on_shutdown_notice()`` is the shutdown notice and its
    ``on_idle_timeout()`` the idle close. The options are those of
    :func:`start_server` (but ``on_notice``, which the protocol's hook
    replaces). Idle detection for protocols reads TCP_INFO's
    ``tcpi_last_data_recv``/``tcpi_last_data_sent`` (Linux TCP), so the
    user's ``data_received`` is never wrapped. Where it is missing (Unix
    sockets, other systems) nothing tells when data last moved: the hook is
    called every ``idle_timeout`` only if the protocol overrides
    ``on_idle_timeout`` (and keeps its own account); the default never
    closes a connection it cannot see.
    """
    if not callable(protocol_factory):
        raise TypeError(f"protocol_factory must be callable, got {type(protocol_factory).__name__}")
    return await _serve(
        None,
        protocol_factory,
        host,
        port,
        grace=grace,
        force_timeout=force_timeout,
        linger_timeout=linger_timeout,
        linger_idle_timeout=linger_idle_timeout,
        max_discard=max_discard,
        reset_on_failure=reset_on_failure,
        send_timeout=send_timeout,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=None,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=reuse_port,
        create_kwargs=dict(kwargs),
        drain_delay=drain_delay,
        handoff=handoff,
    )


async def start_unix_server(
    client_connected_cb: StreamHandler,
    path: str | os.PathLike[str] | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    linger_timeout: float = DEFAULT_TIMEOUT,
    linger_idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_discard: int | None = DEFAULT_MAX_DISCARD,
    reset_on_failure: bool = False,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    on_notice: NoticeHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    drain_delay: float = 0.0,
    handoff: str | os.PathLike[str] | None = None,
    limit: int = 2**16,
    **kwargs: Any,
) -> GracefulServer:
    """:func:`start_server` on a Unix stream socket at ``path``, like ``asyncio.start_unix_server``.

    The whole graceful behaviour holds there: on Linux, closing a Unix stream
    socket with unread data makes the peer's ``send()`` fail (``EPIPE``) and
    its ``recv()`` fail with ``ECONNRESET`` once what was queued is read, as
    a TCP reset does, so the lingering close is needed all the same. The
    options are :func:`start_server`'s (``reuse_port`` aside); ``handoff=``
    passes the Unix listening socket to a successor; other keywords go to
    ``loop.create_unix_server`` (``sock``, ``ssl``, ``start_serving``...).
    """
    if not callable(client_connected_cb):
        raise TypeError(
            "client_connected_cb must be a coroutine function, "
            f"got {type(client_connected_cb).__name__}"
        )
    if "reuse_port" in kwargs:
        raise TypeError("reuse_port is not an option of a Unix server")
    return await _serve(
        client_connected_cb,
        None,
        path,
        None,
        grace=grace,
        force_timeout=force_timeout,
        linger_timeout=linger_timeout,
        linger_idle_timeout=linger_idle_timeout,
        max_discard=max_discard,
        reset_on_failure=reset_on_failure,
        send_timeout=send_timeout,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=on_notice,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=None,
        create_kwargs={**kwargs, "limit": limit},
        drain_delay=drain_delay,
        handoff=handoff,
        unix=True,
    )


async def create_unix_server(
    protocol_factory: Callable[[], GracefulProtocol],
    path: str | os.PathLike[str] | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    linger_timeout: float = DEFAULT_TIMEOUT,
    linger_idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_discard: int | None = DEFAULT_MAX_DISCARD,
    reset_on_failure: bool = False,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    drain_delay: float = 0.0,
    handoff: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> GracefulServer:
    """:func:`create_server` on a Unix stream socket at ``path``, like ``loop.create_unix_server``.

    See :func:`start_unix_server`; the options are :func:`create_server`'s.
    """
    if not callable(protocol_factory):
        raise TypeError(f"protocol_factory must be callable, got {type(protocol_factory).__name__}")
    if "reuse_port" in kwargs:
        raise TypeError("reuse_port is not an option of a Unix server")
    return await _serve(
        None,
        protocol_factory,
        path,
        None,
        grace=grace,
        force_timeout=force_timeout,
        linger_timeout=linger_timeout,
        linger_idle_timeout=linger_idle_timeout,
        max_discard=max_discard,
        reset_on_failure=reset_on_failure,
        send_timeout=send_timeout,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=None,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=None,
        create_kwargs=dict(kwargs),
        drain_delay=drain_delay,
        handoff=handoff,
        unix=True,
    )
