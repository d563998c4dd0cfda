"""How one connection ends when told, written once: the core server and every drop-in use it.

An :class:`Ending` goes with each connection a server serves. It holds the
connection's close record (:class:`~aiograceful._linger.Linger`) and asks the
server's own connection object (a :class:`Conversation`: the stream
handler's adapter, uvicorn's protocol, aiohttp's request handler...) the few
things only that object knows: is an answer owed, is a request half-received,
what request bytes were read that nobody will use, and how to tell the peer
that the server is going away.

* :meth:`Ending.close`: every close of the connection, whoever asks for it,
  is a lingering close (the idle options when no request is in it).
* :meth:`Ending.on_peer_eof`: the ``eof_received`` decision. The transport
  stays open for writing after the client's FIN when an answer is owed.
* :meth:`Ending.notice`: the shutdown notice, once, and only while the
  connection may still write. The conversation tells the peer; a connection
  idle between requests then gets a quiet window (:data:`QUIET`, about a
  second, nginx's ``keepalive_min_timeout`` is the precedent) so that a
  request already on the wire is answered, and then its graceful close. An
  idle connection never holds a shutdown for its grace.
* :meth:`Ending.force`: the grace is over: close within a bound, however busy.
* :meth:`Ending.let_go`: the force is over too: let go the plain way (a FIN,
  the unsent bytes left to the kernel).
* :meth:`Ending.lost`: ``connection_lost``.

The quiet window's timer is the Ending itself, on the loop's shared deadline
structure (:class:`~aiograceful._deadlines.Timed`): no loop handle per
connection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Final, Protocol

from . import _deadlines
from ._linger import Linger
from ._options import LingerOptions, logger
from ._socket import TCPI_LAST_DATA_RECV, TCPI_LAST_DATA_SENT, tcp_info_u32

__all__ = ["QUIET", "QUIET_RENEWALS", "Conversation", "Ending"]

#: Seconds an idle connection stays open after the shutdown notice, so that a
#: request already on the wire is answered rather than lost.
QUIET: Final = 1.0
#: How many more windows of silence a request half-received gets before it counts
#: as a stall. (While bytes move, windows are renewed without a count: the grace
#: bounds a slow request.)
QUIET_RENEWALS: Final = 3
# Traffic in the first moments of a window (the answer that began it) is not
# traffic during the window.
_WINDOW_SLACK: Final = 0.1


class Conversation(Protocol):
    """What an :class:`Ending` asks of the server's connection object."""

    def request_active(self) -> bool:
        """An answer is owed: a request was received and is being answered."""
        ...

    def request_partial(self) -> bool:
        """Bytes of a request arrived, but not the whole of it."""
        ...

    def unread(self) -> bytes:
        """Take the request bytes received that nobody will read (they go to the closer)."""
        ...

    def tell(self) -> None:
        """The shutdown notice in protocol terms (``Connection: close``, a GOAWAY, a hook)."""
        ...


class _Gone:
    """The conversation of a connection that has ended: nothing owed, nothing to tell."""

    __slots__ = ()

    def request_active(self) -> bool:
        return False

    def request_partial(self) -> bool:
        return False

    def unread(self) -> bytes:
        return b""

    def tell(self) -> None:
        return None


_GONE: Final = _Gone()


