"""A drop-in for uvicorn: its own HTTP protocols, changed only in how connections end.

Use it as::

    uvicorn app:app --http aiograceful.uvicorn:H11Protocol
    uvicorn app:app --http aiograceful.uvicorn:HttpToolsProtocol   # httptools installed

(uvicorn's CLI takes an import string in ``--http`` from 0.36; before, it
takes only its own parsers' names), or ``uvicorn.run(app,
http=aiograceful.uvicorn.H11Protocol)`` / ``uvicorn.Config(app, http=...)``
(every supported uvicorn), or
:func:`run` (``uvicorn.run``'s arguments), which adds the drained accept queue
and the grace/force order to uvicorn's shutdown. The protocols alone (the
plain CLI, ``uvicorn.Server``) cannot drain the queue: uvicorn's shutdown
closes its listening sockets first, and the kernel resets the connections
still queued there; a protocol class never sees the listener.

What changes, against stock uvicorn (0.54, both parsers):

* Every close is a lingering close. uvicorn ends a connection with
  ``transport.close()``; when the client is still sending (an upload answered
  early with a 413, a ``Connection: close`` or HTTP/1.0 request), Linux then
  resets the connection and the client loses the answer. Here every close is
  aiograceful's closer: flush, half-close, discard what the client still
  sends until its FIN, bounded by :data:`LINGER` (timers and a byte cap).
* A half-closed client still gets its answer. uvicorn's ``eof_received`` lets
  asyncio close the transport before the application has answered.
* The unread body after an early answer is bounded. Stock uvicorn reads and
  drops the rest of the body on a keep-alive connection, however large. Here
  an answer that starts while the request body is still arriving carries
  ``Connection: close``, and the rest of the body goes to the closer, whose
  byte cap and timers bound it.
* The shutdown notice. On uvicorn's shutdown every answer sent after the
  notice carries ``Connection: close``. An idle keep-alive connection (one
  between requests, or whose answer was still going out) is given a quiet
  window of :data:`SHUTDOWN_QUIET` seconds (nginx's ``keepalive_min_timeout``
  is the precedent), so that a request already on the wire is answered
  rather than lost; then it closes gracefully. Stock uvicorn closes idle
  connections at once, and the requests that raced the close are lost.

The knobs are class attributes (``linger``, ``idle_linger``, ``shutdown_quiet``,
``websocket_close_code``, ``websocket_close_timeout``):
subclass to change them and pass the subclass's import string to ``--http``.

* A WebSocket at shutdown goes away cleanly. uvicorn's WebSocket protocol
  (wsproto's or websockets' sans-I/O one, ``--ws wsproto`` /
  ``websockets-sansio``) still runs it, but at the notice an open WebSocket
  sends a close frame with ``websocket_close_code`` (1001, going away; stock
  uvicorn's is 1012) after every message the application sent, the
  application receives ``websocket.disconnect`` with that code, and the
  client's close frame is awaited for ``websocket_close_timeout`` seconds
  (:data:`WEBSOCKET_CLOSE_TIMEOUT`); the transport then ends with the
  lingering close. uvicorn's legacy ``--ws websockets`` protocol keeps its own (1012).
On TLS, asyncio has no half-close: the lingering close reads and discards
until the client closes, then sends close_notify, so a client still
uploading reads the early answer (stock uvicorn's close fails it on asyncio's
loop); a client that half-closes a TLS connection is closed by asyncio
itself, as in stock uvicorn.

Supports uvicorn 0.22 (:data:`MINIMUM_VERSION`) to 0.55 (:data:`TESTED_UP_TO`),
checked at import; the subclasses use uvicorn's protocol attributes
(``cycle``, ``conn``, ``flow``, ``transport``), which a later uvicorn may change.
"""

from __future__ import annotations

# The installed uvicorn is checked before anything of it is imported (so an
# older one fails here, with what to install, not on a missing attribute):
# the imports below follow that check.
# ruff: noqa: E402
from typing import Final

from ._versions import check_server_version

