"""A drop-in for aiohttp's server: ``run_app(app, **kwargs)``, with ``web.run_app``'s signature.

aiohttp already reads away the body of a request it answered early (its own
``lingering_time``). What it loses is at shutdown: it stops listening, then
closes every idle keep-alive connection at once, and ends the busy ones after
their answer without saying so; a request that was on its way on such a
connection is lost. And its ``eof_received`` lets asyncio close the transport,
so a client that half-closes after its request loses the answer. Here:

* A half-closed client gets its answer (with ``Connection: close``), then the
  connection closes.
* The notice: every answer sent after the shutdown began says
  ``Connection: close``.
* An idle keep-alive connection gets a quiet window of :data:`SHUTDOWN_QUIET`
  seconds instead of an immediate close, so a request already on the wire is
  answered (with ``Connection: close``); then it closes.
* Every close is a lingering close (the connection is half-closed, and what
  the client still sends is discarded until its FIN, bounded by
  :data:`LINGER`). Each connection ends through the same
  :class:`~aiograceful._ending.Ending` as the core server's.
* The shutdown is the core server's order (``_shutdown.run_shutdown``):
  the notice, ``drain_delay``, the listeners stopped with their accept queues
  drained, not reset (the connections queued there are served and told, over
  TLS for a TLS site), the grace, the force, and a let-go (a FIN, never a
  reset). A connection that attaches after the notice (a TLS handshake that
  ended during the shutdown) is told at once.
* A WebSocket (``web.WebSocketResponse``) at the notice gets aiohttp's own
  close, with ``websocket_close_code`` (1001, going away), after every
  message the handler sent; the handler's ``async for msg in ws`` ends, and
  the client's close frame is awaited for ``websocket_close_timeout``
  seconds. (aiohttp before 3.10.4 wakes a handler waiting in ``receive()``
  before it writes the close frame: the handler's own close, 1000 when it
  returns, goes first; every message is still sent, then a FIN.) Stock
  aiohttp sends none unless the application closes its WebSockets in
  ``on_shutdown``: the handler is cancelled after the grace and
  the client sees 1006. (Seen through the application's
  ``on_response_prepare``, which the runner joins unless the application was
  frozen before.) A streaming answer sees the notice in ``runner.notice``
  (``request.app`` can hold the runner): ``await runner.notice.wait()``, then end
  the stream; the grace bounds it.
* ``shutdown_timeout`` keeps its meaning: how long requests in progress may
  take once the shutdown began (the grace). The whole shutdown is bounded by
  ``drain_delay + shutdown_timeout + force_timeout`` and a few short waits
  (aiohttp's own can take twice ``shutdown_timeout``).
* The operations: ``GracefulAppRunner(drain_delay=, force_timeout=)`` and
  ``run_app(..., drain_delay=, force_timeout=)``; ``runner.notice`` (a
  :class:`~aiograceful.ShutdownNotice` a readiness endpoint reads) and
  ``runner.stats`` (a :class:`~aiograceful.ServerStats`).

The classes are aiohttp's, subclassed: :class:`GracefulRequestHandler`
(``RequestHandler``), :class:`GracefulWebServer` (``web.Server``) and
:class:`GracefulAppRunner` (``web.AppRunner``, usable on its own with
``TCPSite``). ``web.run_app`` makes its runner by the name
``aiohttp.web.AppRunner`` and offers no hook for it: :func:`run_app` sets that
name to :class:`GracefulAppRunner` while it runs. Supports aiohttp 3.9
(:data:`MINIMUM_VERSION`) to 3.14 (:data:`TESTED_UP_TO`), checked at import.
"""

from __future__ import annotations

# The installed aiohttp is checked before anything of it is imported (so an
# older one fails here, with what to install, not on a missing attribute):
# the imports below follow that check.
# ruff: noqa: E402
from typing import Final

from ._versions import check_server_version

#: The oldest aiohttp this drop-in supports (docs/dropins.md says why).
MINIMUM_VERSION: Final = "3.9"
#: The newest aiohttp its tests ran against; a newer one works with a warning.
TESTED_UP_TO: Final = "3.14"
check_server_version(__name__, "aiohttp", MINIMUM_VERSION, TESTED_UP_TO)

import asyncio
import contextlib
import functools
import socket
import ssl
import weakref
from collections.abc import Iterator
from typing import Any, cast