class Ending(_deadlines.Timed):
    """How one connection ends: its close record, the notice, the quiet window, the force."""

    __slots__ = (
        "_window_from",
        "closing",
        "conversation",
        "detached",
        "idle_options",
        "linger",
        "notified",
        "options",
        "quiet",
        "renewals",
    )

    def __init__(
        self,
        linger: Linger,
        conversation: Conversation,
        options: LingerOptions,
        idle_options: LingerOptions | None = None,
        quiet: float = QUIET,
    ) -> None:
        self._deadlines = _deadlines.structure_of(linger.loop)
        self._entry = None
        self.when = math.inf
        self.linger = linger
        self.conversation = conversation
        #: The close of a connection with a request in it.
        self.options = options
        #: The close of an idle one (no request in it).
        self.idle_options = options if idle_options is None else idle_options
        self.quiet = quiet
        #: True once a close began (by anyone): writes are dropped from then on.
        self.closing = False
        self.notified = False
        #: The connection was handed to another protocol (a WebSocket upgrade
        #: in a drop-in): that protocol ends it its own way.
        self.detached = False
        self.renewals = 0
        self._window_from = 0.0

    # -- queries -----------------------------------------------------------------

    @property
    def peer_eof(self) -> bool:
        """True once the peer's FIN arrived."""
        return self.linger.machine.peer_eof

    def writable(self) -> bool:
        """True while a notice may be written: no close under way, our FIN not sent."""
        linger = self.linger
        machine = linger.machine
        return (
            not self.closing
            and machine.live
            and not linger.lingering
            and not machine.eof_written
            and not linger.transport.is_closing()
        )

    # -- what the server's connection reports -------------------------------------

    def close(self) -> None:
        """Every close of the connection, whoever asks for it: a lingering close. Idempotent."""
        if self.closing:
            return
        self.closing = True
        self.disarm()
        if self.detached:
            self.linger.transport.close()
            return
        conversation = self.conversation
        idle = not conversation.request_active() and not conversation.request_partial()
        self.linger.begin(self.idle_options if idle else self.options, unread=conversation.unread())

    def on_peer_eof(self) -> bool:
        """The client half-closed (``eof_received``); returns what ``eof_received`` returns.

        A request cut in the middle cannot be answered: close. An answer owed
        is given, with ``Connection: close`` (the conversation is told), and
        the connection ends after it. Nothing owed: close.
        """
        transport = self.linger.transport
        if self.peer_eof or self.closing or self.detached:
            # uvloop reports the FIN again after resume_reading().
            return transport.can_write_eof()
        self.linger.peer_eof()
        conversation = self.conversation
        if not conversation.request_partial() and conversation.request_active():
            self._tell()
        else:
            self.close()
        # True keeps the transport open for writing after the client's FIN
        # (asyncio closes it on a false return). TLS in asyncio and uvloop
        # cannot half-close (and asyncio warns on True): False there.
        return transport.can_write_eof()

    def response_done(self) -> None:
        """An answer was sent and the connection stays open for the next request."""
        if self.closing or self.detached:
            return
        if self.peer_eof and not self.conversation.request_active():
            self.close()
        elif self.notified:
            self._start_window()

    def notice(self) -> None:
        """The server is shutting down: tell the peer (once, only while writable); quiet window."""
        if self.notified or self.detached:
            return
        self.notified = True
        if not self.writable():
            return
        self._tell()
        if self.closing:
            return
        # Armed busy or not: a connection busy now is looked at again each
        # window, and closes once a whole window passes with nothing moving.
        self._start_window()

    def force(self, timeout: float) -> None:
        """The grace is over: close within ``timeout`` seconds, a transfer in progress included."""
        if self.detached:
            return
        self.disarm()
        linger = self.linger
        if not linger.lingering and linger.machine.live:
            self.closing = True
            linger.begin(
                dataclasses.replace(self.options, timeout=timeout),
                unread=self.conversation.unread(),
            )
        linger.shorten(timeout)

    def let_go(self) -> None:
        """The force is over: let go the plain way (a FIN; the kernel delivers what it holds)."""
        self.closing = True
        self.disarm()
        self.linger.let_go()

    def detach(self) -> None:
        """Another protocol takes the connection over (a WebSocket upgrade): hands off."""
        self.detached = True
        self.disarm()

    def lost(self, exc: BaseException | None) -> None:
        """``connection_lost``: the close record makes its result."""
        self.linger.lost(exc)
        self.release()

    def release(self) -> None:
        """The connection is gone: drop the timer and the conversation (they point back here).

        Called on ``connection_lost``, however the close record learnt of it,
        so that the connection is freed by reference counting, not left to
        the cyclic garbage collector.
        """
        self.closing = True
        self.disarm()
        self.conversation = _GONE

    # -- internals -------------------------------------------------------------

    def _tell(self) -> None:
        try:
            self.conversation.tell()
        except Exception:
            logger.exception("the shutdown notice of %r raised; closing", self.conversation)
            self.close()

    def _start_window(self) -> None:
        """A quiet window from now (a new one replaces one already running)."""
        now = self.linger.loop.time()
        self._window_from = now
        self.disarm()
        self.at(now + self.quiet)

    def _on_deadline(self) -> None:
        """The quiet window is over: close if the connection stayed idle, else look again."""
        self._entry = None
        self.when = math.inf
        if self.closing or self.detached or not self.linger.machine.live:
            return
        conversation = self.conversation
        if conversation.request_active() or self._moved():
            # Being answered (with Connection: close, once told), or bytes
            # moved either way in the window (a request arriving, however
            # slowly; an answer going out): never cut; the grace bounds it.
            self._start_window()
            return
        if conversation.request_partial():
            # A request stopped arriving halfway: a few more windows of
            # silence, then it is a stall (slowloris), and closes.
            if self.renewals < QUIET_RENEWALS:
                self.renewals += 1
                self._start_window()
                return
        elif self.linger.unread():
            self._start_window()  # bytes in the kernel's queue, not yet read: a request
            return
        self.close()

    def _moved(self) -> bool:
        """True if a byte moved either way since the window began.

        What the server's connection recorded (``linger.last_read``: the
        core's streams count their reads and writes), else what the kernel
        says (TCP_INFO's time since data was last sent and received, Linux
        TCP), since a drop-in's reads go through its server's own protocol.
        """
        linger = self.linger
        if linger.last_read > self._window_from:
            return True
        info = tcp_info_u32(
            linger.transport.get_extra_info("socket"), TCPI_LAST_DATA_SENT, TCPI_LAST_DATA_RECV
        )
        if info is None:
            # The kernel cannot tell (a Unix socket, not Linux): something
            # buffered either way counts as moving.
            return not linger.quiet()
        window = linger.loop.time() - self._window_from
        # (A window that began with an answer written: that answer's segments
        # left within a few milliseconds of the start, and do not count.)
        return min(info) / 1000.0 < window - _WINDOW_SLACK

    def __repr__(self) -> str:
        parts = []
        if self.notified:
            parts.append("notified")
        if self.closing:
            parts.append("closing")
        if self.detached:
            parts.append("detached")
        if self._entry is not None:
            parts.append(f"quiet_until={self.when:.3f}")
        return f"<Ending {' '.join(parts) or 'open'} {self.linger!r}>"