#: The oldest uvicorn this drop-in supports (docs/dropins.md says why).
MINIMUM_VERSION: Final = "0.22"
#: The newest uvicorn its tests ran against; a newer one works with a warning.
TESTED_UP_TO: Final = "0.55"
check_server_version(__name__, "uvicorn", MINIMUM_VERSION, TESTED_UP_TO)

import asyncio
import contextlib
import importlib.util
import inspect
import logging
import os
import socket
import sys
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import h11
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http import h11_impl
from uvicorn.supervisors import Multiprocess

try:
    from uvicorn.protocols.utils import ClientDisconnected
except ImportError:  # uvicorn < 0.27 has no class of its own for it

    class ClientDisconnected(OSError):  # type: ignore[no-redef]
        """A send to a WebSocket client that has gone (ASGI: an ``OSError``)."""


from ._accept import HANDSHAKE_SETTLE, accept_queue_stats, close_and_drain
from ._dropin_options import (
    IDLE_LINGER,
    LINGER,
    SHUTDOWN_QUIET,
    WEBSOCKET_CLOSE_CODE,
    WEBSOCKET_CLOSE_TIMEOUT,
)
from ._ending import Ending
from ._h11 import CloseAwareConnection as _Connection
from ._linger import Linger
from ._options import LingerOptions, check_seconds
from ._server import DEFAULT_FORCE_TIMEOUT, DEFAULT_GRACE
from ._shutdown import LOST_WAIT, ShutdownNotice, ShutdownPhase, run_shutdown
from ._socket import refuse_new_handshakes
from ._stats import Counters, ServerStats
from ._transport import ClosingView as _Transport

if TYPE_CHECKING:
    from uvicorn.protocols.http import httptools_impl

# HttpToolsProtocol exists only where httptools is installed (uvicorn's own
# extra): listed then, and appended below, so that ``__all__`` names only
# what ``from aiograceful.uvicorn import *`` can import.
__all__ = [
    "IDLE_LINGER",
    "LINGER",
    "SHUTDOWN_QUIET",
    "WEBSOCKET_CLOSE_CODE",
    "WEBSOCKET_CLOSE_TIMEOUT",
    "H11Protocol",
    "Server",
    "protocol_class",
    "run",
]

logger: Final = logging.getLogger("uvicorn.error")

# Each aiograceful Server, by uvicorn's ServerState (which every protocol of
# that server holds), for its counters and its notice: a protocol under
# uvicorn's own server (the plain CLI) finds none and counts nothing.
_SERVERS: Final[weakref.WeakKeyDictionary[Any, Server]] = weakref.WeakKeyDictionary()
# How often the shutdown looks again at a connection it has no future for.
_POLL: Final = 0.1
# How long the force waits for cancelled tasks to write their last answer.
_CANCEL_WAIT: Final = 1.0
# How long uvicorn's supervisor waits, at most, for its workers to accept
# what is queued on their shared listener before it stops them.
_QUEUE_WAIT: Final = 1.0


def _new_end(
    protocol: Any, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop
) -> tuple[Ending, _Transport]:
    end = Ending(
        Linger(loop, transport, protocol),
        protocol,
        protocol.linger,
        protocol.idle_linger,
        protocol.shutdown_quiet,
    )
    server = _SERVERS.get(protocol.server_state)
    if server is not None:
        counters = server._counters
        end.linger.on_lost = lambda linger: counters.count(linger.result)
        if server.notice.is_set():
            # Attached during the shutdown (drain_delay, the drained queue, a
            # late TLS handshake): told as soon as uvicorn has set it up.
            loop.call_soon(end.notice)
    return end, _Transport(transport, end)


