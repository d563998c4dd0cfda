"""A drop-in for hypercorn (asyncio worker, HTTP/1.1): ``await serve(app, config)``.

``aiograceful.hypercorn.serve`` has ``hypercorn.asyncio.serve``'s signature and
runs hypercorn's own server, with its connection class (``TCPServer``)
replaced by a subclass that changes only how connections end:

* Every close is a lingering close. hypercorn ends a connection with
  ``write_eof()`` then ``close()``; when the client is still sending (an
  upload answered early with a 413), Linux then resets the connection and the
  client loses the answer (BrokenPipeError after 3.1 MiB of 16 MiB, measured).
  Here the close is a lingering close: the rest of the body is read and
  discarded until the client's FIN, bounded by :data:`LINGER`
  (:data:`IDLE_LINGER` for an idle connection).
* An early answer (the request body still arriving) says ``Connection: close``.
* Each connection ends through the core server's
  :class:`~aiograceful._ending.Ending`: the shutdown notice (every answer
  after it says ``Connection: close``), a quiet window of
  :data:`SHUTDOWN_QUIET` seconds for an idle keep-alive connection (a
  request already on the wire is answered), then its FIN. hypercorn closes
  idle connections at once and ends busy ones without telling the client.
* The shutdown is the core server's order (``_shutdown.run_shutdown``),
  driven from hypercorn's first listener close: the notice, ``drain_delay``,
  the listeners drained, ``config.graceful_timeout`` of grace, then
  ``force_timeout``, then a let-go. A client that stalls or reads slowly
  holds it no longer than ``graceful_timeout + force_timeout`` (hypercorn's
  own cancelled close waits on such a client). ``serve(..., control=)``
  takes a :class:`Control`, whose ``notice`` (a readiness endpoint reads it)
  and ``stats`` report the shutdown.

* A WebSocket (HTTP/1.1) at the notice goes away: its close frame, with
  ``websocket_close_code`` (1001), follows what the application sent; the
  application gets ``websocket.disconnect`` with that code (a send after it
  is dropped), and once the client's close frame is back the connection
  ends with the lingering close, waiting at most
  ``websocket_close_timeout`` for it. hypercorn cancels the application after
  its grace and sends 1011 (internal error).
* A streaming answer sees the notice in ``Control.notice`` (``serve(...,
  control=)``): ``await control.notice.wait()``, then end the stream; the
  grace bounds it.

* The accept queue is drained. hypercorn closes its listeners, which resets
  the connections still in the kernel's accept queue (and, on asyncio's
  loop, drops without a word one accepted in the same iteration). Here the
  listener stops accepting without its kernel socket being closed, the queue
  is accepted dry, and each connection is served as hypercorn serves the
  others (told at once: the worker is terminating).

hypercorn offers no hook for its connection class nor its listeners:
``serve`` sets ``hypercorn.asyncio.run.TCPServer`` to the subclass, and the
``asyncio`` that module sees to asyncio with a ``start_server`` whose
servers drain at close, while it runs (and puts hypercorn's back when the
last ``serve`` returns); its listeners' connections are made with asyncio's
streams protocol, subclassed to report the connection's end. HTTP/2
connections get the lingering close but not the header.
Supports hypercorn 0.16 (:data:`MINIMUM_VERSION`) to 0.18 (:data:`TESTED_UP_TO`),
checked at import.
"""

from __future__ import annotations

# The installed hypercorn is checked before anything of it is imported (so an
# older one fails here, with what to install, not on a missing attribute):
# the imports below follow that check.
# ruff: noqa: E402
from typing import Final

from ._versions import check_server_version

#: The oldest hypercorn this drop-in supports (docs/dropins.md says why).
MINIMUM_VERSION: Final = "0.16"
#: The newest hypercorn its tests ran against; a newer one works with a warning.
TESTED_UP_TO: Final = "0.18"
check_server_version(__name__, "hypercorn", MINIMUM_VERSION, TESTED_UP_TO)

import asyncio
import contextlib
import contextvars
import socket
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import h11
import hypercorn.asyncio
import hypercorn.asyncio.run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, Updated
from hypercorn.protocol.events import Data
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.typing import Framework
from wsproto.events import CloseConnection