import aiohttp.web
from aiohttp import web_protocol, web_runner, web_server
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from ._accept import close_and_drain
from ._dropin_options import (
    IDLE_LINGER,
    LINGER,
    SHUTDOWN_QUIET,
    WEBSOCKET_CLOSE_CODE,
    WEBSOCKET_CLOSE_TIMEOUT,
)
from ._ending import Ending
from ._linger import Linger
from ._options import LingerOptions, check_seconds, logger
from ._server import DEFAULT_FORCE_TIMEOUT, DEFAULT_GRACE
from ._shutdown import LOST_WAIT, ShutdownNotice, ShutdownPhase, run_shutdown
from ._stats import Counters, ServerStats
from ._transport import ClosingView

__all__ = [
    "IDLE_LINGER",
    "LINGER",
    "SHUTDOWN_QUIET",
    "WEBSOCKET_CLOSE_CODE",
    "WEBSOCKET_CLOSE_TIMEOUT",
    "GracefulAppRunner",
    "GracefulRequestHandler",
    "GracefulWebServer",
    "run_app",
]


class GracefulRequestHandler(web_protocol.RequestHandler):
    """aiohttp's ``RequestHandler`` (one connection), ending the connection gracefully.

    Its end is an :class:`~aiograceful._ending.Ending` (the one every server
    of aiograceful uses); the handler answers what the Ending asks (the
    ``Conversation``: is a request being answered, is one half-received, how
    to tell the client). Class attributes: ``linger``, ``idle_linger``,
    ``shutdown_quiet``, ``websocket_close_code`` and ``websocket_close_timeout``
    (a WebSocket's close at the notice: see :class:`GracefulAppRunner`).
    """

    linger: LingerOptions = LINGER
    idle_linger: LingerOptions = IDLE_LINGER
    shutdown_quiet: float = SHUTDOWN_QUIET
    websocket_close_code: int = WEBSOCKET_CLOSE_CODE
    websocket_close_timeout: float = WEBSOCKET_CLOSE_TIMEOUT

    #: The WebSocket this connection was upgraded to (its response, once prepared).
    websocket: aiohttp.web.WebSocketResponse | None = None
    _websocket_close: asyncio.Future[None] | None = None

    _end: Ending | None = None
    _told = False
    # Requests parsed, and requests answered (finish_response returned): one
    # is active from its parse until its answer, the handler's task taking it
    # up included (aiohttp's own flags miss that step).
    _parsed = 0
    _answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """aiohttp's, over a view of the transport whose close is a graceful close."""
        raw: asyncio.Transport = transport  # type: ignore[assignment]
        end = self._end = Ending(
            Linger(self._loop, raw, self),
            self,
            self.linger,
            self.idle_linger,
            self.shutdown_quiet,
        )
        manager = self._manager
        if isinstance(manager, GracefulWebServer):
            counters = manager.counters
            end.linger.on_lost = lambda linger: counters.count(linger.result)
        super().connection_made(ClosingView(raw, end))

    def connection_lost(self, exc: BaseException | None) -> None:
        """Record the close's result, then aiohttp's own."""
        end = self._end
        if end is not None:
            end.lost(exc)
        super().connection_lost(exc)

    def eof_received(self) -> bool:  # type: ignore[override]
        """The client half-closed: answer what it sent, then close (aiohttp closes at once)."""
        end = self._end
        if end is None:
            return False
        return end.on_peer_eof()

    def data_received(self, data: bytes) -> None:
        """aiohttp's; a read after the notice is seen by the quiet window."""
        end = self._end
        if end is not None and end.notified:
            end.linger.last_read = self._loop.time()
        queued = len(self._messages)
        super().data_received(data)
        self._parsed += max(0, len(self._messages) - queued)

    async def finish_response(
        self, request: BaseRequest, resp: StreamResponse, start_time: float | None
    ) -> tuple[StreamResponse, bool]:
        """aiohttp's, with ``Connection: close`` once told (the notice, or the client's FIN)."""
        if self._told and not resp.prepared:
            resp.force_close()  # Connection: close
        queued = len(self._messages)
        try:
            result: Any = await super().finish_response(request, resp, start_time)
        finally:
            # A declined upgrade's tail is parsed there.
            self._parsed += max(0, len(self._messages) - queued)
            self._answered += 1
        # aiohttp >= 3.10.6 returns (response, reset); 3.9 to 3.10.5 return reset alone.
        reset = result[1] if isinstance(result, tuple) else result
        end = self._end
        if end is not None and resp.keep_alive and not reset:
            end.response_done()  # the connection stays open for the next request
        return cast(tuple[StreamResponse, bool], result)

    # -- Conversation (what the connection's Ending asks) --------------------------

    def request_active(self) -> bool:
        """A request is being answered, or one is queued for its turn."""
        # aiohttp >= 3.10.6 flags the handler and its answer (_request_in_progress);
        # 3.9 to 3.10.5 have no such flag, and the parsed/answered counts,
        # which span the same steps, say it alone.
        return self._answered < self._parsed or getattr(self, "_request_in_progress", False)

    def request_partial(self) -> bool:
        """The request being answered is still receiving its body."""
        request = self._current_request
        return request is not None and not request.content.is_eof()

    def unread(self) -> bytes:
        """aiohttp buffers no request bytes of its own that the close should discard."""
        return b""

    def tell(self) -> None:
        """Every answer not yet started says ``Connection: close``."""
        self._told = True

    # -- the shutdown's steps (called by the runner or the web server) -------------

    def notice(self) -> None:
        """The shutdown began: answers say ``Connection: close``; idle, a quiet window.

        A WebSocket is closed (``websocket_close_code``) after what the
        handler sent, and its client's close frame awaited for
        ``websocket_close_timeout`` seconds.
        """
        end = self._end
        if end is not None:
            end.notice()
        ws = self.websocket
        if ws is not None and not ws.closed and self._websocket_close is None:
            self._websocket_close = asyncio.ensure_future(
                _close_websocket(ws, self.websocket_close_code, self.websocket_close_timeout)
            )

    def force(self, timeout: float) -> None:
        """The grace is over: close within ``timeout`` s and cancel the handler, as aiohttp does."""
        self._force_close = True
        handle = self._keepalive_handle
        if handle is not None:
            handle.cancel()
            self._keepalive_handle = None
        end = self._end
        if end is not None:
            end.force(timeout)
        request = self._current_request
        if request is not None:
            request._cancel(asyncio.CancelledError())
        task = self._task_handler
        if task is not None and not task.done():
            task.cancel()

    def let_go(self) -> None:
        """The force is over too: let go (a FIN; the kernel delivers what it holds)."""
        end = self._end
        if end is not None:
            end.let_go()
        elif self.transport is not None:
            self.transport.abort()

    def closed(self) -> asyncio.Future[Any] | None:
        """The future the connection's end completes (None once it has no Ending)."""
        end = self._end
        if end is None or end.detached:
            return None
        return end.linger.future()

    def task(self) -> asyncio.Task[None] | None:
        """aiohttp's task serving the connection (None once it ended)."""
        return self._task_handler

    def open(self) -> bool:
        """True until the connection is lost."""
        fut = self.closed()
        return fut is not None and not fut.done()