class _Ending(asyncio.Protocol):
    """How both parsers' connections end: the callbacks that feed their :class:`Ending`.

    First among the bases, so that its callbacks run before uvicorn's own
    (each calls ``super()``).
    """

    linger: ClassVar[LingerOptions] = LINGER
    idle_linger: ClassVar[LingerOptions] = IDLE_LINGER
    shutdown_quiet: ClassVar[float] = SHUTDOWN_QUIET
    websocket_close_code: ClassVar[int] = WEBSOCKET_CLOSE_CODE
    websocket_close_timeout: ClassVar[float] = WEBSOCKET_CLOSE_TIMEOUT

    _end: Ending
    ws_protocol_class: Any
    loop: asyncio.AbstractEventLoop
    server_state: Any

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._end, view = _new_end(self, transport, self.loop)
        super().connection_made(view)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end.lost(exc)
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        # True keeps the write side open after the client's FIN (uvicorn's
        # own returns None, and asyncio then closes the transport at once).
        return self._end.on_peer_eof()

    def shutdown(self) -> None:
        """uvicorn's shutdown notice: ``Connection: close`` on what follows, a quiet window."""
        self._end.notice()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]  # uvicorn's protocols have it
        self._end.response_done()

    # -- Conversation (what the connection's Ending asks; each parser answers) ----

    def request_active(self) -> bool:
        """A request is being answered (received, or being received)."""
        raise NotImplementedError

    def request_partial(self) -> bool:
        """Bytes of a request arrived, but not the whole of it."""
        raise NotImplementedError

    def unread(self) -> bytes:
        """Request bytes received that nobody will read."""
        raise NotImplementedError

    def tell(self) -> None:
        """Make the answer in progress (or the next one) carry ``Connection: close``."""
        raise NotImplementedError


class H11Protocol(_Ending, h11_impl.H11Protocol):  # type: ignore[misc]  # eof_received: bool
    """uvicorn's h11 protocol, ending its connections gracefully (see the module's notes).

    ``uvicorn app:app --http aiograceful.uvicorn:H11Protocol``. Class
    attributes: ``linger`` (:class:`~aiograceful.LingerOptions` of a close with
    a request in it), ``idle_linger`` (of an idle keep-alive connection's
    close), ``shutdown_quiet`` (seconds an idle connection stays open after
    the shutdown notice).
    """

    def __init__(
        self,
        config: Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        size = config.h11_max_incomplete_event_size
        # As uvicorn makes its own (h11's default size when none is configured).
        self.conn = _Connection(h11.SERVER) if size is None else _Connection(h11.SERVER, size)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        """uvicorn's upgrade; the WebSocket protocol then owns the connection and its end."""
        # The WebSocket protocol takes the real transport and ends it its own way.
        end = self._end
        end.detach()
        self.transport = end.linger.transport
        self.ws_protocol_class = _websocket_class(self.ws_protocol_class, type(self))
        super().handle_websocket_upgrade(event)

    # -- Conversation ----------------------------------------------------------

    def request_active(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def request_partial(self) -> bool:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            return True
        # A body still arriving after an early answer, or the start of the next request.
        return self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])

    def unread(self) -> bytes:
        data = self.conn.trailing_data[0]
        cycle = self.cycle
        if cycle is not None and cycle.body:
            data = bytes(cycle.body) + data
        return data

    def tell(self) -> None:
        conn = self.conn
        assert isinstance(conn, _Connection)
        conn.close_wanted = True