from ._accept import close_and_drain
from ._dropin_options import (
    IDLE_LINGER,
    LINGER,
    SHUTDOWN_QUIET,
    WEBSOCKET_CLOSE_CODE,
    WEBSOCKET_CLOSE_TIMEOUT,
)
from ._ending import Ending
from ._h11 import CloseAwareConnection
from ._linger import Linger
from ._options import LingerOptions, check_seconds, logger
from ._server import DEFAULT_FORCE_TIMEOUT
from ._shutdown import LOST_WAIT, ShutdownNotice, ShutdownPhase, run_shutdown
from ._stats import Counters, ServerStats
from ._streams import take_from

__all__ = [
    "IDLE_LINGER",
    "LINGER",
    "SHUTDOWN_QUIET",
    "WEBSOCKET_CLOSE_CODE",
    "WEBSOCKET_CLOSE_TIMEOUT",
    "Control",
    "GracefulTCPServer",
    "serve",
]


class _NoticeConnection(CloseAwareConnection):
    """h11's connection that also says ``Connection: close`` once the worker is terminating."""

    terminated: Any = None  # hypercorn's WorkerContext.terminated event
    protocol: Any = None  # hypercorn's H11Protocol, which counts the connection's requests

    def wants_close(self) -> bool:
        if self.close_wanted:
            return True
        terminated = self.terminated
        if terminated is not None and terminated.is_set():
            return True
        # hypercorn ends a connection after config.keep_alive_max_requests requests.
        # 0.17 says Connection: close on that last answer itself; 0.16 does not (the
        # client's next request goes into the close): the drop-in says it on either.
        protocol = self.protocol
        return protocol is not None and bool(
            protocol.keep_alive_requests >= protocol.config.keep_alive_max_requests
        )


class _Stream(asyncio.StreamReaderProtocol):
    """asyncio's streams protocol for hypercorn's connections, reporting to their Ending."""

    ending: Ending | None = None
    lost = False

    def eof_received(self) -> bool:
        ending = self.ending
        if ending is not None:
            linger = ending.linger
            if linger.machine.live and not linger.machine.peer_eof:
                linger.peer_eof()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        ending = self.ending
        if ending is not None and ending.linger.result is None:
            # (After a linger, the discarder has made the result already.)
            ending.lost(exc)
        super().connection_lost(exc)