class GracefulWebServer(web_server.Server):
    """aiohttp's ``web.Server``, making :class:`GracefulRequestHandler` connections.

    ``pre_shutdown()`` tells every connection (and each one that attaches
    later); ``shutdown(timeout)`` runs the shared shutdown order over the
    connections (the listeners are the runner's): ``timeout`` is the grace,
    then :attr:`force_timeout`, then let go. :attr:`notice` and :attr:`stats`
    as on :class:`GracefulAppRunner`.
    """

    def __init__(
        self,
        handler: Any,
        *,
        notice: ShutdownNotice | None = None,
        counters: Counters | None = None,
        force_timeout: float = DEFAULT_FORCE_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.notice = ShutdownNotice() if notice is None else notice
        self.counters = Counters() if counters is None else counters
        self.force_timeout = force_timeout
        self.phase = ShutdownPhase.SERVING
        self.shutdown_started: float | None = None
        self.shutdown_ended: float | None = None
        self._told: weakref.WeakSet[web_protocol.RequestHandler] = weakref.WeakSet()

    def __call__(self) -> GracefulRequestHandler:
        return GracefulRequestHandler(self, loop=self._loop, **self._kwargs)

    @property
    def stats(self) -> ServerStats:
        """Counts since the server started, with the shutdown's phase."""
        shutdown = (self.shutdown_started, self.shutdown_ended, self._loop.time())
        return self.counters.snapshot(len(self._connections), self.phase, shutdown)

    def connection_made(
        self, handler: web_protocol.RequestHandler, transport: asyncio.Transport
    ) -> None:
        """aiohttp's registration of a connection; one made after the notice is told at once."""
        super().connection_made(handler, transport)
        if self.notice.is_set():
            # Attached after the notice (a TLS handshake that ended during the
            # shutdown, a connection taken from the queue): told at once.
            self._tell_one(handler)

    def tell(self) -> None:
        """The notice to every connection not yet told (once each)."""
        for conn in list(self._connections):
            self._tell_one(conn)

    def _tell_one(self, conn: web_protocol.RequestHandler) -> None:
        told = self._told
        if conn in told:
            return
        told.add(conn)
        if isinstance(conn, GracefulRequestHandler):
            conn.notice()
        else:
            conn.close()

    def pre_shutdown(self) -> None:
        """The notice: every connection is told (and each one that attaches later)."""
        self.begin_shutdown()
        self.tell()

    def begin_shutdown(self) -> None:
        """Set the notice and start the shutdown's clock (once)."""
        if self.shutdown_started is None:
            self.shutdown_started = self._loop.time()
        self.notice.set()

    async def shutdown(self, timeout: float | None = None) -> None:
        """The shared shutdown order over the connections: ``timeout`` of grace, then the force."""
        await self._shutdown_order(_Target(self), timeout, 0.0)

    async def _shutdown_order(
        self, target: _Target, timeout: float | None, drain_delay: float
    ) -> None:
        """:func:`~aiograceful._shutdown.run_shutdown` over ``target``; the phase and clock kept."""
        if self.phase is not ShutdownPhase.SERVING:
            return
        self.begin_shutdown()
        await run_shutdown(
            target,
            grace=DEFAULT_GRACE if timeout is None else timeout,
            force_timeout=self.force_timeout,
            drain_delay=drain_delay,
            on_phase=self._on_phase,
        )
        self.shutdown_ended = self._loop.time()

    def _on_phase(self, phase: ShutdownPhase) -> None:
        self.phase = phase
        if phase is ShutdownPhase.FORCE:
            self.counters.forced += sum(1 for handler in self.handlers() if handler.open())

    def handlers(self) -> list[GracefulRequestHandler]:
        """The connections this server serves through :class:`GracefulRequestHandler`."""
        return [c for c in self._connections if isinstance(c, GracefulRequestHandler)]


class GracefulAppRunner(web_runner.AppRunner):
    """aiohttp's ``web.AppRunner``, serving through :class:`GracefulWebServer`.

    Its ``cleanup()`` runs aiograceful's shutdown order (the core server's,
    shared), then aiohttp's own cleanup (the sites, ``on_cleanup``):

    1. The notice: :attr:`notice` is set (a readiness endpoint reads it) and
       every connection is told: answers say ``Connection: close``, an idle
       keep-alive connection gets a quiet window of ``shutdown_quiet``
       seconds, then its graceful close. For :attr:`drain_delay` seconds the
       sites still accept, so that a load balancer stops sending first.
    2. The listeners stop without resetting their accept queues: the
       connections queued there are served (over TLS for a TLS site) and
       told (aiohttp's ``site.stop()`` closes the listener, which resets
       them). The application's ``on_shutdown`` handlers run.
    3. Up to ``shutdown_timeout`` seconds (the grace) for the connections to
       close themselves.
    4. The request handlers still running are cancelled, as aiohttp does,
       and their connections close with a linger of :attr:`force_timeout`.
    5. What is still open is let go the plain way (a FIN; the kernel
       delivers what it holds), then ``on_cleanup``.

    The whole is bounded by ``drain_delay + shutdown_timeout +
    force_timeout`` and a few short waits. :attr:`stats` counts how the
    connections ended (a :class:`~aiograceful.ServerStats`).
    """

    def __init__(
        self,
        app: Any,
        *,
        drain_delay: float = 0.0,
        force_timeout: float = DEFAULT_FORCE_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        delay = check_seconds("drain_delay", drain_delay, allow_none=False)
        force = check_seconds("force_timeout", force_timeout, allow_none=False)
        assert delay is not None
        assert force is not None
        super().__init__(app, **kwargs)
        #: Seconds the sites keep accepting after the notice.
        self.drain_delay = delay
        #: The linger bound of the connections still open after the grace.
        self.force_timeout = force
        #: Set when the shutdown begins (before ``drain_delay``): a readiness probe's flag.
        self.notice = ShutdownNotice()
        self._counters = Counters()
        self._web: GracefulWebServer | None = None
        self._app_shutdown: asyncio.Future[None] | None = None

    @property
    def stats(self) -> ServerStats:
        """Counts since the runner started, with the shutdown's phase (:class:`ServerStats`)."""
        web = self._web
        if web is None:
            return self._counters.snapshot(0, ShutdownPhase.SERVING, (None, None, 0.0))
        return web.stats

    async def shutdown(self) -> None:
        """aiohttp's (the application's ``on_shutdown``), once however often it is asked."""
        fut = self._app_shutdown
        if fut is None:
            fut = self._app_shutdown = asyncio.ensure_future(super().shutdown())
        await asyncio.wait([fut])
        if not fut.cancelled():
            fut.result()  # an on_shutdown handler's exception, as aiohttp raises it

    async def cleanup(self) -> None:
        """The shared shutdown order (see the class's notes), then aiohttp's cleanup."""
        web = self._server
        if isinstance(web, GracefulWebServer):
            await web._shutdown_order(_Target(web, self), self._shutdown_timeout, self.drain_delay)
        # aiohttp's: the sites (their listeners are closed already), the
        # notice and shutdown (done: no-ops now), on_cleanup, the signals.
        await super().cleanup()

    async def _make_server(self) -> web_server.Server:
        app = self._app
        if not app.on_response_prepare.frozen:
            # The WebSockets, for the notice (an app frozen already: not seen).
            app.on_response_prepare.append(_note_websocket)
        server = await super()._make_server()
        web = self._web = GracefulWebServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            notice=self.notice,
            counters=self._counters,
            force_timeout=self.force_timeout,
            **server._kwargs,
        )
        return web


class _Target:
    """aiohttp's server (and the runner's sites) as the shared shutdown sees it.

    The ``Shutdownable`` of :func:`~aiograceful._shutdown.run_shutdown`.
    Without a runner (``GracefulWebServer.shutdown()`` under another
    runner) there are no listeners to stop and no ``on_shutdown`` to run.
    """

    def __init__(self, web: GracefulWebServer, runner: GracefulAppRunner | None = None) -> None:
        self.web = web
        self.runner = runner
        self.adopting: list[asyncio.Future[None]] = []
        self.app_shutdown: asyncio.Future[None] | None = None
        self.listeners: list[asyncio.Server] = []
        #: With no drain_delay the connections are told once the listeners
        #: are closed: a client that reconnects after the Connection: close
        #: is then refused, rather than queued on a listener being closed
        #: (a SockSite's socket cannot refuse SYNs: see close_and_drain).
        self.deferred = runner is not None and runner.drain_delay == 0
        if runner is not None:
            for site in runner.sites:
                # aiohttp's BaseSite keeps its listener there. uvloop's server
                # derives from no asyncio class: recognised by what is used.
                listener = getattr(site, "_server", None)
                if hasattr(listener, "sockets") and callable(getattr(listener, "close", None)):
                    self.listeners.append(cast(asyncio.Server, listener))

    def accepting(self) -> bool:
        return any(listener.is_serving() for listener in self.listeners)

    def handed_off(self) -> asyncio.Event | None:
        return None

    def tell(self) -> None:
        if not self.deferred:
            self.web.tell()

    async def stop_accepting(self, deadline: float) -> None:
        runner = self.runner
        if runner is None:
            self.deferred = False
            return
        loop = asyncio.get_running_loop()
        queued = 0
        for site in runner.sites:
            listener = getattr(site, "_server", None)
            if listener is None or listener not in self.listeners:
                continue
            # A TLS site's queued connections are served over TLS.
            ssl_context = getattr(site, "_ssl_context", None)
            # A TCPSite bound its listener here; a SockSite's socket is
            # someone else's too (gunicorn's worker, a supervisor).
            socks = await close_and_drain(
                loop, listener, refuse_handshakes=isinstance(site, web_runner.TCPSite)
            )
            queued += len(socks)
            self.adopting += [
                asyncio.ensure_future(_adopt(loop, self.web, sock, ssl_context)) for sock in socks
            ]
        self.web.counters.drained += queued
        self.deferred = False
        self.tell()
        # The application's on_shutdown (aiohttp runs it after its sites
        # stopped): what it closes (WebSockets, say) ends within the grace.
        self.app_shutdown = asyncio.ensure_future(runner.shutdown())

    def pending(self) -> list[asyncio.Future[Any]]:
        self.tell()  # a connection that attached late (uvloop accepts as it attaches)
        waiting: list[asyncio.Future[Any]] = [f for f in self.adopting if not f.done()]
        if self.app_shutdown is not None and not self.app_shutdown.done():
            waiting.append(self.app_shutdown)
        for handler in self.web.handlers():
            fut = handler.closed()
            if fut is not None and not fut.done():
                waiting.append(fut)
        return waiting

    async def force(self, timeout: float) -> None:
        # A TLS handshake of a queued connection still going on: closed.
        for fut in self.adopting:
            fut.cancel()
        for handler in self.web.handlers():
            handler.force(timeout)

    def let_go(self) -> None:
        for handler in self.web.handlers():
            handler.let_go()

    async def finish(self) -> None:
        waiting: list[asyncio.Future[Any]] = [f for f in self.adopting if not f.done()]
        if self.app_shutdown is not None and not self.app_shutdown.done():
            waiting.append(self.app_shutdown)
        for handler in self.web.handlers():
            task = handler.task()
            if task is not None and not task.done():
                task.cancel()
                waiting.append(task)
        if waiting:
            await asyncio.wait(waiting, timeout=LOST_WAIT)
        for fut in waiting:
            fut.cancel()  # on_shutdown still running after every bound: cancelled
        for listener in self.listeners:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.wait_closed(), LOST_WAIT)