if TYPE_CHECKING or importlib.util.find_spec("httptools") is not None:
    from uvicorn.protocols.http import httptools_impl

    __all__ += ["HttpToolsProtocol"]

    class HttpToolsProtocol(_Ending, httptools_impl.HttpToolsProtocol):  # type: ignore[misc]
        """uvicorn's httptools protocol, ending its connections gracefully.

        ``uvicorn app:app --http aiograceful.uvicorn:HttpToolsProtocol``; the
        same changes and class attributes as :class:`H11Protocol`.
        """

        # The cycle whose Connection: close is provisional: its request body
        # was still arriving when it began; restored if the body ends first.
        _body_pending: httptools_impl.RequestResponseCycle | None = None
        # The cycle told to close for the notice or the client's FIN (the newest).
        _closing_cycle: httptools_impl.RequestResponseCycle | None = None

        def handle_websocket_upgrade(self) -> None:
            end = self._end
            end.detach()
            self.transport = end.linger.transport
            self.ws_protocol_class = _websocket_class(self.ws_protocol_class, type(self))
            super().handle_websocket_upgrade()

        def on_headers_complete(self) -> None:
            before = self.cycle
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is before or cycle is None:
                return  # an upgrade: no request cycle
            end = self._end
            if end.notified or end.peer_eof:
                self.tell()
            elif cycle.keep_alive and _has_body(self.headers):
                # An answer that starts before the body has arrived says
                # Connection: close (the rest of the body goes to the closer).
                _keep_alive(cycle, False)
                self._body_pending = cycle

        def on_message_complete(self) -> None:
            super().on_message_complete()
            cycle = self._body_pending
            if cycle is not None and cycle is self.cycle:
                self._body_pending = None
                end = self._end
                if not cycle.response_started and not (end.notified or end.peer_eof):
                    _keep_alive(cycle, True)

        # -- Conversation ------------------------------------------------------

        def request_active(self) -> bool:
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def request_partial(self) -> bool:
            # more_body stays True after an early answer: the body is still arriving.
            cycle = self.cycle
            return cycle is not None and cycle.more_body

        def unread(self) -> bytes:
            cycle = self.cycle
            return bytes(cycle.body) if cycle is not None else b""

        def tell(self) -> None:
            # The newest request's answer closes the connection; an older one
            # (pipelined) told so before it keeps the connection for it.
            cycle = self.cycle
            if cycle is None or cycle.response_started:
                return
            old = self._closing_cycle
            if old is not None and old is not cycle and not old.response_started:
                _keep_alive(old, True)
            self._body_pending = None
            _keep_alive(cycle, False)
            self._closing_cycle = cycle

else:

    def __getattr__(name: str) -> Any:
        """``HttpToolsProtocol`` without httptools: an ImportError saying what to install."""
        if name == "HttpToolsProtocol":
            raise ImportError(
                "aiograceful.uvicorn.HttpToolsProtocol needs httptools: pip install httptools"
            )
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CLOSE: Final = (b"connection", b"close")


def _keep_alive(cycle: Any, keep_alive: bool) -> None:
    """Whether the httptools cycle's answer keeps the connection, said in its header too.

    uvicorn's httptools cycle closes the connection after an answer whose
    ``keep_alive`` is False; from a release after 0.35 it also writes
    ``Connection: close`` then, but from 0.22 to at least 0.35 it writes no
    header, and the client learns of the close only from the FIN. The header
    among the cycle's own default headers is written by every version (and the
    newer ones, seeing it, add no second one): a copy of the list, which is the
    server's, shared by every cycle. (A request that said ``Connection: close``
    gets it back from uvicorn itself.)
    """
    cycle.keep_alive = keep_alive
    headers = [header for header in cycle.default_headers if header != _CLOSE]
    if not keep_alive and _CLOSE not in cycle.scope["headers"]:
        headers.append(_CLOSE)
    cycle.default_headers = headers


# uvicorn's WebSocket protocols whose shutdown is replaced (both sans-I/O:
# wsproto's, and the websockets library's new one); its legacy "websockets"
# protocol keeps its own (1012).
_SANS_IO_WEBSOCKETS: Final = frozenset(
    {
        "uvicorn.protocols.websockets.wsproto_impl",
        "uvicorn.protocols.websockets.websockets_sansio_impl",
    }
)


class _WebSocketEnd:
    """A WebSocket's close (its :class:`ClosingView`'s closer): the lingering close, once."""

    __slots__ = ("closing", "linger", "options")

    def __init__(self, linger: Linger, options: LingerOptions) -> None:
        self.linger = linger
        self.options = options
        self.closing = False

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.linger.begin(self.options)


# The classes _websocket_class made, by (uvicorn's class, the HTTP protocol class).
_WEBSOCKET_CLASSES: Final[dict[tuple[Any, Any], Any]] = {}


