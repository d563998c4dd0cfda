"""A drop-in for uvicorn: its own HTTP protocols, changed only in how connections end.

Use it as::

    uvicorn app:app --http aiograceful.uvicorn:H11Protocol
    uvicorn app:app --http aiograceful.uvicorn:HttpToolsProtocol   # httptools installed

or ``uvicorn.Config(app, http=aiograceful.uvicorn.H11Protocol)``, or
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

The knobs are class attributes (``linger``, ``idle_linger``, ``shutdown_quiet``):
subclass to change them and pass the subclass's import string to ``--http``.

WebSocket connections are handed to uvicorn's WebSocket protocol unchanged.
On TLS, asyncio has no half-close: the lingering close reads and discards
until the client closes, then sends close_notify, so a client still
uploading reads the early answer (stock uvicorn's close fails it on asyncio's
loop); a client that half-closes a TLS connection is closed by asyncio
itself, as in stock uvicorn.

Tested with uvicorn 0.54 (the ``aiograceful[uvicorn]`` extra pins it); the
subclasses use uvicorn's protocol attributes (``cycle``, ``conn``, ``flow``,
``transport``), which a later uvicorn may change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import socket
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

import h11
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http import h11_impl

from ._dropin_options import IDLE_LINGER, LINGER, SHUTDOWN_QUIET
from ._h11 import CloseAwareConnection as _Connection
from ._linger import Linger, LingerOptions, check_seconds
from ._listeners import close_and_drain
from ._server import DEFAULT_FORCE_TIMEOUT, DEFAULT_GRACE
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
    "H11Protocol",
    "Server",
    "run",
]

logger: Final = logging.getLogger("uvicorn.error")

# How many times the quiet window is renewed for a request half-received when it ends.
_QUIET_RENEWALS: Final = 3


class _Hooks:
    """What :class:`_End` asks of the protocol it belongs to (both parsers answer)."""

    def _request_active(self) -> bool:
        """A request is being answered (received, or being received)."""
        raise NotImplementedError

    def _request_partial(self) -> bool:
        """Bytes of a request arrived, but not the whole of it."""
        raise NotImplementedError

    def _unread(self) -> bytes:
        """Request bytes received that nobody will read."""
        raise NotImplementedError

    def _want_close(self) -> None:
        """Make the answer in progress (or the next one) carry ``Connection: close``."""
        raise NotImplementedError


@dataclasses.dataclass(eq=False, slots=True)
class _End:
    """How one connection ends: its Linger record, the notice, the quiet window."""

    hooks: _Hooks
    linger: Linger
    options: LingerOptions
    idle_options: LingerOptions
    quiet: float
    closing: bool = False
    notified: bool = False
    detached: bool = False
    quiet_timer: asyncio.TimerHandle | None = None
    renewals: int = 0

    @property
    def peer_eof(self) -> bool:
        return self.linger.machine.peer_eof

    def close(self) -> None:
        """Every close of the connection, whoever asks for it: a lingering close."""
        if self.closing:
            return
        self.closing = True
        self._cancel_quiet()
        if self.detached:
            self.linger.transport.close()
            return
        hooks = self.hooks
        idle = not hooks._request_active() and not hooks._request_partial()
        self.linger.begin(self.idle_options if idle else self.options, unread=hooks._unread())

    def on_peer_eof(self) -> bool:
        """The client half-closed. Returns what ``eof_received`` returns."""
        transport = self.linger.transport
        if self.peer_eof or self.closing or self.detached:
            # uvloop reports the FIN again after resume_reading().
            return transport.can_write_eof()
        self.linger.peer_eof()
        hooks = self.hooks
        if hooks._request_partial():
            # It stopped in the middle of a request: nothing can be answered
            # (uvicorn's own end of such a connection, made graceful).
            self.close()
        elif hooks._request_active():
            # The answer is on its way; the connection ends after it.
            hooks._want_close()
        else:
            self.close()
        # True keeps the transport open for writing after the client's FIN;
        # asyncio closes it on a false return. TLS in asyncio cannot half-close
        # (and warns on True).
        return transport.can_write_eof()

    def notice(self) -> None:
        """uvicorn's shutdown began (``protocol.shutdown()``)."""
        if self.notified or self.closing or self.detached:
            return
        self.notified = True
        hooks = self.hooks
        # The answer in progress says Connection: close if it has not started,
        # and so does every later one. An answer already started keeps the
        # connection: it is idle once it is sent, and then gets its quiet
        # window (see response_done).
        hooks._want_close()
        if not hooks._request_active():
            self._start_quiet()

    def response_done(self) -> None:
        """An answer was sent and the connection stays open (``on_response_complete``)."""
        if self.closing or self.detached:
            return
        if self.peer_eof and not self.hooks._request_active():
            self.close()
        elif self.notified:
            self._start_quiet()

    def force(self, timeout: float) -> None:
        """The grace period is over: close within ``timeout``, however busy."""
        if self.detached:
            return
        linger = self.linger
        if not linger.lingering and linger.machine.live:
            self.closing = True
            self._cancel_quiet()
            linger.begin(dataclasses.replace(self.options, timeout=timeout))
        # The force bounds everything, a download in progress included; what is
        # still open after it is let go by the shutdown's last step.
        linger.shorten(timeout)

    def lost(self, exc: BaseException | None) -> None:
        self.closing = True
        self._cancel_quiet()
        self.linger.lost(exc)

    def _start_quiet(self) -> None:
        if self.quiet_timer is None:
            self.quiet_timer = self.linger.loop.call_later(self.quiet, self._quiet_over)

    def _cancel_quiet(self) -> None:
        timer = self.quiet_timer
        if timer is not None:
            timer.cancel()
            self.quiet_timer = None

    def _quiet_over(self) -> None:
        self.quiet_timer = None
        if self.closing or self.detached:
            return
        hooks = self.hooks
        if hooks._request_active():
            return  # answered with Connection: close; its end closes the connection
        if hooks._request_partial() and self.renewals < _QUIET_RENEWALS:
            self.renewals += 1
            self._start_quiet()
            return
        self.close()