async def _close_websocket(ws: aiohttp.web.WebSocketResponse, code: int, timeout: float) -> None:
    """aiohttp's close of a WebSocket (its close frame, then the client's), bounded by ``timeout``.

    Past the bound (or on an error) aiohttp closes the transport: the lingering close.
    """
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(ws.close(code=code), timeout)


async def _note_websocket(request: BaseRequest, response: StreamResponse) -> None:
    """``on_response_prepare``: a WebSocket response is its connection's, for the notice."""
    if isinstance(response, aiohttp.web.WebSocketResponse):
        handler = request.protocol
        if isinstance(handler, GracefulRequestHandler):
            handler.websocket = response
            manager = handler._manager
            if isinstance(manager, GracefulWebServer) and manager.notice.is_set():
                handler.notice()  # upgraded after the notice: closed at once


async def _adopt(
    loop: asyncio.AbstractEventLoop,
    server: web_server.Server,
    sock: socket.socket,
    ssl_context: ssl.SSLContext | None,
) -> None:
    """Serve a connection taken from a site's accept queue (over TLS for a TLS site)."""
    # A cancel (the handshake took too long) needs nothing here: the
    # transport exists already and owns the socket; the loop closes it.
    try:
        await loop.connect_accepted_socket(server, sock, ssl=ssl_context)
    except Exception:
        logger.exception("could not serve a connection taken from the queue")
        sock.close()