def _websocket_class(base: Any, owner: type[_Ending]) -> Any:
    """uvicorn's WebSocket protocol ``base``, ending as ``owner`` (the HTTP protocol) says.

    At the shutdown notice an open WebSocket sends its close frame with
    ``owner.websocket_close_code`` after what the application sent before,
    tells the application (``websocket.disconnect`` with that code), and waits
    up to ``owner.websocket_close_timeout`` seconds for the client's close
    frame; every close of its transport is the lingering close.
    """
    made = _WEBSOCKET_CLASSES.get((base, owner))
    if made is None:
        made = _WEBSOCKET_CLASSES[base, owner] = _make_websocket_class(base, owner)
    return made


def _make_websocket_class(base: Any, owner: type[_Ending]) -> Any:
    if base is None or not any(c.__module__ in _SANS_IO_WEBSOCKETS for c in base.__mro__):
        return base

    class GracefulWebSocket(base):  # type: ignore[misc]
        __qualname__ = f"{owner.__qualname__}.websocket({base.__qualname__})"

        _ws_end: _WebSocketEnd
        _went_away = False
        close_sent: bool
        handshake_complete: bool
        read_paused: bool

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn passes its arguments by keyword (both HTTP protocols).
            self._graceful_server = _SERVERS.get(kwargs.get("server_state"))

        def connection_made(self, transport: asyncio.Transport) -> None:
            linger = Linger(self.loop, transport, self)
            server = self._graceful_server
            if server is not None:
                counters = server._counters
                linger.on_lost = lambda linger: counters.count(linger.result)
            self._ws_end = _WebSocketEnd(linger, owner.idle_linger)
            super().connection_made(_Transport(transport, self._ws_end))

        def connection_lost(self, exc: Exception | None) -> None:
            self._ws_end.linger.lost(exc)
            # uvicorn < 0.53 has no close timer of its own to cancel: ours goes here.
            timer = getattr(self, "close_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        async def send(self, message: Any) -> None:
            if self._went_away and message.get("type") in ("websocket.send", "websocket.close"):
                # The close frame is out (the shutdown's): a send now is one to
                # a disconnected client (ASGI: an OSError), not the app's error.
                raise ClientDisconnected()
            await super().send(message)

        def shutdown(self) -> None:
            if self.close_sent or not self.handshake_complete or self.transport.is_closing():
                super().shutdown()
                return
            stop_keepalive = getattr(self, "stop_keepalive", None)  # its pings: uvicorn >= 0.46
            if stop_keepalive is not None:
                stop_keepalive()
            code = owner.websocket_close_code
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code})
            conn = self.conn
            if hasattr(conn, "send_close"):  # websockets' sans-I/O protocol
                conn.send_close(code)
                data = b"".join(conn.data_to_send())
            else:  # wsproto's
                from wsproto.events import CloseConnection

                data = conn.send(CloseConnection(code=code))
            self.transport.write(data)
            self.close_sent = True
            self._went_away = True
            if self.read_paused:
                # The client's close frame must be read.
                self.read_paused = False
                self.transport.resume_reading()
            # The client's close frame cancels this timer and closes (uvicorn's own).
            self.close_timer = self.loop.call_later(
                owner.websocket_close_timeout, self.transport.close
            )

    return GracefulWebSocket


def _has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


# -- the server: uvicorn's, with the accept queue drained and a grace/force order


