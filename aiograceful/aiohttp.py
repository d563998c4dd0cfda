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
  :data:`LINGER`), and the shutdown waits for those closes, bounded, before
  the loop ends.
* The listeners' accept queues are drained, not reset: the connections queued
  there when the shutdown begins are served (and told), over TLS for a TLS
  site. A connection that attaches after the notice (a TLS handshake that
  ended during the shutdown) is told at once.
* ``shutdown_timeout`` keeps its meaning: how long requests in progress may
  take once the shutdown began.

The classes are aiohttp's, subclassed: :class:`GracefulRequestHandler`
(``RequestHandler``), :class:`GracefulWebServer` (``web.Server``) and
:class:`GracefulAppRunner` (``web.AppRunner``, usable on its own with
``TCPSite``). ``web.run_app`` makes its runner by the name
``aiohttp.web.AppRunner`` and offers no hook for it: :func:`run_app` sets that
name to :class:`GracefulAppRunner` while it runs. Tested with aiohttp 3.14 (the
``aiograceful[aiohttp]`` extra pins it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any, cast

import aiohttp.web
from aiohttp import web_protocol, web_runner, web_server
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from ._accept import close_and_drain
from ._dropin_options import IDLE_LINGER, LINGER, SHUTDOWN_QUIET
from ._linger import Linger
from ._options import LingerOptions, logger
from ._transport import ClosingView

__all__ = [
    "IDLE_LINGER",
    "LINGER",
    "SHUTDOWN_QUIET",
    "GracefulAppRunner",
    "GracefulRequestHandler",
    "GracefulWebServer",
    "run_app",
]


class _End:
    """How one connection ends: its Linger record and whether the close has begun."""

    __slots__ = ("closing", "handler", "linger")

    def __init__(self, handler: GracefulRequestHandler, linger: Linger) -> None:
        self.handler = handler
        self.linger = linger
        self.closing = False

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        handler = self.handler
        options = handler.idle_linger if handler._waiting_for_request() else handler.linger
        self.linger.begin(options)


class GracefulRequestHandler(web_protocol.RequestHandler):
    """aiohttp's ``RequestHandler`` (one connection), ending the connection gracefully."""

    linger: LingerOptions = LINGER
    idle_linger: LingerOptions = IDLE_LINGER
    shutdown_quiet: float = SHUTDOWN_QUIET

    _end: _End | None = None
    _notified = False
    _quiet: asyncio.Future[None] | None = None
    _quiet_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """aiohttp's, over a view of the transport whose close is a graceful close."""
        raw: asyncio.Transport = transport  # type: ignore[assignment]
        end = self._end = _End(self, Linger(self._loop, raw, self))
        super().connection_made(ClosingView(raw, end))

    def connection_lost(self, exc: BaseException | None) -> None:
        """Record the close's result, end any quiet window, then aiohttp's own."""
        end = self._end
        if end is not None:
            end.closing = True
            end.linger.lost(exc)
        self._end_quiet()
        super().connection_lost(exc)

    def eof_received(self) -> bool:  # type: ignore[override]
        """The client half-closed: answer what it sent, then close (aiohttp closes at once)."""
        end = self._end
        if end is None or end.closing or end.linger.machine.peer_eof:
            return bool(self.transport is not None and self.transport.can_write_eof())
        end.linger.peer_eof()
        if self._waiting_for_request():
            self.force_close()  # nothing to answer: a graceful close, which ends at once
        # Otherwise finish_response says Connection: close, and the connection
        # ends after the answer. True keeps the transport open for writing
        # (asyncio closes it on a false return); TLS cannot half-close.
        return end.linger.transport.can_write_eof()

    def _waiting_for_request(self) -> bool:
        waiter = self._waiter
        return (
            not self._request_in_progress
            and not self._messages
            and waiter is not None
            and not waiter.done()
        )

    def notice(self) -> None:
        """The shutdown began: answers say ``Connection: close``; idle, a quiet window."""
        if self._notified:
            return
        self._notified = True
        self._quiet = self._loop.create_future()
        end = self._end
        if self.transport is None or end is None or end.closing:
            self._end_quiet()  # ending already
        elif not self._request_in_progress:
            # Idle (or between an answer and the wait for the next request):
            # the quiet window.
            self._start_quiet()
        # Busy: its answer says Connection: close if it has not started (see
        # finish_response); one that had started leaves the connection open,
        # and the quiet window begins once it is sent.

    def _start_quiet(self) -> None:
        quiet = self._quiet
        if self._quiet_handle is None and quiet is not None and not quiet.done():
            self._quiet_handle = self._loop.call_later(self.shutdown_quiet, self._quiet_over)

    def _quiet_over(self) -> None:
        self._quiet_handle = None
        if self._waiting_for_request():
            self.force_close()  # through the view: a graceful close
        self._end_quiet()

    def _end_quiet(self) -> None:
        handle = self._quiet_handle
        if handle is not None:
            handle.cancel()
            self._quiet_handle = None
        quiet = self._quiet
        if quiet is not None and not quiet.done():
            quiet.set_result(None)

    def data_received(self, data: bytes) -> None:
        """aiohttp's; a request arriving in the quiet window keeps it open until answered."""
        super().data_received(data)
        handle = self._quiet_handle
        if handle is not None and self._messages:
            # A request came in during the quiet window: it is answered, with
            # Connection: close, before the shutdown goes on (finish_response
            # ends the window then). Were the window ended now, aiohttp's
            # shutdown could stop the connection before its task took the
            # request up.
            handle.cancel()
            self._quiet_handle = None

    async def finish_response(
        self, request: BaseRequest, resp: StreamResponse, start_time: float | None
    ) -> tuple[StreamResponse, bool]:
        """aiohttp's, with ``Connection: close`` once notified or once the client half-closed."""
        end = self._end
        peer_eof = end is not None and end.linger.machine.peer_eof
        if (self._notified or peer_eof) and not resp.prepared:
            resp.force_close()  # Connection: close
        result = await super().finish_response(request, resp, start_time)
        if self._notified:
            if resp.keep_alive:
                self._start_quiet()  # prepared before the notice: the connection stays
            else:
                self._end_quiet()  # the connection ends after this answer
        return result

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """aiohttp's shutdown of the connection, after the quiet window (within ``timeout``)."""
        quiet = self._quiet
        if quiet is not None and not quiet.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(quiet), timeout)
        await super().shutdown(timeout)

    async def wait_closed(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the lingering close to end; then let go."""
        end = self._end
        if end is None or end.linger.result is not None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(end.linger.future()), timeout)
        if end.linger.result is None:
            end.linger.let_go()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(end.linger.future()), 1.0)


class GracefulWebServer(web_server.Server):
    """aiohttp's ``web.Server``, making :class:`GracefulRequestHandler` connections."""

    _noticed = False
    _late: list[GracefulRequestHandler] | None = None

    def __call__(self) -> GracefulRequestHandler:
        return GracefulRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(
        self, handler: web_protocol.RequestHandler, transport: asyncio.Transport
    ) -> None:
        """aiohttp's registration of a connection; one made after the notice is told at once."""
        super().connection_made(handler, transport)
        if self._noticed and isinstance(handler, GracefulRequestHandler):
            # Attached after the notice (a TLS handshake that ended during the
            # shutdown, a connection taken from the queue): told at once.
            if self._late is None:
                self._late = []
            self._late.append(handler)
            handler.notice()

    def pre_shutdown(self) -> None:
        """The notice: every connection is told (and each one that attaches later)."""
        self._noticed = True
        for conn in self._connections:
            if isinstance(conn, GracefulRequestHandler):
                conn.notice()
            else:
                conn.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        """aiohttp's shutdown, then a bounded wait for the connections' graceful closes."""
        handlers = [c for c in self._connections if isinstance(c, GracefulRequestHandler)]
        await super().shutdown(timeout)
        handlers += [h for h in self._late or () if h not in handlers]
        # The closes have begun; let them finish (bounded) before the loop ends.
        bound = LINGER.timeout if timeout is None else min(timeout, LINGER.timeout)
        await asyncio.gather(*(h.wait_closed(bound) for h in handlers))


class GracefulAppRunner(web_runner.AppRunner):
    """aiohttp's ``web.AppRunner``, serving through :class:`GracefulWebServer`.

    Its ``cleanup()`` first stops the sites' listeners without resetting their
    accept queues: the connections queued there are served, and get the
    notice with the others (aiohttp's ``site.stop()`` closes the listener,
    which resets them).
    """

    async def cleanup(self) -> None:
        """Stop the listeners without resetting their queues, serve those, then aiohttp's."""
        server = self.server
        if server is not None:
            loop = asyncio.get_running_loop()
            adopting: list[asyncio.Future[None]] = []
            for site in self.sites:
                # aiohttp's BaseSite keeps its listener there. uvloop's server
                # derives from no asyncio class: recognised by what is used.
                listener = getattr(site, "_server", None)
                if not hasattr(listener, "sockets") or not callable(
                    getattr(listener, "close", None)
                ):
                    continue
                # A TLS site's queued connections are served over TLS.
                ssl_context = getattr(site, "_ssl_context", None)
                # A TCPSite bound its listener here; a SockSite's socket is
                # someone else's too (gunicorn's worker, a supervisor).
                queued = await close_and_drain(
                    loop,
                    cast(asyncio.Server, listener),
                    refuse_handshakes=isinstance(site, web_runner.TCPSite),
                )
                for sock in queued:
                    adopting.append(asyncio.ensure_future(_adopt(loop, server, sock, ssl_context)))
            if adopting:
                # Together, so that one slow TLS handshake holds up no other;
                # bounded by shutdown_timeout (the handshake's own timeout
                # too). A handshake still going on after it is closed.
                _done, pending = await asyncio.wait(adopting, timeout=self._shutdown_timeout)
                for fut in pending:
                    fut.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=1.0)
        await super().cleanup()

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        return GracefulWebServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


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
def _installed_runner() -> Iterator[None]:
    original = aiohttp.web.AppRunner
    setattr(aiohttp.web, "AppRunner", GracefulAppRunner)  # noqa: B010
    try:
        yield
    finally:
        setattr(aiohttp.web, "AppRunner", original)  # noqa: B010


def run_app(app: Any, **kwargs: Any) -> None:
    """``aiohttp.web.run_app(app, **kwargs)``, whose shutdown notifies and gives a quiet window.

    Takes ``web.run_app``'s arguments (``host``, ``port``, ``shutdown_timeout``,
    ``keepalive_timeout``, ...), unchanged.
    """
    with _installed_runner():
        aiohttp.web.run_app(app, **kwargs)
