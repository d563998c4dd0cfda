"""What the server drives per connection: one adapter per API.

* :class:`_StreamConnection`: a ``start_server`` connection (asyncio's streams,
  the handler's task, a graceful close when the handler returns).
* :class:`_ProtocolConnection`: a user's :class:`GracefulProtocol`.
* :class:`_ProtocolGate`: with ``max_connections``, what a protocol server's
  factory returns: the limit is checked in ``connection_made`` (after a TLS
  handshake), and only then is the user's protocol made.
* :func:`_reject`: a connection over ``max_connections``: reject, then linger.

The limit is counted among attached connections only. A handshake that
fails never reaches ``connection_made``, so it never holds a slot (counting
protocols from the factory on would hold one until the garbage collector
freed the failed ``SSLProtocol`` and its cycle).

The server sees each through :class:`_Connection`: its ``Linger`` record,
``_notify()`` (the shutdown notice), ``_force()`` (the end of grace) and
``_idle()`` (the idle timer fired).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

from ._linger import _ENDED, UNSET, Linger, LingerOptions, logger
from ._protocol import GracefulProtocol, merge_options
from ._socket import TCPI_LAST_DATA_RECV, TCPI_LAST_DATA_SENT, tcp_info_u32
from ._streams import take_from

if TYPE_CHECKING:
    from ._server import GracefulServer

__all__ = [
    "_Connection",
    "_ProtocolConnection",
    "_ProtocolGate",
    "_ServerWriter",
    "_StreamConnection",
    "_no_traffic",
    "_reject",
]


class _Connection(Protocol):
    """What the server needs of a connection, whichever API it came from."""

    _graceful: Linger | None

    def _notify(self) -> None: ...
    def _force(self, timeout: float) -> None: ...
    def _idle(self) -> bool: ...


class _ServerWriter(asyncio.StreamWriter):
    """The handler's writer: how it ends goes through the connection's Linger.

    * ``close()`` is a graceful close (asyncio's would reset a client still
      sending: the handler's own ``writer.close(); await writer.wait_closed()``
      is the idiom); ``wait_closed()`` then waits for its end.
    * ``write_eof()`` is recorded, so no notice is given after it.
    * ``write()`` records the moment, for the idle watch where the kernel
      cannot tell when data last moved (no TCP_INFO: Unix sockets, not Linux).
    """

    linger: Linger | None = None
    _conn: _StreamConnection | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        super().write(data)
        linger = self.linger
        if linger is not None:
            linger.last_read = linger.loop.time()

    def write_eof(self) -> None:
        linger = self.linger
        if linger is not None and linger.machine.live and self.can_write_eof():
            linger.write_eof()
        else:
            super().write_eof()

    def close(self) -> None:
        conn = self._conn
        linger = self.linger
        if conn is not None and linger is not None and linger.machine.live:
            conn._close_now(conn._server._linger_options)
        else:
            super().close()


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
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        server = self._server
        if server._over_limit():
            _reject(server, tr)
            return
        loop = asyncio.get_running_loop()
        self._graceful = Linger(loop, tr, self, server._linger_options)
        writer = self._conn_writer = _ServerWriter(tr, self, self._conn_reader, loop)
        writer.linger = self._graceful
        writer._conn = self
        server._attach(self)
        self._handler_task = loop.create_task(self._run(self._conn_writer))
        server._track(self._handler_task)

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
        if graceful is not None and graceful.result is None:
            # (After a linger, the discarder has made the result already.)
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
            # The graceful close, started here and left to run: the server
            # follows it through the Linger (its result, on_lost), and the
            # writer carries the record, so graceful_close(writer) finds it.
            # Not awaiting it spares the task a wake-up per connection.
            self._close_now(server._linger_options)

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
        if graceful is None or graceful.lingering or graceful.machine.state in _ENDED:
            return  # begin() would do nothing: leave the reader's bytes alone
        unread, peer_eof = take_from(self._conn_reader)
        graceful.begin(options, unread=unread, peer_eof=peer_eof)

    def _force(self, timeout: float) -> None:
        graceful = self._graceful
        if graceful is None:
            return
        closing = graceful.lingering
        if not closing:
            self._close_now(
                merge_options(self._server._linger_options, timeout, UNSET, UNSET, UNSET)
            )
        # The force bounds everything, a download in progress included.
        graceful.shorten(timeout)
        task = self._handler_task
        # Not once a close is under way: the handler (or, once it returned,
        # the server) is awaiting that close, which the force_timeout now
        # bounds, and cancelling it would give up on what it still delivers.
        # The shutdown cancels a handler still running after its connection.
        if task is not None and not task.done() and not closing and not self._handler_returned:
            task.cancel()

    def _idle(self) -> bool:
        """The idle timer fired: close if no traffic and the handler waits; True if it did."""
        graceful = self._graceful
        if graceful is None or not _waiting_for_request(self._conn_reader):
            return False  # unread request bytes, or the handler is busy with one
        if _no_traffic(graceful, watched=True) is not True:
            return False
        self._close_now(self._server._linger_options)
        return True


def _no_traffic(graceful: Linger, *, watched: bool) -> bool | None:
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
    ``_take_unread`` reads ``_buffer``.
    """
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
        if graceful.machine.live and not graceful.lingering:
            self.protocol.close_gracefully(timeout=timeout)
        # The force bounds everything, a download in progress included (and a
        # connection closing already, both sides done, say, but not gone yet).
        graceful.shorten(timeout)

    def _idle(self) -> bool:
        graceful = self._graceful
        proto = self.protocol
        if graceful is None:
            return False
        idle = _no_traffic(graceful, watched=False)
        # Where the kernel cannot tell (None), only a protocol that overrides
        # the hook (and so keeps its own account of traffic) is asked.
        if idle is False or (
            idle is None and type(proto).on_idle_timeout is GracefulProtocol.on_idle_timeout
        ):
            return False
        proto._run_hook(proto.on_idle_timeout)
        return graceful.lingering or not graceful.machine.live


class _ProtocolGate(asyncio.Protocol):
    """A protocol server's connection until ``connection_made`` decides: serve or reject."""

    __slots__ = ("_server",)

    def __init__(self, server: GracefulServer) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        server = self._server
        if server._over_limit():
            _reject(server, tr)
            return
        proto = server._new_protocol()
        tr.set_protocol(proto)
        proto.connection_made(tr)


def _reject(server: GracefulServer, transport: asyncio.Transport) -> None:
    """Turn away a connection over the limit: ``on_reject`` writes the rejection, then linger."""
    graceful = Linger(asyncio.get_running_loop(), transport, None, server._linger_options)
    server._rejected_live.add(graceful)
    graceful.on_lost = server._rejected_lost
    server._rejected_total += 1
    hook = server._on_reject
    if hook is not None:
        try:
            hook(transport)
        except Exception:
            logger.exception("on_reject hook %r raised", hook)
    graceful.begin(server._linger_options)