class Server(uvicorn.Server):
    """``uvicorn.Server`` with aiograceful's shutdown order (the core server's, shared).

    1. The notice: :attr:`notice` is set (a readiness endpoint reads it) and
       every connection is told (``protocol.shutdown()``); for
       ``drain_delay`` seconds the server still accepts, so that a load
       balancer stops sending first.
    2. Stop accepting without resetting the accept queue: the connections in
       it are accepted, served and told (uvicorn closes its listeners, which
       resets them).
    3. Wait up to ``grace`` seconds (``config.timeout_graceful_shutdown``;
       aiograceful's ``DEFAULT_GRACE`` when that is None, where uvicorn waits
       without a bound) for the connections to close and the tasks to end.
    4. Cancel the tasks still running, as uvicorn does, and let them write
       what they write when cancelled (uvicorn's 500); then close the
       connections still open with a linger of ``force_timeout`` seconds.
    5. Let go of what is still open the plain way (a FIN; the kernel
       delivers what it holds), then the lifespan shutdown.

    WebSockets are told by their protocol's ``shutdown()`` (a close frame,
    1001 by default, see the module's notes) and, when the grace period is
    over, closed. A streaming answer (server-sent events) sees the notice in
    :attr:`notice`: ``await server.notice.wait()`` (or ``is_set()``), then end
    the stream; the grace bounds it, and its last chunk carries the end.
    :attr:`stats` counts how the connections ended, with the shutdown's phase.
    """

    def __init__(
        self,
        config: Config,
        *,
        force_timeout: float = DEFAULT_FORCE_TIMEOUT,
        drain_delay: float = 0.0,
    ) -> None:
        force = check_seconds("force_timeout", force_timeout, allow_none=False)
        delay = check_seconds("drain_delay", drain_delay, allow_none=False)
        assert force is not None
        assert delay is not None
        super().__init__(config)
        self.force_timeout = force
        self.drain_delay = delay
        self._notice = ShutdownNotice()
        self._counters = Counters()
        self._phase = ShutdownPhase.SERVING
        self._shutdown_started: float | None = None
        self._shutdown_ended: float | None = None
        # The shutdown's loop, kept for its clock: ``stats`` is read from other
        # threads too (a metrics scrape), where no loop is running.
        _SERVERS[self.server_state] = self

    @property
    def grace(self) -> float:
        """Seconds the connections get, after the notice, to close themselves."""
        timeout = self.config.timeout_graceful_shutdown
        return DEFAULT_GRACE if timeout is None else float(timeout)

    @property
    def notice(self) -> ShutdownNotice:
        """Set when the shutdown begins (before ``drain_delay``): a readiness probe's flag."""
        return self._notice

    @property
    def stats(self) -> ServerStats:
        """Counts since the server started, with the shutdown's phase (:class:`ServerStats`)."""
        shutdown = (self._shutdown_started, self._shutdown_ended, time.monotonic())
        return self._counters.snapshot(len(self.server_state.connections), self._phase, shutdown)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The shared shutdown order (see the class's notes), then the lifespan shutdown."""
        logger.info("Shutting down")
        self._shutdown_started = time.monotonic()
        self._notice.set()
        await run_shutdown(
            _Target(self, sockets),
            grace=self.grace,
            force_timeout=self.force_timeout,
            drain_delay=self.drain_delay,
            on_phase=self._on_phase,
        )
        self._shutdown_ended = time.monotonic()
        if not self.force_exit:
            await self.lifespan.shutdown()

    def _on_phase(self, phase: ShutdownPhase) -> None:
        self._phase = phase
        if phase is ShutdownPhase.FORCE:
            self._counters.forced += len(self.server_state.connections)


class _Target:
    """uvicorn's server as the shared shutdown sees it (``_shutdown.Shutdownable``)."""

    def __init__(self, server: Server, sockets: list[socket.socket] | None) -> None:
        self.server = server
        self.sockets = sockets
        self.notified: weakref.WeakSet[Any] = weakref.WeakSet()
        self.adopting: list[asyncio.Future[None]] = []

    def accepting(self) -> bool:
        return any(server.is_serving() for server in self.server.servers)

    def handed_off(self) -> asyncio.Event | None:
        return None

    def tell(self) -> None:
        """``shutdown()`` on each connection not yet told (once each)."""
        notified = self.notified
        for connection in list(self.server.server_state.connections):
            if connection not in notified:
                notified.add(connection)
                connection.shutdown()

    async def stop_accepting(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        server = self.server
        sockets = self.sockets
        # uvicorn bound its listeners itself unless it was given them: sockets
        # (its workers, reload, gunicorn's worker) or an inherited --fd.
        owned = not sockets and server.config.fd is None
        queued: list[socket.socket] = []
        for listener in server.servers:
            queued += await close_and_drain(loop, listener, refuse_handshakes=owned)
        for sock in sockets or []:
            sock.close()
        server._counters.drained += len(queued)
        self.adopting = [asyncio.ensure_future(self._adopt(loop, sock)) for sock in queued]

    async def _adopt(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        server = self.server
        config = server.config

        def factory() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=server.server_state,
                app_state=server.lifespan.state,
                _loop=loop,
            )

        try:
            await loop.connect_accepted_socket(factory, sock, ssl=config.ssl)
        except Exception:
            logger.exception("could not serve a connection taken from the accept queue")
            sock.close()
            return
        # Told at once, so that its first answer says Connection: close.
        self.tell()

    def pending(self) -> list[asyncio.Future[Any]]:
        state = self.server.server_state
        self.tell()  # a connection that attached late (uvloop accepts as it attaches)
        waiting: list[asyncio.Future[Any]] = [f for f in self.adopting if not f.done()]
        waiting += state.tasks
        polled = False
        for connection in state.connections:
            end = getattr(connection, "_end", None)
            if isinstance(end, Ending) and not end.detached:
                waiting.append(end.linger.future())
            else:
                polled = True
        if polled:
            # Another protocol (a WebSocket) has no future to wait on: look
            # again shortly, as uvicorn's own shutdown polls.
            waiting.append(asyncio.ensure_future(asyncio.sleep(_POLL)))
        return waiting

    async def force(self, timeout: float) -> None:
        state = self.server.server_state
        tasks = list(state.tasks)
        if tasks:
            logger.error(
                "Cancel %s running task(s), timeout graceful shutdown exceeded", len(tasks)
            )
            for task in tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
            # What a cancelled request writes (uvicorn's 500, when its answer
            # had not started) goes out before its connection is forced.
            await asyncio.wait(tasks, timeout=min(timeout, _CANCEL_WAIT))
        for connection in list(state.connections):
            end = getattr(connection, "_end", None)
            if isinstance(end, Ending):
                end.force(timeout)
            else:
                connection.transport.close()

    def let_go(self) -> None:
        for connection in list(self.server.server_state.connections):
            end = getattr(connection, "_end", None)
            ws_end = getattr(connection, "_ws_end", None)
            if isinstance(end, Ending) and not end.detached:
                end.let_go()
            elif isinstance(ws_end, _WebSocketEnd):
                ws_end.closing = True
                ws_end.linger.let_go()
            else:
                connection.transport.abort()

    async def finish(self) -> None:
        state = self.server.server_state
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=LOST_WAIT)
        for listener in self.server.servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.wait_closed(), LOST_WAIT)


