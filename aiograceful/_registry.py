"""The core server's live connections: attach, reject, count, and what a shutdown does to them.

:class:`Registry` is the :class:`~aiograceful._connections.Host` the adapters
attach to, and the connection half of the
:class:`~aiograceful._shutdown.Shutdownable` that :class:`GracefulServer`
hands to the shutdown (the server adds the listeners). Connections are keyed
by their close record (:class:`~aiograceful._linger.Linger`), whose
``on_lost`` detaches them and counts their result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from ._connections import Connection, Host, ProtocolConnection, Settings
from ._linger import Linger
from ._options import logger
from ._protocol import GracefulProtocol
from ._shutdown import LOST_WAIT, ShutdownNotice
from ._stats import Counters

__all__ = ["Registry"]


class Registry(Host):
    """The server's connections and tasks, its counters, and the limit."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        notice: ShutdownNotice,
        *,
        max_connections: int | None = None,
        protocol_factory: Callable[[], GracefulProtocol] | None = None,
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.notice = notice
        self.counters = Counters()
        self.max_connections = max_connections
        self._protocol_factory = protocol_factory
        self.conns: dict[Linger, Connection] = {}
        self.rejected_live: set[Linger] = set()
        self.tasks: set[asyncio.Future[Any]] = set()
        #: The connections a shutdown reports on (set when one begins).
        self.report: set[Linger] | None = None
        #: Set once the listeners stop and the queue is drained: from then on
        #: no connection is rejected (the kernel accepted them all before the
        #: shutdown reached them). During drain_delay the limit holds.
        self.draining = False
        #: Set once the grace is over: a connection attaching later is forced at once.
        self.forced_with: float | None = None

    # -- Host ----------------------------------------------------------------------

    def admit(self) -> bool:
        limit = self.max_connections
        return limit is None or self.draining or len(self.conns) < limit

    def attach(self, conn: Connection) -> None:
        linger = conn.ending.linger
        self.conns[linger] = conn
        linger.on_lost = self.detach
        idle = self.settings.idle_timeout
        if idle is not None:
            linger.watch_idle(idle, conn.idle)
        if self.notice.is_set():
            # Accepted while shutting down (during drain_delay, drained from
            # the queue, or in flight when the listener closed): it joins.
            if self.report is not None:
                self.report.add(linger)
            self.loop.call_soon(conn.notify)
            forced = self.forced_with
            if forced is not None:
                # Too late for grace (a TLS handshake that ended after it,
                # say): the notice, then the force linger, so it is bounded.
                self.loop.call_soon(conn.force, forced)

    def attach_protocol(self, protocol: GracefulProtocol) -> None:
        """A user's protocol made its close record (``connection_made``): attach it."""
        linger = protocol._graceful
        assert linger is not None
        self.attach(ProtocolConnection(protocol, linger, self.settings))

    def detach(self, linger: Linger) -> None:
        """``connection_lost`` ran (``Linger.on_lost``): forget the connection, count it."""
        conn = self.conns.pop(linger, None)
        if conn is not None:
            conn.ending.release()
        self.counters.count(linger.result)

    def reject(self, transport: asyncio.Transport) -> None:
        """Turn away a connection over the limit: ``on_reject`` writes the rejection; linger."""
        settings = self.settings
        linger = Linger(self.loop, transport, None, settings.linger)
        self.rejected_live.add(linger)
        linger.on_lost = self._rejected_lost
        self.counters.rejected += 1
        hook = settings.on_reject
        if hook is not None:
            try:
                hook(transport)
            except Exception:
                logger.exception("on_reject hook %r raised", hook)
        linger.begin(settings.linger)

    def _rejected_lost(self, linger: Linger) -> None:
        self.rejected_live.discard(linger)
        self.counters.count(linger.result)

    def track(self, fut: asyncio.Future[Any]) -> None:
        self.tasks.add(fut)
        fut.add_done_callback(self.tasks.discard)

    def new_protocol(self) -> GracefulProtocol:
        factory = self._protocol_factory
        assert factory is not None
        proto = factory()
        if not isinstance(proto, GracefulProtocol):
            raise TypeError(
                f"protocol_factory must return a GracefulProtocol, got {type(proto).__name__}"
            )
        proto._linger_options = self.settings.linger
        proto._graceful_attach = self.attach_protocol
        return proto

    # -- the shutdown's view -----------------------------------------------------------

    def begin_report(self) -> None:
        """A shutdown begins: the connections open now are the ones it reports on."""
        if self.report is None:
            self.report = set(self.conns)

    def everyone(self) -> Iterator[Linger]:
        """Every connection open now or reported on, rejected ones included."""
        yield from self.report or ()
        yield from self.conns
        yield from self.rejected_live

    def tell(self) -> None:
        """The notice to every connection (each one tells its peer once)."""
        for conn in list(self.conns.values()):
            conn.notify()

    def pending(self) -> list[asyncio.Future[Any]]:
        """The ends still awaited: reported connections, those open, rejected ones."""
        return [linger.future() for linger in set(self.everyone()) if linger.result is None]

    def force(self, timeout: float) -> None:
        """The grace is over: each connection still open closes within ``timeout``."""
        self.forced_with = timeout
        for linger in list(self.report or ()):
            if linger.result is None:
                self.counters.forced += 1
        for conn in list(self.conns.values()):
            conn.force(timeout)
        for linger in list(self.rejected_live):
            linger.shorten(timeout)

    def let_go(self) -> None:
        """The force is over: let go of what is left, the plain way."""
        for linger in set(self.everyone()):
            if linger.result is None:
                conn = self.conns.get(linger)
                if conn is not None:
                    conn.ending.let_go()
                else:
                    linger.let_go()

    async def finish(self) -> None:
        """Wait (bounded) for the server's tasks, handlers included; cancel what is left.

        A handler may go on after its connection ended (the peer closed, the
        handler still works): it is one of the server's tasks all the same,
        and none may be left pending when the shutdown returns.
        """
        tasks = [t for t in self.tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=LOST_WAIT)
        left = [t for t in tasks if not t.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=LOST_WAIT)

    def __repr__(self) -> str:
        return f"<Registry connections={len(self.conns)} rejected={len(self.rejected_live)}>"
