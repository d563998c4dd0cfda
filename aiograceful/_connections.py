"""The core server's per-connection adapters, written against :class:`Host` (no server import).

* :class:`StreamConnection`: a ``start_server`` connection (asyncio's streams,
  the handler's task, a graceful close when the handler returns).
* :class:`ProtocolConnection`: a user's :class:`GracefulProtocol`.
* :class:`ProtocolGate`: with ``max_connections``, what a protocol server's
  factory returns: the limit is checked in ``connection_made`` (after a TLS
  handshake), and only then is the user's protocol made.

Each one's end is an :class:`~aiograceful._ending.Ending` (the notice, the
quiet window, the force, letting go: written once, shared with the drop-ins);
the adapter is its :class:`~aiograceful._ending.Conversation`, answering what
only it knows (is the handler reading, what is buffered unread).

The limit is counted among attached connections only. A handshake that
fails never reaches ``connection_made``, so it never holds a slot (counting
protocols from the factory on would hold one until the garbage collector
freed the failed ``SSLProtocol`` and its cycle).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ._ending import QUIET, Ending
from ._linger import Linger
from ._options import LingerOptions, logger
from ._protocol import GracefulProtocol
from ._socket import TCPI_LAST_DATA_RECV, TCPI_LAST_DATA_SENT, tcp_info_u32
from ._streams import take_from

__all__ = [
    "Connection",
    "Host",
    "NoticeHook",
    "ProtocolConnection",
    "ProtocolGate",
    "RejectHook",
    "ServerWriter",
    "Settings",
    "StreamConnection",
    "StreamHandler",
    "no_traffic",
]

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
NoticeHook = Callable[[asyncio.StreamWriter], "Awaitable[None] | None"]
RejectHook = Callable[[asyncio.Transport], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """What the adapters need of the server's options (fixed when it starts)."""

    linger: LingerOptions
    handler: StreamHandler | None = None
    on_notice: NoticeHook | None = None
    on_reject: RejectHook | None = None
    idle_timeout: float | None = None
    quiet: float = QUIET
    stream_limit: int = 2**16


class Connection(Protocol):
    """What the server drives per connection, whichever API it came from."""

    ending: Ending

    def notify(self) -> None:
        """The shutdown notice (once; only while the connection may write)."""
        ...

    def force(self, timeout: float) -> None:
        """The grace is over: close within ``timeout``."""
        ...

    def idle(self) -> bool:
        """The idle timer fired: close if nothing moved; True if it did."""
        ...


class Host(Protocol):
    """What an adapter needs of its server: the options, the registry, the limit."""

    settings: Settings

    def admit(self) -> bool:
        """True if a connection attaching now stays within ``max_connections``."""
        ...

    def attach(self, conn: Connection) -> None:
        """A connection is served: register it (it joins a shutdown under way)."""
        ...

    def reject(self, transport: asyncio.Transport) -> None:
        """A connection over the limit: reject it, then linger."""
        ...

    def track(self, fut: asyncio.Future[Any]) -> None:
        """A task of the server's (a handler, a notice hook): collected at shutdown."""
        ...

    def new_protocol(self) -> GracefulProtocol:
        """The user's protocol, from the server's factory."""
        ...


class ServerWriter(asyncio.StreamWriter):
    """The handler's writer: how it ends goes through the connection's Ending.

    * ``close()`` is a graceful close (asyncio's would reset a client still
      sending: the handler's own ``writer.close(); await writer.wait_closed()``
      is the idiom); ``wait_closed()`` then waits for its end.
    * ``write_eof()`` goes through the close record, so no notice follows it.
    * ``write()`` records the moment, for the idle watch where the kernel
      cannot tell when data last moved (no TCP_INFO: Unix sockets, not Linux).
    """

    linger: Linger | None = None
    ending: Ending | None = None
    conn: StreamConnection | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        super().write(data)
        linger = self.linger
        if linger is not None:
            now = linger.last_read = linger.loop.time()
            conn = self.conn
            if conn is not None:
                conn.sent_at = now

    def write_eof(self) -> None:
        linger = self.linger
        if linger is not None and linger.machine.live and self.can_write_eof():
            linger.write_eof()
        else:
            super().write_eof()

    def close(self) -> None:
        ending = self.ending
        if ending is not None and ending.linger.machine.live:
            ending.close()
        else:
            super().close()