class _Multiprocess(Multiprocess):
    """uvicorn's supervisor (``workers > 1``), stopping its workers once the listener is quiet.

    The workers share the supervisor's listening socket, and the supervisor
    holds it until it exits: once the workers stop accepting, connections
    still complete their handshake into its queue, and the supervisor's exit
    resets them after their clients sent a request (one per client, each
    SIGTERM). So before the workers get their SIGTERM, the kernel socket
    refuses new handshakes (every holder is stopping: there is no sibling to
    turn away), and the workers, still serving, accept what is queued. The
    connections they accept meanwhile inherit the filter, which only drops a
    SYN, for the little time left to them. A listener it was given (``fd=``)
    is left alone.
    """

    def terminate_all(self) -> None:
        # Only a listener it bound itself: one inherited (``fd=``, systemd's)
        # outlives it, and would keep the filter for whoever holds it next.
        owned = self.config.fd is None
        refusing = [sock for sock in self.sockets if owned and refuse_new_handshakes(sock)]
        if refusing:
            time.sleep(HANDSHAKE_SETTLE)  # the handshakes under way join the queue
            deadline = time.monotonic() + _QUEUE_WAIT
            for _ in range(1000):  # bounded by the deadline too
                stats = accept_queue_stats(refusing)
                if stats is None or stats.depth == 0 or time.monotonic() >= deadline:
                    break
                time.sleep(_POLL / 10)
        super().terminate_all()


