"""A drop-in for hypercorn (asyncio worker, HTTP/1.1): ``await serve(app, config)``.

``aiograceful.hypercorn.serve`` has ``hypercorn.asyncio.serve``'s signature and
runs hypercorn's own server, with its connection class (``TCPServer``)
replaced by a subclass that changes only how connections end:

* Every close is a lingering close. hypercorn ends a connection with
  ``write_eof()`` then ``close()``; when the client is still sending (an
  upload answered early with a 413), Linux then resets the connection and the
  client loses the answer (BrokenPipeError after 3.1 MiB of 16 MiB, measured).
  Here the close is :func:`aiograceful.graceful_close`: the rest of the body is
  read and discarded until the client's FIN, bounded by :data:`LINGER`.
* An early answer (the request body still arriving) says ``Connection: close``.
* The shutdown notice. hypercorn closes idle keep-alive connections as soon as
  the shutdown begins, and ends busy ones after their answer without telling
  the client. Here every answer after the notice says ``Connection: close``,
  and an idle connection gets a quiet window of :data:`SHUTDOWN_QUIET` seconds
  (a request already on the wire is answered), then closes gracefully.
* ``config.graceful_timeout`` stays the grace period: the lingering closes
  still open when it ends (hypercorn cancels the connections' tasks) let go, as
  a plain close does (a FIN; what the kernel holds is still sent).

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
last ``serve`` returns). HTTP/2 and WebSocket connections get the lingering
close but not the header.
Tested with hypercorn 0.18 (the ``aiograceful[hypercorn]`` extra pins it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, Literal

import h11
import hypercorn.asyncio
import hypercorn.asyncio.run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.typing import Framework

from ._accept import close_and_drain
from ._dropin_options import LINGER, SHUTDOWN_QUIET
from ._h11 import CloseAwareConnection
from ._options import LingerOptions, logger
from ._streams import graceful_close, let_go

__all__ = ["LINGER", "SHUTDOWN_QUIET", "GracefulTCPServer", "serve"]


class _NoticeConnection(CloseAwareConnection):
    """h11's connection that also says ``Connection: close`` once the worker is terminating."""

    terminated: Any = None  # hypercorn's WorkerContext.terminated event

    def wants_close(self) -> bool:
        terminated = self.terminated
        return terminated is not None and bool(terminated.is_set())