def _new_end(
    protocol: Any, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop
) -> tuple[_End, _Transport]:
    end = _End(
        hooks=protocol,
        linger=Linger(loop, transport, protocol),
        options=protocol.linger,
        idle_options=protocol.idle_linger,
        quiet=protocol.shutdown_quiet,
    )
    return end, _Transport(transport, end)


class _Ending(asyncio.Protocol, _Hooks):
    """How both parsers' connections end: the callbacks that feed the connection's :class:`_End`.

    First among the bases, so that its callbacks run before uvicorn's own
    (each calls ``super()``).
    """

    linger: ClassVar[LingerOptions] = LINGER
    idle_linger: ClassVar[LingerOptions] = IDLE_LINGER
    shutdown_quiet: ClassVar[float] = SHUTDOWN_QUIET

    _end: _End
    loop: asyncio.AbstractEventLoop

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
        end.detached = True
        end._cancel_quiet()
        self.transport = end.linger.transport
        super().handle_websocket_upgrade(event)

    # -- _Hooks --------------------------------------------------------------

    def _request_active(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def _request_partial(self) -> bool:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            return True
        # A body still arriving after an early answer, or the start of the next request.
        return self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])

    def _unread(self) -> bytes:
        data = self.conn.trailing_data[0]
        cycle = self.cycle
        if cycle is not None and cycle.body:
            data = bytes(cycle.body) + data
        return data

    def _want_close(self) -> None:
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
            end.detached = True
            end._cancel_quiet()
            self.transport = end.linger.transport
            super().handle_websocket_upgrade()

        def on_headers_complete(self) -> None:
            before = self.cycle
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is before or cycle is None:
                return  # an upgrade: no request cycle
            end = self._end
            if end.notified or end.peer_eof:
                self._want_close()
            elif cycle.keep_alive and _has_body(self.headers):
                # An answer that starts before the body has arrived says
                # Connection: close (the rest of the body goes to the closer).
                cycle.keep_alive = False
                self._body_pending = cycle

        def on_message_complete(self) -> None:
            super().on_message_complete()
            cycle = self._body_pending
            if cycle is not None and cycle is self.cycle:
                self._body_pending = None
                end = self._end
                if not cycle.response_started and not (end.notified or end.peer_eof):
                    cycle.keep_alive = True

        # -- _Hooks ----------------------------------------------------------

        def _request_active(self) -> bool:
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def _request_partial(self) -> bool:
            # more_body stays True after an early answer: the body is still arriving.
            cycle = self.cycle
            return cycle is not None and cycle.more_body

        def _unread(self) -> bytes:
            cycle = self.cycle
            return bytes(cycle.body) if cycle is not None else b""

        def _want_close(self) -> None:
            # The newest request's answer closes the connection; an older one
            # (pipelined) told so before it keeps the connection for it.
            cycle = self.cycle
            if cycle is None or cycle.response_started:
                return
            old = self._closing_cycle
            if old is not None and old is not cycle and not old.response_started:
                old.keep_alive = True
            self._body_pending = None
            cycle.keep_alive = False
            self._closing_cycle = cycle

