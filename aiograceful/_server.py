"""GracefulServer: asymmetric shutdown, grace then force, a drained accept queue.

Theory of operation
-------------------
TCP's own close is symmetric, and a symmetric shutdown loses requests: if the
server half-closes while a client's last request is in flight, the server can
no longer answer it. So the server's shutdown is asymmetric: it first *tells*
every peer in protocol terms (the notice: a GOAWAY, a ``Connection: close``, a
BYE line) and keeps both directions open; the client finishes and half-closes;
the server answers what it received before that FIN and closes. Peers that
ignore the notice are closed after ``grace`` with a short linger, then reset.

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
5. Abort (RST) whatever is still open; wait for ``connection_lost``.

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
import struct
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from ._linger import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_DISCARD,
    DEFAULT_TIMEOUT,
    CloseOutcome,
    Linger,
    LingerOptions,
    check_seconds,
    logger,
)
from ._protocol import GracefulProtocol
from ._streams import _take_unread, graceful_close

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_FORCE_TIMEOUT",
    "DEFAULT_GRACE",
    "AcceptQueueStats",
    "GracefulServer",
    "ShutdownReport",
    "create_server",
    "start_server",
]

#: Seconds connections get, after the notice, to close themselves.
DEFAULT_GRACE: Final = 10.0
#: Linger bound for connections still open when the grace period ends.
DEFAULT_FORCE_TIMEOUT: Final = 1.0
#: Listen backlog, bounded by the system's ``somaxconn``. asyncio's default of
#: 100 overflows under a burst, leaving clients with half-established
#: connections (the handshake completed, the accept never came).
DEFAULT_BACKLOG: Final = 2048

_SOMAXCONN_PATH: Final = "/proc/sys/net/core/somaxconn"
_NETSTAT_PATH: Final = "/proc/net/netstat"
# How many queued connections one drain pass takes at most (per listener).
_DRAIN_LIMIT: Final = 65536
# Bound on waiting for connection_lost after an abort (it is scheduled at once).
_LOST_WAIT: Final = 1.0


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
NoticeHook = Callable[[asyncio.StreamWriter], "Awaitable[None] | None"]
RejectHook = Callable[[asyncio.Transport], None]


class _Connection(Protocol):
    """What the server needs of a connection, whichever API it came from."""

    _graceful: Linger | None

    def _notify(self) -> None: ...
    def _force(self, timeout: float) -> None: ...
    def _idle(self) -> bool: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What a shutdown did.

    * ``connections``: open when the shutdown began, plus those drained from
      the accept queue (and any accepted while it ran).
    * ``closed_clean``: of those, closed within ``grace``.
    * ``forced``: still open when ``grace`` ran out (closed with a short
      linger, then aborted if need be).
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


def _default_backlog() -> int:
    try:
        with open(_SOMAXCONN_PATH) as f:
            somaxconn = int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_BACKLOG
    return max(1, min(DEFAULT_BACKLOG, somaxconn))


# Linux struct tcp_info: 8 one-byte fields, then u32s. On a listening socket
# tcpi_unacked is the accept queue's length and tcpi_sacked its capacity;
# on a connection tcpi_last_data_sent / tcpi_last_data_recv are milliseconds
# since data last moved each way.
_TCPI_U32_OFFSET: Final = 8
_TCPI_UNACKED: Final = 4
_TCPI_SACKED: Final = 5
_TCPI_LAST_DATA_SENT: Final = 9
_TCPI_LAST_DATA_RECV: Final = 11
_TCPI_SIZE: Final = _TCPI_U32_OFFSET + 4 * 12


def _tcp_info_u32(sock: Any, *indexes: int) -> tuple[int, ...] | None:
    """Read u32 fields of TCP_INFO (Linux only); None where unavailable."""
    if sys.platform != "linux" or sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_SIZE)
    except (OSError, ValueError, AttributeError):
        return None
    if len(raw) < _TCPI_SIZE:
        return None
    return tuple(struct.unpack_from("I", raw, _TCPI_U32_OFFSET + 4 * i)[0] for i in indexes)


def _listen_overflows() -> int | None:
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


class _ServerWriter(asyncio.StreamWriter):
    """The handler's writer: ``write_eof()`` goes through the connection's Linger, so the
    state machine knows the write side is closed (no notice is given after it)."""

    linger: Linger | None = None

    def write_eof(self) -> None:
        linger = self.linger
        if linger is not None and linger.machine.live and self.can_write_eof():
            linger.write_eof()
        else:
            super().write_eof()


class _StreamConnection(asyncio.StreamReaderProtocol):
    """The server's protocol for ``start_server``: asyncio's streams, plus a Linger record."""

    def __init__(self, server: GracefulServer, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._server = server
        self._conn_reader = reader
        self._conn_writer: asyncio.StreamWriter | None = None
        self._handler_task: asyncio.Task[None] | None = None
        self._graceful: Linger | None = None
        self._notified = False
        self._handler_returned = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        self._graceful = Linger(loop, tr, self)
        writer = self._conn_writer = _ServerWriter(tr, self, self._conn_reader, loop)
        writer.linger = self._graceful
        self._server._pending.discard(self)
        self._server._attach(self)
        self._handler_task = loop.create_task(self._run(self._conn_writer))

    def data_received(self, data: bytes) -> None:
        graceful = self._graceful
        if graceful is not None:
            graceful.last_read = graceful.loop.time()
        super().data_received(data)

    def eof_received(self) -> bool:
        graceful = self._graceful
        if graceful is not None and graceful.machine.live and not graceful.machine.peer_eof:
            graceful.peer_eof()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        graceful = self._graceful
        if graceful is not None:
            graceful.lost(exc)
        super().connection_lost(exc)
        # As StreamReaderProtocol drops its _stream_writer: the writer points back here.
        self._conn_writer = None

    async def _run(self, writer: asyncio.StreamWriter) -> None:
        server = self._server
        try:
            await server._handler(self._conn_reader, writer)
        except asyncio.CancelledError:
            # Forced by the shutdown, which has started the close already.
            raise
        except Exception:
            logger.exception("connection handler %r raised", server._handler)
        finally:
            self._handler_returned = True
            with contextlib.suppress(asyncio.CancelledError):
                await graceful_close(writer, **server._linger_kwargs())

    # -- what the server does to it -------------------------------------------

    def _write_side_open(self) -> bool:
        graceful = self._graceful
        return (
            graceful is not None
            and graceful.machine.live
            and not graceful.lingering
            and not graceful.machine.eof_written
            and not graceful.transport.is_closing()
        )

    def _notify(self) -> None:
        if self._notified:
            return
        self._notified = True
        hook = self._server._on_notice
        writer = self._conn_writer
        if hook is None or writer is None or not self._write_side_open():
            return
        try:
            result = hook(writer)
        except Exception:
            logger.exception("on_notice hook %r raised; closing the connection", hook)
            self._close_now(self._server._linger_options)
            return
        if inspect.isawaitable(result):
            self._server._track(asyncio.ensure_future(self._await_notice(result)))

    async def _await_notice(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except Exception:
            logger.exception("on_notice hook raised; closing the connection")
            self._close_now(self._server._linger_options)

    def _close_now(self, options: LingerOptions) -> None:
        graceful = self._graceful
        if graceful is None or graceful.lingering:
            return
        unread, peer_eof = _take_unread(self)
        graceful.begin(options, unread=unread, peer_eof=peer_eof)

    def _force(self, timeout: float) -> None:
        graceful = self._graceful
        if graceful is None:
            return
        if graceful.lingering:
            graceful.shorten(timeout)
        else:
            self._close_now(dataclasses.replace(self._server._linger_options, timeout=timeout))
        task = self._handler_task
        # Not once the handler has returned: its task then awaits the final
        # graceful_close, and cancelling that wait aborts (RST) at once,
        # skipping the force_timeout linger just set.
        if task is not None and not task.done() and not self._handler_returned:
            task.cancel()

    def _idle(self) -> bool:
        """The idle timer fired: close if the handler waits for a request; True if it did."""
        graceful = self._graceful
        if graceful is None or graceful.transport.get_write_buffer_size():
            return False  # our reply is still going out
        if not _waiting_for_request(self._conn_reader):
            return False  # unread request bytes, or the handler is busy with one
        self._close_now(self._server._linger_options)
        return True


def _waiting_for_request(reader: asyncio.StreamReader) -> bool:
    """True when the handler is blocked reading ``reader`` and nothing is buffered.

    The keep-alive race: closing while a request is half-received, or while
    the handler works on one, would lose it. asyncio has no public view of
    either, so this reads CPython's ``StreamReader._buffer`` and ``_waiter``
    (the future a pending read waits on), as ``_take_unread`` does.
    """
    buffer = getattr(reader, "_buffer", None)
    if not isinstance(buffer, bytearray) or buffer:
        return False
    return getattr(reader, "_waiter", None) is not None


class _ProtocolConnection:
    """Adapts a user's GracefulProtocol to what the server drives."""

    __slots__ = ("_graceful", "_notified", "protocol")

    def __init__(self, protocol: GracefulProtocol) -> None:
        self.protocol = protocol
        self._graceful = protocol._graceful
        self._notified = False

    def _notify(self) -> None:
        if self._notified:
            return
        self._notified = True
        proto = self.protocol
        graceful = self._graceful
        if graceful is None or not graceful.machine.live or graceful.lingering:
            return
        if graceful.machine.eof_written:
            return
        proto._run_hook(proto.on_shutdown_notice)

    def _force(self, timeout: float) -> None:
        graceful = self._graceful
        if graceful is None:
            return
        if graceful.lingering:
            graceful.shorten(timeout)
        elif graceful.machine.live:
            self.protocol.close_gracefully(timeout=timeout)
        else:
            # Closing already (both sides done, say), just not gone yet.
            graceful.abort()

    def _idle(self) -> bool:
        graceful = self._graceful
        if graceful is None or graceful.transport.get_write_buffer_size():
            return False
        info = _tcp_info_u32(
            graceful.transport.get_extra_info("socket"), _TCPI_LAST_DATA_SENT, _TCPI_LAST_DATA_RECV
        )
        if info is not None:
            quiet = min(info) / 1000.0
            if quiet < graceful.loop.time() - graceful.last_read:
                # The kernel saw data move more recently than we knew.
                graceful.last_read = graceful.loop.time() - quiet
                return False
        self.protocol._run_hook(self.protocol.on_idle_timeout)
        return graceful.lingering or not graceful.machine.live


