"""GracefulServer: the listeners, the handoff, the signals; the shared shutdown drives it.

The shutdown order itself is :func:`aiograceful._shutdown.run_shutdown`
(written once, driven by this server and by every drop-in); how each
connection ends is :class:`aiograceful._ending.Ending`. This module adapts
the server to them: :class:`_Target` is its
:class:`~aiograceful._shutdown.Shutdownable`, the listeners here and the
connections in its :class:`~aiograceful._registry.Registry`.

Stopping the listeners never resets their accept queue: closing a listening
socket resets every connection that finished its handshake but was never
``accept()``-ed, so the queue is drained first and each connection served
(:func:`aiograceful._accept.close_and_drain`). After a handoff the queue is
the successor's: the listeners are closed without draining it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
from collections.abc import Callable, Iterable
from typing import Any, Final

from ._accept import AcceptQueueStats, accept_queue_stats, close_and_drain, close_listeners
from ._connections import ProtocolGate, Settings, StreamConnection
from ._handoff import HANDOFF_TIMEOUT, HandoffOffer, Taken, take_listeners
from ._options import CloseOutcome, check_seconds, logger
from ._protocol import GracefulProtocol
from ._registry import Registry
from ._shutdown import LOST_WAIT, ShutdownNotice, ShutdownPhase, run_shutdown
from ._stats import ServerStats, ShutdownReport

__all__ = [
    "DEFAULT_FORCE_TIMEOUT",
    "DEFAULT_GRACE",
    "GracefulServer",
    "open_server",
]

#: Seconds connections get, after the notice, to close themselves.
DEFAULT_GRACE: Final = 10.0
#: Linger bound for connections still open when the grace period ends.
DEFAULT_FORCE_TIMEOUT: Final = 1.0


class GracefulServer:
    """A TCP server whose shutdown loses nothing; see :func:`start_server`, :func:`create_server`.

    * ``async with server:`` shuts it down on exit.
    * :meth:`serve_forever` serves until SIGTERM or SIGINT, which start
      :meth:`shutdown`; it returns once the shutdown is done
      (:attr:`report` then holds its :class:`ShutdownReport`).
    * :meth:`shutdown` runs the asymmetric shutdown and returns a
      :class:`ShutdownReport`. Idempotent: concurrent and later callers
      share the one shutdown.
    * :attr:`connections` is the live count; :attr:`sockets` the listening
      sockets; :attr:`notice` (a :class:`ShutdownNotice`) is set when the
      shutdown begins, for handlers that prefer to await it and for a
      readiness probe.
    * :attr:`stats` counts since start (:class:`ServerStats`), with the
      shutdown's phase; :attr:`handed_off` is True once a successor took the
      listening sockets (``handoff=``), which also starts the shutdown.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        protocol_factory: Callable[[], GracefulProtocol] | None,
        grace: float,
        force_timeout: float,
        max_connections: int | None,
        create_kwargs: dict[str, Any],
        drain_delay: float = 0.0,
        handoff: str | None = None,
        unix: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._settings = settings
        self._streams = protocol_factory is None
        self._grace = grace
        self._force_timeout = force_timeout
        self._create_kwargs = create_kwargs
        self._drain_delay = drain_delay
        self._handoff = handoff
        self._unix = unix
        self._notice = ShutdownNotice()
        self._registry = Registry(
            self._loop,
            settings,
            self._notice,
            max_connections=max_connections,
            protocol_factory=protocol_factory,
        )
        self._servers: list[asyncio.Server] = []
        self._offer: HandoffOffer | None = None
        self._taken: Taken | None = None
        self._owns_listeners = False
        self._handed_off = asyncio.Event()
        self._phase = ShutdownPhase.SERVING
        self._shutdown_task: asyncio.Task[ShutdownReport] | None = None
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._clean_in_grace = 0
        self._forced = 0

    # -- construction --------------------------------------------------------

    def _make_protocol(self) -> asyncio.BaseProtocol:
        # The limit is checked in connection_made (see _connections), where a
        # burst of accepts is counted one by one and a failed TLS handshake
        # never took a slot. Connections drained during the shutdown are
        # never rejected: they were accepted by the kernel before it began.
        registry = self._registry
        if self._streams:
            loop = self._loop
            reader = asyncio.StreamReader(limit=self._settings.stream_limit, loop=loop)
            return StreamConnection(registry, reader, loop)
        if registry.max_connections is not None and not registry.draining:
            return ProtocolGate(registry)
        return registry.new_protocol()

    async def _start(self, host: Any, port: Any, backlog: int, reuse_port: bool | None) -> None:
        kwargs = dict(self._create_kwargs)
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
                    self._servers.append(await self._listen(sock=sock, backlog=backlog, **kwargs))
            elif self._unix:
                self._servers.append(await self._listen(host, backlog=backlog, **kwargs))
            else:
                self._servers.append(
                    await self._listen(host, port, backlog=backlog, reuse_port=reuse_port, **kwargs)
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

    async def _listen(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        if self._unix:
            return await self._loop.create_unix_server(self._make_protocol, *args, **kwargs)
        return await self._loop.create_server(self._make_protocol, *args, **kwargs)

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

    # -- public ------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """How many connections are open now (rejected ones not counted)."""
        return len(self._registry.conns)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets, as ``asyncio.Server.sockets`` gives them."""
        return tuple(sock for server in self._servers for sock in server.sockets)

    @property
    def stats(self) -> ServerStats:
        """Counts since the server started (a snapshot): see :class:`ServerStats`."""
        return self._registry.counters.snapshot(
            self.connections, self._phase, (self._started_at, self._finished_at, self._loop.time())
        )

    @property
    def phase(self) -> ShutdownPhase:
        """Where the shutdown stands (:class:`ShutdownPhase`; ``SERVING`` before one)."""
        return self._phase

    @property
    def handed_off(self) -> bool:
        """True once a successor took the listening sockets (``handoff=``)."""
        return self._handed_off.is_set()

    @property
    def notice(self) -> ShutdownNotice:
        """Set when the shutdown begins: ``notice.is_set()``, ``await notice.wait()``."""
        return self._notice

    @property
    def report(self) -> ShutdownReport | None:
        """The :class:`ShutdownReport` of the shutdown once it is done (after ``serve_forever``)."""
        task = self._shutdown_task
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

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
        called by other means. :attr:`report` then holds the shutdown's report.
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
        """Shut down: notice, ``drain_delay``, stop accepting and drain the queue, grace, force.

        ``grace`` defaults to the server's. Idempotent: concurrent and later
        callers share one shutdown (and its report); their ``grace`` is
        ignored. Cancelling the wait does not stop the shutdown.
        """
        if grace is not None:
            check_seconds("grace", grace, allow_none=False)
        return await asyncio.shield(self._begin_shutdown(grace))

    def accept_queue(self) -> AcceptQueueStats | None:
        """The accept queue's depth, capacity and overflow count; None where unknown.

        Linux only (TCP_INFO on the listening sockets, ``ListenOverflows``);
        see :func:`aiograceful._accept.accept_queue_stats`.
        """
        return accept_queue_stats(self.sockets)

    async def __aenter__(self) -> GracefulServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        state = self._phase.value
        if self.handed_off:
            state += " (handed off)"
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
        self._started_at = started = loop.time()
        registry = self._registry
        registry.begin_report()
        self._notice.set()
        await run_shutdown(
            _Target(self),
            grace=grace,
            force_timeout=self._force_timeout,
            drain_delay=self._drain_delay,
            on_phase=self._on_phase,
        )
        self._finished_at = loop.time()
        report = registry.report or set()
        registry.report = set()  # late arrivals still join; drop the references
        if self._phase is not ShutdownPhase.DONE:  # pragma: no cover - run_shutdown ends in DONE
            self._phase = ShutdownPhase.DONE
        return ShutdownReport(
            connections=len(report),
            closed_clean=self._clean_in_grace,
            forced=self._forced,
            duration=self._finished_at - started,
            outcomes=_outcomes(report),
            drained=registry.counters.drained,
            rejected=registry.counters.rejected,
        )

    def _on_phase(self, phase: ShutdownPhase) -> None:
        self._phase = phase
        if phase is ShutdownPhase.FORCE:
            # The grace is over: what the report says of it is decided now.
            # (A connection that attaches after this, a TLS handshake that
            # ends late, say, counts as forced.)
            report = self._registry.report or set()
            self._clean_in_grace = sum(
                1 for g in report if g.result is not None and g.result.outcome is CloseOutcome.CLEAN
            )
            self._forced = sum(1 for g in report if g.result is None)

    async def _stop_accepting(self, deadline: float) -> list[asyncio.Future[Any]]:
        """Close the listeners without resetting the queue; serve what it held.

        After a handoff the queue is the successor's: the listeners are
        closed here without draining it (the kernel socket lives on there).
        A successor taking the sockets now gets until ``deadline`` (the
        grace's end) to acknowledge, while this server still accepts; one
        that holds them unacknowledged then is stopped from listening.
        Returns the adoptions of the queued connections (under way).
        """
        registry = self._registry
        registry.draining = True
        offer = self._offer
        stop = False
        if offer is not None:
            # A successor taking the sockets now: its ack, or its failure,
            # within the shutdown's budget.
            await offer.settle(max(0.0, deadline - self._loop.time()))
            offer.close()
            # Its queue would be nobody's: refuse instead (the handoff
            # module's "A successor that stalls" says why).
            stop = offer.unacknowledged and not self._handed_off.is_set()
        adopting: list[asyncio.Future[Any]] = []
        for server in self._servers:
            if self._handed_off.is_set():
                await close_listeners(self._loop, server)
                continue
            queued = await close_and_drain(
                self._loop, server, refuse_handshakes=self._owns_listeners or stop, stop=stop
            )
            for sock in queued:
                registry.counters.drained += 1
                fut = asyncio.ensure_future(self._adopt(sock))
                registry.track(fut)
                adopting.append(fut)
        return adopting

    async def _adopt(self, sock: socket.socket) -> None:
        """Serve a connection taken from the accept queue during the shutdown."""
        ssl = self._create_kwargs.get("ssl")
        try:
            await self._loop.connect_accepted_socket(self._make_protocol, sock, ssl=ssl)
        except Exception:
            logger.exception("could not serve a connection drained from the accept queue")
            sock.close()

    async def _close_servers(self) -> None:
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), LOST_WAIT)


class _Target:
    """The server as the shared shutdown sees it (:class:`~aiograceful._shutdown.Shutdownable`)."""

    __slots__ = ("_adopting", "_registry", "_server")

    def __init__(self, server: GracefulServer) -> None:
        self._server = server
        self._registry = server._registry
        self._adopting: list[asyncio.Future[Any]] = []

    def accepting(self) -> bool:
        return self._server.is_serving()

    def handed_off(self) -> asyncio.Event | None:
        return self._server._handed_off

    def tell(self) -> None:
        self._registry.tell()

    async def stop_accepting(self, deadline: float) -> None:
        self._adopting = await self._server._stop_accepting(deadline)

    def pending(self) -> list[asyncio.Future[Any]]:
        # The adoptions first: a connection drained from the queue attaches
        # a little later, and then its end is awaited too.
        return [f for f in self._adopting if not f.done()] + self._registry.pending()

    async def force(self, timeout: float) -> None:
        self._registry.force(timeout)

    def let_go(self) -> None:
        self._registry.let_go()

    async def finish(self) -> None:
        await self._registry.finish()
        await self._server._close_servers()


def _outcomes(report: Iterable[Any]) -> dict[CloseOutcome, int]:
    counts: dict[CloseOutcome, int] = {}
    for linger in report:
        result = linger.result
        if result is not None:
            counts[result.outcome] = counts.get(result.outcome, 0) + 1
    return counts


async def open_server(
    address: tuple[Any, Any, int, bool | None],
    **options: Any,
) -> GracefulServer:
    """Make a :class:`GracefulServer` with ``options`` and start it on ``address``.

    ``address`` is ``(host, port, backlog, reuse_port)``. The public
    constructors (``_api``) validate everything before this.
    """
    server = GracefulServer(**options)
    await server._start(*address)
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