@contextlib.contextmanager
def _installed_runner(drain_delay: float, force_timeout: float) -> Iterator[None]:
    original = aiohttp.web.AppRunner
    runner = functools.partial(
        GracefulAppRunner, drain_delay=drain_delay, force_timeout=force_timeout
    )
    setattr(aiohttp.web, "AppRunner", runner)  # noqa: B010
    try:
        yield
    finally:
        setattr(aiohttp.web, "AppRunner", original)  # noqa: B010


def run_app(
    app: Any,
    *,
    drain_delay: float = 0.0,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    **kwargs: Any,
) -> None:
    """``aiohttp.web.run_app(app, **kwargs)`` with aiograceful's shutdown order.

    Takes ``web.run_app``'s arguments (``host``, ``port``, ``shutdown_timeout``,
    ``keepalive_timeout``, ...), unchanged: ``shutdown_timeout`` is the grace.
    ``drain_delay`` keeps the sites accepting for that long after the notice;
    ``force_timeout`` bounds the close of what is still open after the grace
    (see :class:`GracefulAppRunner`).
    """
    check_seconds("drain_delay", drain_delay, allow_none=False)
    check_seconds("force_timeout", force_timeout, allow_none=False)
    with _installed_runner(drain_delay, force_timeout):
        aiohttp.web.run_app(app, **kwargs)