class GracefulTCPServer(TCPServer):
    """hypercorn's ``TCPServer`` (one connection), ending the connection gracefully.

    Class attributes: ``linger`` (the :class:`~aiograceful.LingerOptions` of
    every close, :data:`LINGER`: hypercorn's close does not say whether the
    connection was idle) and ``shutdown_quiet`` (:data:`SHUTDOWN_QUIET`).
    """

    linger: LingerOptions = LINGER
    shutdown_quiet: float = SHUTDOWN_QUIET

    _closing: asyncio.Future[Any] | None = None

    async def _read_data(self) -> None:
        # Runs once the protocol exists and before any byte is read: give an
        # HTTP/1.1 connection the h11 connection that adds the header (made as
        # hypercorn makes its own).
        inner = getattr(self.protocol, "protocol", None)
        if isinstance(inner, H11Protocol) and not isinstance(inner.connection, _NoticeConnection):
            conn = _NoticeConnection(
                h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
            )
            conn.terminated = self.context.terminated
            inner.connection = conn
        await super()._read_data()

    async def protocol_send(self, event: Event) -> None:
        """hypercorn's event sink, with every connection end made a graceful close."""
        if isinstance(event, Closed) and self._answered_before_notice():
            # hypercorn ends a reusable connection once the worker terminates,
            # even after an answer that started before the notice and so did
            # not say Connection: close: the client would send its next
            # request into the close. Keep it, idle, for its quiet window.
            await self.idle_task.restart(self._task_group, self._idle_timeout)
            return
        if isinstance(event, Updated) and event.idle and self.reader.at_eof():
            # Answered, and the client had half-closed: no request can
            # follow. (hypercorn would keep it for its keep-alive timeout.)
            self._start_close()
            return
        if isinstance(event, Closed):
            # Start the close, without waiting for it here: this runs inside
            # the application's last send(), which must not wait for the linger.
            self._start_close()
            return
        await super().protocol_send(event)

    def _answered_before_notice(self) -> bool:
        """After an answer without ``Connection: close``, the worker is terminating: recycle."""
        inner = getattr(self.protocol, "protocol", None)
        if not isinstance(inner, H11Protocol) or inner.stream is not None:
            return False
        conn = inner.connection
        if not isinstance(conn, h11.Connection) or self._closing is not None:
            return False
        if not self.context.terminated.is_set():
            return False
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        inner.response = None
        inner.scope = None
        return True

    def _start_close(self) -> asyncio.Future[Any]:
        closing = self._closing
        if closing is None:
            closing = self._closing = asyncio.ensure_future(
                graceful_close(
                    self.writer,
                    timeout=self.linger.timeout,
                    idle_timeout=self.linger.idle_timeout,
                    max_discard=self.linger.max_discard,
                    reset_on_failure=self.linger.reset_on_failure,
                    send_timeout=self.linger.send_timeout,
                )
            )
            # The result is the close's own business; never "never retrieved".
            closing.add_done_callback(_consume)
        return closing

    async def _close(self) -> None:
        try:
            await asyncio.shield(self._start_close())
        except asyncio.CancelledError:
            # hypercorn's graceful_timeout ran out: grace is over, let go.
            let_go(self.writer)
            raise
        except OSError:
            pass
        finally:
            await self.idle_task.stop()

    async def _initiate_server_close(self) -> None:
        await self.protocol.handle(Closed())
        self._start_close()

    async def _idle_timeout(self) -> None:
        terminated = self.context.terminated
        try:
            # Not wait_for(), as hypercorn has it: on 3.11 wait_for() returns
            # the result when a cancel comes in the same step as the event,
            # and this task is cancelled exactly when a request arrives. It
            # then slept through the quiet window while the request waited.
            async with asyncio.timeout(self.config.keep_alive_timeout):
                await terminated.wait()
        except TimeoutError:
            pass
        else:
            # The notice: a request already on the wire is answered (its
            # arrival cancels this task) with Connection: close.
            await asyncio.sleep(self.shutdown_quiet)
        await asyncio.shield(self._initiate_server_close())


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


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
    accept queue. Here ``close()`` stops accepting without closing the kernel
    socket (:func:`~aiograceful._accept.close_and_drain`), and the queued
    connections are served as hypercorn serves the others (its own
    connection callback, the same TLS context): they are accepted after the
    worker began terminating, so each is told (``Connection: close``, the
    quiet window). ``wait_closed()`` returns once they are being served, so
    hypercorn's graceful wait covers them.
    """

    def __init__(
        self,
        server: asyncio.Server,
        callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        ssl: Any,
        ssl_handshake_timeout: float | None,
        refuse_handshakes: bool = False,
    ) -> None:
        self._server = server
        self._refuse_handshakes = refuse_handshakes
        self._callback = callback
        self._ssl = ssl
        self._handshake_timeout = ssl_handshake_timeout
        self._draining: asyncio.Future[None] | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (``asyncio.Server.sockets``)."""
        return tuple(self._server.sockets)

    def close(self) -> None:
        """Stop accepting; the queued connections are taken and served (idempotent)."""
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())

    async def wait_closed(self) -> None:
        """Wait until the queue is drained and its connections are served, then for the server."""
        self.close()
        assert self._draining is not None
        await asyncio.shield(self._draining)
        await self._server.wait_closed()

    def is_serving(self) -> bool:
        """``asyncio.Server.is_serving()``."""
        return self._server.is_serving()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        queued = await close_and_drain(
            loop, self._server, refuse_handshakes=self._refuse_handshakes
        )
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
        callback = self._callback

        def factory() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
            return asyncio.StreamReaderProtocol(reader, callback, loop=loop)

        kwargs: dict[str, Any] = {}
        if self._ssl is not None:
            kwargs["ssl"] = self._ssl
            if self._handshake_timeout is not None:
                kwargs["ssl_handshake_timeout"] = self._handshake_timeout
        # A cancel (the handshake took too long) needs nothing here: the
        # transport exists already and owns the socket; the loop closes it.
        try:
            await loop.connect_accepted_socket(factory, sock, **kwargs)
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
    server = await asyncio.start_server(client_connected_cb, host, port, **kwargs)
    return _DrainingServer(
        server,
        client_connected_cb,
        kwargs.get("ssl"),
        kwargs.get("ssl_handshake_timeout"),
        _OWNS_LISTENERS.get(),
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
) -> None:
    """``hypercorn.asyncio.serve(app, config, ...)``, with connections that end gracefully.

    Its shutdown also drains the listeners' accept queues: the connections
    queued when hypercorn closes its listeners are served (and told), not reset.
    Listeners it binds itself refuse new handshakes for the drain's last
    moments (:func:`~aiograceful._accept.close_and_drain`); an ``fd://``
    bind's socket is another process's too, and is left as it is.
    """
    binds = [*config.bind, *config.insecure_bind, *config.quic_bind]
    token = _OWNS_LISTENERS.set(not any(bind.startswith("fd://") for bind in binds))
    try:
        with _installed_server():
            await hypercorn.asyncio.serve(app, config, shutdown_trigger=shutdown_trigger, mode=mode)
    finally:
        _OWNS_LISTENERS.reset(token)