class StreamConnection(asyncio.StreamReaderProtocol):
    """The server's protocol for ``start_server``: asyncio's streams, plus an Ending."""

    def __init__(
        self, host: Host, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop
    ) -> None:
        # The loop is passed, as asyncio.start_server passes it: on Python 3.11
        # each get_running_loop() / get_event_loop() is a getpid() system call.
        super().__init__(reader, loop=loop)
        self._host = host
        self._conn_loop = loop
        self._conn_reader = reader
        self._conn_writer: asyncio.StreamWriter | None = None
        self._handler_task: asyncio.Task[None] | None = None
        self._graceful: Linger | None = None
        self.ending: Ending = None  # type: ignore[assignment]  # set in connection_made
        self._handler_returned = False
        #: When bytes last came from the peer, and when the handler last wrote
        #: (loop time): bytes after the last answer are a request in progress.
        self.received_at = 0.0
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        host = self._host
        if not host.admit():
            host.reject(tr)
            return
        loop = self._conn_loop
        settings = host.settings
        graceful = self._graceful = Linger(loop, tr, self, settings.linger)
        self.ending = Ending(graceful, self, settings.linger, quiet=settings.quiet)
        writer = self._conn_writer = ServerWriter(tr, self, self._conn_reader, loop)
        writer.linger = graceful
        writer.ending = self.ending
        writer.conn = self
        host.attach(self)
        task = self._handler_task = loop.create_task(self._run(writer))
        host.track(task)

    def data_received(self, data: bytes) -> None:
        graceful = self._graceful
        if graceful is not None:
            self.received_at = graceful.last_read = graceful.loop.time()
        super().data_received(data)

    def eof_received(self) -> bool:
        graceful = self._graceful
        if graceful is not None and graceful.machine.live and not graceful.machine.peer_eof:
            graceful.peer_eof()
        # StreamReaderProtocol's answer: True (keep the write side open: the
        # handler may still answer) except on TLS, which cannot half-close.
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._graceful is not None and self._graceful.result is None:
            # (After a linger, the discarder has made the result already.)
            self.ending.lost(exc)
        super().connection_lost(exc)
        # As StreamReaderProtocol drops its _stream_writer: the writer points back here.
        writer = self._conn_writer
        if isinstance(writer, ServerWriter):
            writer.conn = None
        self._conn_writer = None

    async def _run(self, writer: asyncio.StreamWriter) -> None:
        handler = self._host.settings.handler
        assert handler is not None
        try:
            await handler(self._conn_reader, writer)
        except asyncio.CancelledError:
            # Forced by the shutdown, which has started the close already.
            raise
        except Exception:
            logger.exception("connection handler %r raised", handler)
        finally:
            self._handler_returned = True
            # The graceful close, started here and left to run: the server
            # follows it through the Linger (its result, on_lost), and the
            # writer carries the record, so graceful_close(writer) finds it.
            # Not awaiting it spares the task a wake-up per connection.
            self.ending.close()

    # -- Conversation (what the Ending asks) -------------------------------------

    def request_active(self) -> bool:
        """The handler is at work (not blocked reading the next request)."""
        return not self._handler_returned and not _waiting_for_request(self._conn_reader)

    def request_partial(self) -> bool:
        """The handler waits for more of a request: it holds its first bytes, or read them.

        A handler reading a body in a loop (``read(n)``) waits with an empty
        buffer, as one waiting for the next request does; what tells them
        apart is that the peer sent bytes after the handler's last answer.
        """
        reader = self._conn_reader
        if not _waiting_for_request(reader):
            return False
        return bool(getattr(reader, "_buffer", None)) or self.received_at > self.sent_at

    def unread(self) -> bytes:
        """Take what the reader holds unread (the closer counts it among the discarded)."""
        return take_from(self._conn_reader)[0]

    def tell(self) -> None:
        """The user's ``on_notice(writer)`` hook, if any (a coroutine runs as a task)."""
        hook = self._host.settings.on_notice
        writer = self._conn_writer
        if hook is None or writer is None:
            return
        result = hook(writer)
        if inspect.isawaitable(result):
            fut = asyncio.ensure_future(self._await_notice(result))
            self._host.track(fut)

    async def _await_notice(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except Exception:
            logger.exception("on_notice hook raised; closing the connection")
            self.ending.close()

    # -- Connection (what the server drives) --------------------------------------

    def notify(self) -> None:
        self.ending.notice()

    def force(self, timeout: float) -> None:
        graceful = self._graceful
        if graceful is None:
            return
        closing = graceful.lingering
        self.ending.force(timeout)
        task = self._handler_task
        # Not once a close is under way: the handler (or, once it returned,
        # the server) is awaiting that close, which the force_timeout now
        # bounds, and cancelling it would give up on what it still delivers.
        # The shutdown cancels a handler still running after its connection.
        if task is not None and not task.done() and not closing and not self._handler_returned:
            task.cancel()

    def idle(self) -> bool:
        """The idle timer fired: close if no traffic and the handler waits; True if it did."""
        graceful = self._graceful
        if graceful is None or not _waiting_for_request(self._conn_reader):
            return False  # unread request bytes, or the handler is busy with one
        if no_traffic(graceful, watched=True) is not True:
            return False
        self.ending.close()
        return True


def no_traffic(graceful: Linger, *, watched: bool) -> bool | None:
    """True when nothing moved either way for the idle period and nothing is buffered either way.

    The watch that calls this knows when the stream server last read or
    wrote (``watched``); for a protocol server it knows nothing, since the
    user's ``data_received`` is not wrapped. So: not idle while anything of
    ours is unacknowledged (the transport's buffer, the kernel's send queue)
    or anything is waiting in the kernel's receive queue; and not idle if
    TCP_INFO (Linux TCP) says data was sent or received within the period
    (then the watch restarts from that moment). Where TCP_INFO is missing
    (Unix sockets, other systems), a watched stream counts its own reads and
    writes; for an unwatched protocol the answer is None: cannot tell.
    """
    transport = graceful.transport
    if transport.get_write_buffer_size() or graceful.outstanding()[0] or graceful.unread():
        graceful.last_read = graceful.loop.time()
        return False
    info = tcp_info_u32(
        transport.get_extra_info("socket"), TCPI_LAST_DATA_SENT, TCPI_LAST_DATA_RECV
    )
    idle = graceful.idle_timeout
    if info is None:
        return True if watched else None
    if idle is not None:
        quiet = min(info) / 1000.0
        if quiet < idle:
            # The kernel saw data move more recently than the watch knew.
            graceful.last_read = graceful.loop.time() - quiet
            return False
    return True


def _waiting_for_request(reader: asyncio.StreamReader) -> bool:
    """True when the handler is blocked reading ``reader`` (a read is pending).

    The keep-alive race: closing while the handler works on a request would
    lose its answer, so a handler that is not reading is never idle. A read
    pending with bytes already buffered is a request that stopped arriving
    halfway (slowloris): that is idle once no byte has come for the period,
    as nginx's ``client_header_timeout`` has it. asyncio has no public view
    of a pending read, so this reads CPython's ``StreamReader._waiter``, as
    ``take_from`` reads ``_buffer``.
    """
    return getattr(reader, "_waiter", None) is not None


class ProtocolConnection:
    """Adapts a user's GracefulProtocol to what the server drives.

    Its notice is the protocol's own hook (``on_shutdown_notice``) where the
    protocol overrides it, which then decides when the connection ends.
    Where it does not, the quiet window decides: the connection closes
    gracefully once a whole window (about 1 s) passes with no byte moving
    either way (TCP_INFO), so a request already on the wire is answered.
    """

    __slots__ = ("_own_notice", "ending", "protocol")

    def __init__(self, protocol: GracefulProtocol, linger: Linger, settings: Settings) -> None:
        self.protocol = protocol
        self.ending = Ending(linger, self, settings.linger, quiet=settings.quiet)
        # A protocol with a notice of its own decides when it closes; the
        # default is the quiet window's: once a whole window passes with
        # nothing moving either way, a graceful close.
        self._own_notice = (
            type(protocol).on_shutdown_notice is not GracefulProtocol.on_shutdown_notice
        )

    # -- Conversation --------------------------------------------------------------

    def request_active(self) -> bool:
        # Unknown to the server: a protocol with a notice of its own closes
        # itself; the default's connection is judged by its traffic.
        return self._own_notice

    def request_partial(self) -> bool:
        return False

    def unread(self) -> bytes:
        return b""

    def tell(self) -> None:
        if self._own_notice:
            proto = self.protocol
            proto._run_hook(proto.on_shutdown_notice)

    # -- Connection ------------------------------------------------------------------

    def notify(self) -> None:
        self.ending.notice()

    def force(self, timeout: float) -> None:
        self.ending.force(timeout)

    def idle(self) -> bool:
        graceful = self.ending.linger
        proto = self.protocol
        idle = no_traffic(graceful, watched=False)
        # Where the kernel cannot tell (None), only a protocol that overrides
        # the hook (and so keeps its own account of traffic) is asked.
        if idle is False or (
            idle is None and type(proto).on_idle_timeout is GracefulProtocol.on_idle_timeout
        ):
            return False
        proto._run_hook(proto.on_idle_timeout)
        return graceful.lingering or not graceful.machine.live


class ProtocolGate(asyncio.Protocol):
    """A protocol server's connection until ``connection_made`` decides: serve or reject."""

    __slots__ = ("_host",)

    def __init__(self, host: Host) -> None:
        self._host = host

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        host = self._host
        if not host.admit():
            host.reject(tr)
            return
        proto = host.new_protocol()
        tr.set_protocol(proto)
        proto.connection_made(tr)