def _stream_factory(
    loop: asyncio.AbstractEventLoop,
    callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Callable[[], _Stream]:
    def factory() -> _Stream:
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
        return _Stream(reader, callback, loop=loop)

    return factory


class GracefulTCPServer(TCPServer):
    """hypercorn's ``TCPServer`` (one connection), ending the connection gracefully.

    Its end is an :class:`~aiograceful._ending.Ending` (the one every server
    of aiograceful uses); this class answers what the Ending asks. Class
    attributes: ``linger`` (the :class:`~aiograceful.LingerOptions` of a
    close with a request in it, :data:`LINGER`), ``idle_linger`` (of an idle
    connection's close, :data:`IDLE_LINGER`), ``shutdown_quiet``
    (:data:`SHUTDOWN_QUIET`), ``websocket_close_code`` (:data:`WEBSOCKET_CLOSE_CODE`)
    and ``websocket_close_timeout`` (:data:`WEBSOCKET_CLOSE_TIMEOUT`).
    """

    linger: LingerOptions = LINGER
    idle_linger: LingerOptions = IDLE_LINGER
    shutdown_quiet: float = SHUTDOWN_QUIET
    websocket_close_code: int = WEBSOCKET_CLOSE_CODE
    websocket_close_timeout: float = WEBSOCKET_CLOSE_TIMEOUT
    _websocket_close: asyncio.Future[None] | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._busy = False
        self._task = asyncio.current_task()
        transport: asyncio.Transport = self.writer.transport  # type: ignore[assignment]
        stream = transport.get_protocol()
        end = self.ending = Ending(
            Linger(self.loop, transport, stream),
            self,
            self.linger,
            self.idle_linger,
            self.shutdown_quiet,
        )
        if isinstance(stream, _Stream):
            stream.ending = end
            if stream.lost:  # gone before hypercorn took it up
                end.lost(None)
        worker = _WORKER.get()
        if worker is not None:
            worker.attach(self)

    async def _read_data(self) -> None:
        # Runs once the protocol exists and before any byte is read: give an
        # HTTP/1.1 connection the h11 connection that adds the header (made as
        # hypercorn makes its own).
        inner = self._h11()
        if inner is not None and not isinstance(inner.connection, _NoticeConnection):
            conn = _NoticeConnection(
                h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
            )
            conn.terminated = self.context.terminated
            conn.protocol = inner
            inner.connection = conn
        await super()._read_data()
        if not self._busy:
            # The client closed (or the read failed) with no request in
            # progress: nothing to answer (hypercorn waits for its idle timer).
            self.ending.close()

    def _h11(self) -> H11Protocol | None:
        inner = getattr(getattr(self, "protocol", None), "protocol", None)
        return inner if isinstance(inner, H11Protocol) else None

    async def protocol_send(self, event: Event) -> None:
        """hypercorn's event sink, with every connection end made the Ending's close."""
        end = self.ending
        if isinstance(event, Updated):
            self._busy = not event.idle
        if isinstance(event, Closed) and self._answered_before_notice():
            # hypercorn ends a reusable connection once the worker terminates,
            # even after an answer that started before the notice and so did
            # not say Connection: close: the client would send its next
            # request into the close. Keep it, idle, for its quiet window.
            self._busy = False
            await self._restart_idle()
            end.response_done()
            return
        if isinstance(event, Updated) and event.idle and self.reader.at_eof():
            # Answered, and the client had half-closed: no request can
            # follow. (hypercorn would keep it for its keep-alive timeout.)
            end.close()
            return
        if isinstance(event, Closed):
            # Start the close, without waiting for it here: this runs inside
            # the application's last send(), which must not wait for the linger.
            end.close()
            return
        await super().protocol_send(event)
        if isinstance(event, Updated) and event.idle:
            end.response_done()

    def _answered_before_notice(self) -> bool:
        """After an answer without ``Connection: close``, the worker is terminating: recycle."""
        inner = self._h11()
        if inner is None or inner.stream is not None or self.ending.closing:
            return False
        conn = inner.connection
        if not isinstance(conn, h11.Connection):
            return False
        if not self.context.terminated.is_set():
            return False
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        inner.response = None
        inner.scope = None
        return True

    async def _close(self) -> None:
        # The close is the Ending's; hypercorn's task follows it to its end
        # (bounded by the close's own timers, then by the shutdown's force).
        end = self.ending
        end.close()
        try:
            await asyncio.shield(end.linger.future())
        finally:
            await self._stop_idle_timer()

    async def _initiate_server_close(self) -> None:
        await self.protocol.handle(Closed())
        self.ending.close()

    async def _idle_timeout(self) -> None:
        # The keep-alive timeout, or the end of the connection (the shutdown's
        # quiet window is the Ending's, which closes it).
        gone = self.ending.linger.future()
        await asyncio.wait([gone], timeout=self.config.keep_alive_timeout)
        if not gone.done():
            await asyncio.shield(self._initiate_server_close())

    # hypercorn 0.14 to 0.16 run the keep-alive timer as ``_run_idle``, started
    # by ``_start_idle`` and stopped by ``_stop_idle``; 0.17 made it
    # ``_idle_timeout`` in an ``idle_task`` (``AsyncioSingleTask``). Ours is the
    # same timer under either name, and these two pick the API that exists.
    _run_idle = _idle_timeout

    async def _restart_idle(self) -> None:
        idle_task = getattr(self, "idle_task", None)
        if idle_task is not None:  # hypercorn >= 0.17
            await idle_task.restart(self._task_group, self._idle_timeout)
        else:  # hypercorn 0.16
            legacy: Any = self
            await legacy._start_idle()

    async def _stop_idle_timer(self) -> None:
        idle_task = getattr(self, "idle_task", None)
        if idle_task is not None:  # hypercorn >= 0.17
            await idle_task.stop()
        else:  # hypercorn 0.16
            legacy: Any = self
            await legacy._stop_idle()

    # -- Conversation (what the connection's Ending asks) --------------------------

    def request_active(self) -> bool:
        """A request is being answered (hypercorn's protocol said it is not idle)."""
        return self._busy

    def request_partial(self) -> bool:
        """Bytes of a request arrived, but not the whole of it (HTTP/1.1)."""
        inner = self._h11()
        if inner is None:
            return False
        conn = inner.connection
        return conn.their_state is h11.SEND_BODY or bool(conn.trailing_data[0])

    def unread(self) -> bytes:
        """What the reader holds that nobody will read."""
        return take_from(self.reader)[0]

    def tell(self) -> None:
        """Answers not yet started say ``Connection: close``; a WebSocket goes away (HTTP/1.1)."""
        inner = self._h11()
        if inner is None:
            return
        if isinstance(inner.connection, CloseAwareConnection):
            inner.connection.close_wanted = True
        stream = inner.stream
        if (
            isinstance(stream, WSStream)
            and stream.state is ASGIWebsocketState.CONNECTED
            and self._websocket_close is None
        ):
            self._websocket_close = asyncio.ensure_future(self._close_websocket(stream))

    async def _close_websocket(self, stream: WSStream) -> None:
        """The close frame after what the application sent, then the client's, bounded.

        The frame goes out as hypercorn sends its own (the stream's wsproto
        connection, then a ``Data`` event), and the application gets
        ``websocket.disconnect`` with the code. The stream stays CONNECTED to
        hypercorn, so a send the application makes after it is dropped (as
        wsproto refuses it) rather than raising UnexpectedMessageError, which
        an application's own ``websocket.close`` would make of it. When the
        client's close frame comes back hypercorn ends the connection (the
        lingering close); past ``websocket_close_timeout`` it closes without it.
        """
        gone = self.ending.linger.future()
        code = self.websocket_close_code
        try:
            data = stream.connection.send(CloseConnection(code=code))
            await stream.send(Data(stream_id=stream.stream_id, data=data))
            if stream.app_put is not None:
                await stream.app_put({"type": "websocket.disconnect", "code": code})
        except Exception:
            logger.exception("the WebSocket close of %r raised; closing", self)
        else:
            await asyncio.wait([gone], timeout=self.websocket_close_timeout)
        if not gone.done():
            self.ending.close()

    def task(self) -> asyncio.Task[Any] | None:
        """hypercorn's task serving the connection."""
        return self._task


class Control:
    """What a :func:`serve` reports: its notice and its counts (pass one to ``serve``).

    * :attr:`notice`: a :class:`~aiograceful.ShutdownNotice`, set when the
      shutdown begins (before ``drain_delay``): a readiness endpoint reads it.
    * :attr:`stats`: a :class:`~aiograceful.ServerStats` (how the connections
      ended, the shutdown's phase and duration).

    ``control = Control(); await serve(app, config, control=control)``.
    """

    def __init__(self) -> None:
        self.notice = ShutdownNotice()
        self.counters = Counters()
        self.phase = ShutdownPhase.SERVING
        self.connections: set[GracefulTCPServer] = set()
        self.shutdown_started: float | None = None
        self.shutdown_ended: float | None = None

    @property
    def stats(self) -> ServerStats:
        """Counts since ``serve`` started, with the shutdown's phase."""
        shutdown = (self.shutdown_started, self.shutdown_ended, time.monotonic())
        return self.counters.snapshot(len(self.connections), self.phase, shutdown)


class _Worker:
    """One :func:`serve`'s listeners and connections, as the shared shutdown sees them."""

    def __init__(self, control: Control, config: Config, drain_delay: float, force: float) -> None:
        self.control = control
        self.config = config
        self.drain_delay = drain_delay
        self.force_timeout = force
        self.listeners: list[_DrainingServer] = []
        self.told: weakref.WeakSet[GracefulTCPServer] = weakref.WeakSet()
        self.shutting_down: asyncio.Future[None] | None = None

    def attach(self, conn: GracefulTCPServer) -> None:
        control = self.control
        control.connections.add(conn)

        def lost(linger: Linger) -> None:
            control.connections.discard(conn)
            control.counters.count(linger.result)

        conn.ending.linger.on_lost = lost
        if control.notice.is_set():
            self.tell()  # attached after the notice: told at once

    def shutdown(self) -> asyncio.Future[None]:
        """The shared shutdown order, started by the first listener hypercorn closes (once)."""
        if self.shutting_down is None:
            self.shutting_down = asyncio.ensure_future(self._shutdown())
        return self.shutting_down

    async def _shutdown(self) -> None:
        control = self.control
        # The monotonic clock, not the loop's: stats may be read from a
        # metrics exporter's thread, where no loop runs.
        control.shutdown_started = time.monotonic()
        control.notice.set()
        await run_shutdown(
            self,
            grace=self.config.graceful_timeout,
            force_timeout=self.force_timeout,
            drain_delay=self.drain_delay,
            on_phase=self._on_phase,
        )
        control.shutdown_ended = time.monotonic()

    def _on_phase(self, phase: ShutdownPhase) -> None:
        control = self.control
        control.phase = phase
        if phase is ShutdownPhase.FORCE:
            control.counters.forced += len(control.connections)

    # -- Shutdownable ---------------------------------------------------------------

    def accepting(self) -> bool:
        return any(listener.is_serving() for listener in self.listeners)

    def handed_off(self) -> asyncio.Event | None:
        return None

    def tell(self) -> None:
        told = self.told
        for conn in list(self.control.connections):
            if conn not in told:
                told.add(conn)
                conn.ending.notice()

    async def stop_accepting(self, deadline: float) -> None:
        drains = [listener.drain() for listener in self.listeners]
        await asyncio.gather(*drains)
        self.control.counters.drained += sum(listener.drained for listener in self.listeners)

    def pending(self) -> list[asyncio.Future[Any]]:
        self.tell()
        return [conn.ending.linger.future() for conn in self.control.connections]

    async def force(self, timeout: float) -> None:
        for conn in list(self.control.connections):
            conn.ending.force(timeout)

    def let_go(self) -> None:
        for conn in list(self.control.connections):
            conn.ending.let_go()

    async def finish(self) -> None:
        tasks = [conn.task() for conn in self.control.connections]
        waiting = [task for task in tasks if task is not None and not task.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=LOST_WAIT)
            for task in waiting:
                task.cancel()


# A TLS client taken from the accept queue gets this long (or the handshake
# timeout hypercorn passes, if shorter) to finish its handshake before the
# shutdown goes on without it (its connection is then closed).
_ADOPT_TIMEOUT: Final = 5.0
# asyncio.start_server's default StreamReader limit (hypercorn passes none).
_STREAM_LIMIT: Final = 2**16


class _DrainingServer:
    """What hypercorn's worker gets from ``asyncio.start_server``: the server, drained at close.

    hypercorn closes each listener with ``server.close()`` then ``await
    server.wait_closed()``, which resets the connections still in the kernel's
    accept queue. Here the first ``close()`` starts the worker's shutdown
    (the shared order: the notice, ``drain_delay``, every listener stopped
    without closing its kernel socket and its queue served, the grace, the
    force, the let-go), and ``wait_closed()`` waits for it: by the time
    hypercorn's own graceful wait begins, the connections have ended.
    The queued connections are served as hypercorn serves the others (its own
    connection callback, the same TLS context), told at once.
    """

    def __init__(
        self,
        server: asyncio.Server,
        callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        ssl: Any,
        ssl_handshake_timeout: float | None,
        refuse_handshakes: bool = False,
        worker: _Worker | None = None,
    ) -> None:
        self._server = server
        self._refuse_handshakes = refuse_handshakes
        self._callback = callback
        self._ssl = ssl
        self._handshake_timeout = ssl_handshake_timeout
        self._draining: asyncio.Future[None] | None = None
        self._worker = worker
        #: How many connections were taken from the accept queue.
        self.drained = 0
        if worker is not None:
            worker.listeners.append(self)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (``asyncio.Server.sockets``)."""
        return tuple(self._server.sockets)

    def close(self) -> None:
        """Begin the worker's shutdown (or, alone, the drain of this listener). Idempotent."""
        if self._worker is not None:
            self._worker.shutdown()
        else:
            self.drain()

    def drain(self) -> asyncio.Future[None]:
        """Stop accepting; the queued connections are taken and served (once)."""
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return self._draining

    async def wait_closed(self) -> None:
        """Wait for the worker's shutdown (or this listener's drain), then for the server."""
        self.close()
        if self._worker is not None:
            await asyncio.shield(self._worker.shutdown())
        await asyncio.shield(self.drain())
        await self._server.wait_closed()

    def is_serving(self) -> bool:
        """``asyncio.Server.is_serving()``."""
        return self._server.is_serving() and self._draining is None

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        queued = await close_and_drain(
            loop, self._server, refuse_handshakes=self._refuse_handshakes
        )
        self.drained = len(queued)
        if not queued:
            return
        adopting = [asyncio.ensure_future(self._adopt(loop, sock)) for sock in queued]
        bound = _ADOPT_TIMEOUT
        if self._ssl is not None and self._handshake_timeout is not None:
            bound = min(bound, self._handshake_timeout)
        _done, pending = await asyncio.wait(adopting, timeout=bound)
        for task in pending:
            task.cancel()  # the handshake did not finish: the transport is closed
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    async def _adopt(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        kwargs: dict[str, Any] = {}
        if self._ssl is not None:
            kwargs["ssl"] = self._ssl
            if self._handshake_timeout is not None:
                kwargs["ssl_handshake_timeout"] = self._handshake_timeout
        # A cancel (the handshake took too long) needs nothing here: the
        # transport exists already and owns the socket; the loop closes it.
        try:
            await loop.connect_accepted_socket(
                _stream_factory(loop, self._callback), sock, **kwargs
            )
        except Exception:
            logger.exception("could not serve a connection taken from the accept queue")
            sock.close()


async def _start_server(
    client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: Any = None,
    port: Any = None,
    **kwargs: Any,
) -> _DrainingServer:
    """``asyncio.start_server`` as hypercorn's worker calls it, its server drained at close."""
    loop = asyncio.get_running_loop()
    kwargs.pop("limit", None)
    server = await loop.create_server(
        _stream_factory(loop, client_connected_cb), host, port, **kwargs
    )
    return _DrainingServer(
        server,
        client_connected_cb,
        kwargs.get("ssl"),
        kwargs.get("ssl_handshake_timeout"),
        _OWNS_LISTENERS.get(),
        _WORKER.get(),
    )


class _AsyncioForHypercorn(types.ModuleType):
    """``asyncio`` as ``hypercorn.asyncio.run`` sees it while :func:`serve` runs.

    Everything is asyncio's, except ``start_server``, whose servers drain
    their accept queue when hypercorn closes them.
    """

    start_server = staticmethod(_start_server)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


_ASYNCIO: Final = _AsyncioForHypercorn("asyncio")
# Whether the worker that serve() runs binds its listeners itself (no
# ``fd://`` bind): only those may refuse new handshakes as they drain.
_OWNS_LISTENERS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "aiograceful_hypercorn_owns_listeners", default=False
)
# The worker that serve() runs (its listeners and connections report to it).
_WORKER: contextvars.ContextVar[_Worker | None] = contextvars.ContextVar(
    "aiograceful_hypercorn_worker", default=None
)
_installed = 0


@contextlib.contextmanager
def _installed_server() -> Iterator[None]:
    """hypercorn's worker makes ``hypercorn.asyncio.run.TCPServer(...)`` per connection
    and its listeners with ``asyncio.start_server`` (both looked up in that module)."""
    global _installed
    if _installed == 0:
        setattr(hypercorn_run, "TCPServer", GracefulTCPServer)  # noqa: B010
        setattr(hypercorn_run, "asyncio", _ASYNCIO)  # noqa: B010
    _installed += 1
    try:
        yield
    finally:
        _installed -= 1
        if _installed == 0:
            setattr(hypercorn_run, "TCPServer", TCPServer)  # noqa: B010
            setattr(hypercorn_run, "asyncio", asyncio)  # noqa: B010


async def serve(
    app: Framework,
    config: Config,
    *,
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    mode: Literal["asgi", "wsgi"] | None = None,
    drain_delay: float = 0.0,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    control: Control | None = None,
) -> None:
    """``hypercorn.asyncio.serve(app, config, ...)``, with connections that end gracefully.

    Its shutdown is the core server's order: the notice (``control.notice``
    is set; every answer says ``Connection: close``; an idle keep-alive
    connection gets its quiet window, then its FIN), ``drain_delay`` seconds
    of accepting still, the listeners' accept queues drained and served (not
    reset), ``config.graceful_timeout`` of grace, then ``force_timeout``,
    then a let-go (a FIN, not a reset). Listeners it binds itself refuse new
    handshakes for the drain's last moments
    (:func:`~aiograceful._accept.close_and_drain`); an ``fd://`` bind's
    socket is another process's too, and is left as it is. Pass a
    :class:`Control` to read the notice and the stats.
    """
    delay = check_seconds("drain_delay", drain_delay, allow_none=False)
    force = check_seconds("force_timeout", force_timeout, allow_none=False)
    assert delay is not None
    assert force is not None
    worker = _Worker(Control() if control is None else control, config, delay, force)
    binds = [*config.bind, *config.insecure_bind, *config.quic_bind]
    token = _OWNS_LISTENERS.set(not any(bind.startswith("fd://") for bind in binds))
    worker_token = _WORKER.set(worker)
    try:
        with _installed_server():
            await hypercorn.asyncio.serve(app, config, shutdown_trigger=shutdown_trigger, mode=mode)
    finally:
        _WORKER.reset(worker_token)
        _OWNS_LISTENERS.reset(token)