def protocol_class(http: object) -> object:
    """uvicorn's ``http=`` argument, with its own protocols replaced by aiograceful's.

    "h11" is :class:`H11Protocol`; "httptools" and "auto" are
    :class:`HttpToolsProtocol` where httptools is installed ("auto" falls back
    to :class:`H11Protocol`, as uvicorn's does); anything else is returned as given.
    """
    if http == "h11":
        return H11Protocol
    if http in ("httptools", "auto"):
        if importlib.util.find_spec("httptools") is not None:
            return sys.modules[__name__].HttpToolsProtocol
        if http == "auto":
            return H11Protocol
    return http


def run(
    app: Any,
    *,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    drain_delay: float = 0.0,
    **kwargs: Any,
) -> None:
    """``uvicorn.run(app, **kwargs)`` with aiograceful's protocols and shutdown order.

    Takes ``uvicorn.run``'s arguments. ``http`` ("auto", "h11", "httptools")
    selects aiograceful's protocol for that parser; a class is used as given.
    ``timeout_graceful_shutdown`` is the grace period (``None``: aiograceful's
    ``DEFAULT_GRACE``, 10 s); ``force_timeout`` bounds the close of what is
    still open after it; ``drain_delay`` keeps accepting for that long after
    the notice (see :class:`Server`). With ``reload`` or ``workers > 1`` uvicorn's own
    supervisors run the servers: the protocols are aiograceful's, the shutdown
    order is uvicorn's. With ``workers > 1`` (and ``app`` an import string;
    uvicorn 0.30 and later) the supervisor, before it stops its workers, makes their shared listener
    refuse new handshakes and lets them accept what is queued: uvicorn's own
    (``uvicorn --workers``) resets those connections when it exits.
    """
    check_seconds("force_timeout", force_timeout, allow_none=False)
    check_seconds("drain_delay", drain_delay, allow_none=False)
    kwargs["http"] = protocol_class(kwargs.get("http", "auto"))
    app_dir = kwargs.pop("app_dir", None)
    if app_dir is not None:
        sys.path.insert(0, app_dir)
    config = Config(app, **kwargs)
    if (
        config.workers > 1
        and not config.reload
        and isinstance(app, str)
        and hasattr(Multiprocess, "terminate_all")
    ):
        # uvicorn.run's own steps for its workers, with the supervisor above
        # (uvicorn 0.30 and later: the supervisor that stops its workers with
        # terminate_all; before it, uvicorn.run's own below).
        sockets = [config.bind_socket()]
        if "target" in inspect.signature(Multiprocess.__init__).parameters:
            # uvicorn 0.30 to 0.3x: the supervisor is given its workers' entry point.
            supervisor = _Multiprocess(  # type: ignore[call-arg]
                config, target=uvicorn.Server(config=config).run, sockets=sockets
            )
        else:
            supervisor = _Multiprocess(config, sockets=sockets)
        try:
            supervisor.run()
        except KeyboardInterrupt:
            pass
        finally:
            if config.uds and os.path.exists(config.uds):
                os.remove(config.uds)
        return
    if config.reload or config.workers > 1:
        uvicorn.run(app, **kwargs)  # reload; or an app object, which uvicorn refuses
        return
    # uvicorn.run imports the app before the server starts, so that a bad
    # import string fails at once: with Config.load_app on the uvicorn that
    # has it (0.54); 0.22 to 0.35 import it in Config.load, as the server starts.
    load_app = getattr(config, "load_app", None)
    if load_app is not None:
        load_app()
    server = Server(config, force_timeout=force_timeout, drain_delay=drain_delay)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if config.uds and os.path.exists(config.uds):
            os.remove(config.uds)
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