else:

    def __getattr__(name: str) -> Any:
        """``HttpToolsProtocol`` without httptools: an ImportError saying what to install."""
        if name == "HttpToolsProtocol":
            raise ImportError(
                "aiograceful.uvicorn.HttpToolsProtocol needs httptools: pip install httptools"
            )
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


# -- the server: uvicorn's, with the accept queue drained and a grace/force order


class Server(uvicorn.Server):
    """``uvicorn.Server`` with aiograceful's shutdown order.

    1. Stop accepting without resetting the accept queue: the connections in
       it are accepted and served (uvicorn closes its listeners, which resets
       them).
    2. The notice: ``protocol.shutdown()`` on every connection, and on each
       one taken from the queue.
    3. Wait up to ``grace`` seconds (``config.timeout_graceful_shutdown``;
       aiograceful's ``DEFAULT_GRACE`` when that is None, where uvicorn waits
       without a bound) for the connections to close and the tasks to end.
    4. Cancel the tasks still running (as uvicorn does); close the
       connections still open with a linger of ``force_timeout`` seconds.
    5. Let go of whatever is still open (a plain close: a FIN, what the kernel
       holds still sent), then the lifespan shutdown.

    Connections of other protocol classes (WebSockets) are told by uvicorn's
    own ``shutdown()`` and, when the grace period is over, closed.
    """

    def __init__(self, config: Config, *, force_timeout: float = DEFAULT_FORCE_TIMEOUT) -> None:
        force = check_seconds("force_timeout", force_timeout, allow_none=False)
        assert force is not None
        super().__init__(config)
        self.force_timeout = force
        self._notified: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def grace(self) -> float:
        """Seconds the connections get, after the notice, to close themselves."""
        timeout = self.config.timeout_graceful_shutdown
        return DEFAULT_GRACE if timeout is None else float(timeout)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting and serve the accept queue, tell every connection, grace, then force."""
        logger.info("Shutting down")
        loop = asyncio.get_running_loop()
        started = loop.time()
        state = self.server_state
        # 1. Tell the open connections (the drain below takes a few
        # milliseconds); stop accepting; take the queue.
        self._notify()
        queued: list[socket.socket] = []
        # uvicorn bound its listeners itself unless it was given them: sockets
        # (its workers, reload, gunicorn's worker) or an inherited --fd.
        owned = not sockets and self.config.fd is None
        for server in self.servers:
            queued += await close_and_drain(loop, server, refuse_handshakes=owned)
        for sock in sockets or []:
            sock.close()
        # 2. The notice, to those that attached meanwhile.
        self._notify()
        for sock in queued:
            await self._adopt(loop, sock)
        # 3. Grace. A connection that attaches late (uvloop accepts as it
        # attaches; one may come in while the queue is adopted) is told too.
        deadline = started + self.grace

        def done() -> bool:
            self._notify()
            return not state.connections and not state.tasks

        await _until(done, deadline, self)
        # 4. Force.
        if state.tasks:
            logger.error(
                "Cancel %s running task(s), timeout graceful shutdown exceeded", len(state.tasks)
            )
            for task in state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        for connection in list(state.connections):
            end = getattr(connection, "_end", None)
            if isinstance(end, _End):
                end.force(self.force_timeout)
            else:
                connection.transport.close()
        await _until(lambda: not state.connections, loop.time() + self.force_timeout + 0.1, None)
        # 5. Let go of the rest.
        for connection in list(state.connections):
            end = getattr(connection, "_end", None)
            if isinstance(end, _End) and not end.detached:
                end.linger.let_go()
            else:
                connection.transport.abort()
        await _until(lambda: not state.connections and not state.tasks, loop.time() + 1.0, None)
        for server in self.servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if not self.force_exit:
            await self.lifespan.shutdown()

    def _notify(self) -> None:
        """``shutdown()`` on each connection not yet told (once each)."""
        notified = self._notified
        for connection in list(self.server_state.connections):
            if connection not in notified:
                notified.add(connection)
                connection.shutdown()

    async def _adopt(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        config = self.config

        def factory() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )

        try:
            await loop.connect_accepted_socket(factory, sock, ssl=config.ssl)
        except Exception:
            logger.exception("could not serve a connection taken from the accept queue")
            sock.close()
            return
        # Told at once, so that its first answer says Connection: close (the
        # grace loop would tell it a moment later otherwise).
        self._notify()


async def _until(done: Callable[[], bool], deadline: float, server: Server | None) -> None:
    """Poll ``done()`` (as uvicorn does, every 0.1 s) until it holds, or ``deadline``."""
    loop = asyncio.get_running_loop()
    for _ in range(1_000_000):  # the bound is the deadline
        if done() or loop.time() >= deadline:
            return
        if server is not None and server.force_exit:
            return
        await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))


def _protocol_class(http: object) -> object:
    """uvicorn's ``http=`` argument, with its own protocols replaced by aiograceful's."""
    if http == "h11":
        return H11Protocol
    if http in ("httptools", "auto"):
        if importlib.util.find_spec("httptools") is not None:
            return sys.modules[__name__].HttpToolsProtocol
        if http == "auto":
            return H11Protocol
    return http


def run(app: Any, *, force_timeout: float = DEFAULT_FORCE_TIMEOUT, **kwargs: Any) -> None:
    """``uvicorn.run(app, **kwargs)`` with aiograceful's protocols and shutdown order.

    Takes ``uvicorn.run``'s arguments. ``http`` ("auto", "h11", "httptools")
    selects aiograceful's protocol for that parser; a class is used as given.
    ``timeout_graceful_shutdown`` is the grace period (``None``: aiograceful's
    ``DEFAULT_GRACE``, 10 s); ``force_timeout`` bounds the close of what is
    still open after it. With ``reload`` or ``workers > 1`` uvicorn's own
    supervisors run the servers: the protocols are aiograceful's, the shutdown
    order is uvicorn's.
    """
    check_seconds("force_timeout", force_timeout, allow_none=False)
    kwargs["http"] = _protocol_class(kwargs.get("http", "auto"))
    app_dir = kwargs.pop("app_dir", None)
    if app_dir is not None:
        sys.path.insert(0, app_dir)
    config = Config(app, **kwargs)
    if config.reload or config.workers > 1:
        uvicorn.run(app, **kwargs)
        return
    config.load_app()
    server = Server(config, force_timeout=force_timeout)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if config.uds and os.path.exists(config.uds):
            os.remove(config.uds)
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