class _Rejecter(asyncio.Protocol):
    """The protocol of a connection over ``max_connections``: reject, then linger."""

    def __init__(self, server: GracefulServer) -> None:
        self._server = server
        self._graceful: Linger | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        graceful = self._graceful = Linger(asyncio.get_running_loop(), tr, self)
        server = self._server
        server._rejected_live.add(graceful)
        graceful.on_lost = server._rejected_live.discard
        server._rejected_total += 1
        hook = server._on_reject
        if hook is not None:
            try:
                hook(tr)
            except Exception:
                logger.exception("on_reject hook %r raised", hook)
        graceful.begin(server._linger_options)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._graceful is not None:
            self._graceful.lost(exc)


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
      that prefer to await it.
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
        self._server: asyncio.Server | None = None
        self._conns: dict[Linger, _Connection] = {}
        self._rejected_live: set[Linger] = set()
        self._rejected_total = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self._notice = _Notice()
        self._shutdown_task: asyncio.Task[ShutdownReport] | None = None
        self._report_conns: set[Linger] | None = None
        self._grace_over = False
        self._drained = 0
        # Protocols made but not yet attached: asyncio makes every protocol of a burst of
        # accepts before the first connection_made runs, so _conns alone undercounts.
        self._pending: weakref.WeakSet[asyncio.BaseProtocol] = weakref.WeakSet()

    # -- construction --------------------------------------------------------

    def _make_protocol(self) -> asyncio.BaseProtocol:
        limit = self._max_connections
        if (
            limit is not None
            and len(self._conns) + len(self._pending) >= limit
            and not self._notice.is_set()
        ):
            return _Rejecter(self)
        factory = self._protocol_factory
        if factory is None:
            reader = asyncio.StreamReader(limit=self._create_kwargs.get("limit", 2**16))
            conn = _StreamConnection(self, reader)
            self._pending.add(conn)
            return conn
        proto = factory()
        if not isinstance(proto, GracefulProtocol):
            raise TypeError(
                f"protocol_factory must return a GracefulProtocol, got {type(proto).__name__}"
            )
        proto._linger_options = self._linger_options
        proto._graceful_attach = self._attach_protocol
        self._pending.add(proto)
        return proto

    async def _start(self, host: Any, port: Any, backlog: int, reuse_port: bool | None) -> None:
        kwargs = {k: v for k, v in self._create_kwargs.items() if k != "limit"}
        self._server = await self._loop.create_server(
            self._make_protocol, host, port, backlog=backlog, reuse_port=reuse_port, **kwargs
        )

    # -- registry --------------------------------------------------------------

    def _attach_protocol(self, protocol: GracefulProtocol) -> None:
        self._pending.discard(protocol)
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

    def _linger_kwargs(self) -> dict[str, Any]:
        options = self._linger_options
        return {
            "timeout": options.timeout,
            "idle_timeout": options.idle_timeout,
            "max_discard": options.max_discard,
            "reset_on_failure": options.reset_on_failure,
        }

    def _detach(self, graceful: Linger) -> None:
        self._conns.pop(graceful, None)

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
        server = self._server
        return () if server is None else tuple(server.sockets)

    @property
    def notice(self) -> _Notice:
        """Set when the shutdown begins: ``notice.is_set()``, ``await notice.wait()``."""
        return self._notice

    def is_serving(self) -> bool:
        """True while the server accepts connections."""
        return self._server is not None and self._server.is_serving()

    async def start_serving(self) -> None:
        """Start accepting connections (for a server made with ``start_serving=False``)."""
        if self._server is None or self._notice.is_set():
            raise RuntimeError("the server is shut down")
        await self._server.start_serving()

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

        Linux only: TCP_INFO on a listening socket gives the queue's length
        (``tcpi_unacked``) and capacity (``tcpi_sacked``); ``ListenOverflows``
        in /proc/net/netstat counts drops system-wide. BSD and macOS keep these
        elsewhere (``netstat -L``), Windows not at all.
        """
        depth = backlog = 0
        found = False
        for sock in self.sockets:
            info = _tcp_info_u32(sock, _TCPI_UNACKED, _TCPI_SACKED)
            if info is None:
                continue
            found = True
            depth += info[0]
            backlog += info[1]
        if not found:
            return None
        return AcceptQueueStats(depth=depth, backlog=backlog, overflows=_listen_overflows())

    async def __aenter__(self) -> GracefulServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        state = "shutting down" if self._notice.is_set() else "serving"
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
        await self._stop_accepting()
        # 2. The notice, once per connection (drained ones are notified as
        # they attach).
        for graceful in list(report_conns):
            conn = self._conns.get(graceful)
            if conn is not None:
                conn._notify()
        # 3. Grace. Connections drained from the queue attach a little later.
        grace_end = started + grace
        adopting = [t for t in self._tasks if not t.done()]
        if adopting:
            await asyncio.wait(adopting, timeout=max(0.0, grace_end - loop.time()))
        await self._wait_closed(lambda: report_conns, grace_end)
        self._grace_over = True
        forced = [g for g in report_conns if g.result is None]
        closed_clean = len(report_conns) - len(forced)
        # (A connection that attaches after this, an in-flight TLS handshake,
        # say, counts as forced: connections == closed_clean + forced.)
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
        # 5. Abort what is left, and wait (briefly) for connection_lost.
        for graceful in everyone():
            if graceful.result is None:
                graceful.abort()
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
            forced=len(report_conns) - closed_clean,
            duration=loop.time() - started,
            outcomes=dict(outcomes),
            drained=self._drained,
            rejected=self._rejected_total,
        )

    async def _stop_accepting(self) -> None:
        """Close the listeners without resetting the queue; serve what was queued."""
        server = self._server
        if server is None:
            return
        for conn_sock in await stop_accepting(self._loop, server):
            self._drained += 1
            self._track(asyncio.ensure_future(self._adopt(conn_sock)))

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
        tasks = list(self._tasks)
        for conn in list(self._conns.values()):
            task = getattr(conn, "_handler_task", None)
            if task is not None:
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=_LOST_WAIT)
        server = self._server
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _LOST_WAIT)


async def stop_accepting(
    loop: asyncio.AbstractEventLoop, server: asyncio.Server
) -> list[socket.socket]:
    """Close ``server``'s listeners without resetting their accept queue.

    Returns the connections that were queued, accepted (non-blocking sockets
    for ``loop.connect_accepted_socket``). Each listening socket is duplicated
    first, so the kernel socket outlives ``server.close()``, and the queue is
    drained through the dup.
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
    queued: list[socket.socket] = []
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
                queued.append(conn_sock)
    return queued


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
    max_connections: object,
    on_reject: Any,
    on_notice: Any,
    idle_timeout: object,
    backlog: object,
    reuse_port: bool | None,
    create_kwargs: dict[str, Any],
) -> GracefulServer:
    """Validate the options of start_server/create_server, then make and start the server."""
    grace_s = _check_seconds("grace", grace)
    force_s = _check_seconds("force_timeout", force_timeout)
    assert grace_s is not None
    assert force_s is not None
    try:
        linger = LingerOptions(
            timeout=linger_timeout,  # type: ignore[arg-type]
            idle_timeout=linger_idle_timeout,  # type: ignore[arg-type]
            max_discard=max_discard,  # type: ignore[arg-type]
            reset_on_failure=reset_on_failure,  # type: ignore[arg-type]
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
        backlog_n = _default_backlog()
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
    )
    await server._start(host, port, backlog_n, reuse_port)
    return server


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
    reset_on_failure: bool = True,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    on_notice: NoticeHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    reuse_port: bool | None = None,
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
    * ``linger_timeout``, ``linger_idle_timeout``, ``max_discard``,
      ``reset_on_failure``: the linger options of every graceful close the
      server does (30 s, 5 s, 64 MiB, True; nginx: lingering_time 30 s,
      lingering_timeout 5 s).
    * ``max_connections``: over it, a connection is rejected: ``on_reject(transport)``
      writes the rejection (a 503, say), then a lingering close reads the
      request away, so the client reads the rejection. Default: no limit.
    * ``on_notice(writer)``: the shutdown notice in protocol terms; may return
      an awaitable. Called once per connection, only while its write side is
      open. Handlers may instead await ``server.notice.wait()``.
    * ``idle_timeout``: seconds without a byte from the peer before a graceful
      close, never while unread request bytes are buffered or our reply is
      unsent (default: None, no idle close; nginx keepalive_timeout 75 s).
    * ``backlog``: listen backlog (2048, bounded by ``somaxconn``).
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
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=on_notice,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=reuse_port,
        create_kwargs={**kwargs, "limit": limit},
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
    reset_on_failure: bool = True,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    reuse_port: bool | None = None,
    **kwargs: Any,
) -> GracefulServer:
    """Start a protocol server, like ``loop.create_server``, that closes without losing data.

    ``protocol_factory()`` must return a :class:`GracefulProtocol`; its
    ``on_shutdown_notice()`` is the shutdown notice and its
    ``on_idle_timeout()`` the idle close. The options are those of
    :func:`start_server` (but ``on_notice``, which the protocol's hook
    replaces). Idle detection for protocols reads TCP_INFO's
    ``tcpi_last_data_recv``/``tcpi_last_data_sent`` (Linux), so the user's
    ``data_received`` is never wrapped; elsewhere the hook runs every
    ``idle_timeout`` and the protocol decides.
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
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=None,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=reuse_port,
        create_kwargs=dict(kwargs),
    )
