"""One connection's end on record: its state, what the kernel says, its watches, its result.

:class:`CloseRecord` is what every connection aiograceful serves carries from
``connection_made`` on: the half-close state machine, the byte counts, the
outcome and the :class:`~aiograceful._options.CloseResult` that
``connection_lost`` completes, what the kernel says of the socket's queues
(``SIOCOUTQ``/``SIOCINQ``, ``TCP_INFO``), and the watches that run before any
close (the idle watch, the wait for quiet). The close proper is its subclass,
:class:`~aiograceful._linger.Linger`: one object per connection either way.

It is its own timer (:class:`~aiograceful._deadlines.Timed`): one deadline on
the loop's shared structure, :meth:`_on_deadline` when due.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, Final, Protocol, Self

from . import _deadlines
from ._deadlines import Timed  # by name: a compiled subclass needs its base so
from ._options import DEFAULT_OPTIONS, CloseOutcome, CloseResult, LingerOptions
from ._socket import (
    INT_ZERO,
    SIOCINQ,
    SIOCOUTQ,
    TCP_CLOSE,
    TCP_FAMILIES,
    TCP_FIN_UNACKED,
    bytes_acked,
    tcp_state,
)
from ._state import Event, HalfCloseMachine, HalfCloseState

if sys.platform != "win32":
    import fcntl


__all__ = ["POLL_FIRST", "CloseRecord", "Waiter"]

# The send side is sampled first after POLL_FIRST seconds, then at doubling
# intervals up to POLL_MAX (and a quarter of the bounds in force), so that a
# close whose last bytes are acknowledged within a round trip costs one
# sample, and a long download a few per second at most.
POLL_FIRST: Final = 0.005

# CloseRecord._sock before the transport's socket has been looked up.
_NOT_YET: Final = object()
_UNPACK_INT: Final = struct.Struct("i").unpack

# Enum members as module constants: Python 3.11's EnumType has a __getattr__, so
# `HalfCloseState.X` is a slow class attribute lookup (about 850 instructions,
# callgrind), about 20 of them per connection on the close's path. A global costs one
# cached dict lookup (and a C variable when compiled).
_CLOSED: Final = HalfCloseState.CLOSED
_CLEAN: Final = CloseOutcome.CLEAN
_ABORTED: Final = CloseOutcome.ABORTED
_IDLE_TIMEOUT: Final = CloseOutcome.IDLE_TIMEOUT
_PEER_RESET: Final = CloseOutcome.PEER_RESET
_ON_LOST: Final = Event.LOST
_ON_PEER_RESET: Final = Event.PEER_RESET


class Waiter(Protocol):
    """One caller's future of the result (``_linger.CloseWaiter``), as the record completes it."""

    def done(self) -> bool: ...
    def set_result(self, result: CloseResult, /) -> None: ...
    def detach(self) -> None:
        """Forget the close: a cancel after the result has nothing to give up."""
        ...


class CloseRecord(Timed):
    """One connection's end: state, kernel queues, watches before a close, result.

    Subclassed by :class:`~aiograceful._linger.Linger`, which adds the close
    and its bounds (:meth:`_arm`, :meth:`_fail`).
    """

    __slots__ = (
        "_acked_at",
        "_acked_mark",
        "_forward",
        "_future",
        "_hard_deadline",
        "_idle_timeout",
        "_on_idle",
        "_on_quiet",
        "_options",
        "_outstanding",
        "_poll",
        "_progress_at",
        "_sock",
        "_sock_unix",
        "_started",
        "_trailing",
        "_waiters",
        "discarded",
        "last_read",
        "loop",
        "machine",
        "on_lost",
        "outcome",
        "result",
        "transport",
        "unacked",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.Transport,
        forward: asyncio.BaseProtocol | None,
        options: LingerOptions | None = None,
    ) -> None:
        self.loop = loop
        self.transport = transport
        self.machine = HalfCloseMachine()
        self._forward = forward
        # The connection's one deadline (Timed): unarmed until a close or a watch.
        self._deadlines = _deadlines.structure_of(loop)
        self._entry = None
        self.when = math.inf
        #: The bounds of a close that starts without begin() (both FINs
        #: exchanged through write_eof()); begin() replaces them.
        self._options: LingerOptions | None = options
        self._started: float | None = None
        # A bound on everything (a server's force); inf until shorten().
        self._hard_deadline = math.inf
        # The send side: when our bytes were last seen acknowledged in full
        # (None: not yet), the last sample of what was outstanding, when it
        # last went down, and the interval to the next sample.
        self._acked_at: float | None = None
        self._outstanding = -1
        # The last sample of tcpi_bytes_acked: the quiet wait's, then a TLS close's.
        self._acked_mark = -1
        self._progress_at = 0.0
        self._poll = POLL_FIRST
        self._idle_timeout: float | None = None
        self._on_idle: Callable[[], bool] | None = None
        self._on_quiet: Callable[[], None] | None = None
        #: Called (synchronously) at the end of :meth:`lost`, once the result is made.
        self.on_lost: Callable[[Self], None] | None = None
        self._future: asyncio.Future[CloseResult] | None = None
        # One caller's waiter (the common case: no list), or a list of them.
        self._waiters: Waiter | list[Waiter] | None = None
        # The transport's socket for the kernel's queue counts, looked up on
        # first use (uvloop makes its socket object then: a getsockname());
        # None where they do not apply (not TCP, not Linux).
        self._sock: Any = _NOT_YET
        self._sock_unix = False
        self._trailing: bytearray | None = None
        self.discarded = 0
        self.last_read = 0.0
        self.outcome: CloseOutcome | None = None
        #: Our bytes the peer had not acknowledged when the socket was closed
        #: (-1 until measured; None where the platform cannot tell).
        self.unacked: int | None = -1
        self.result: CloseResult | None = None

    @property
    def state(self) -> HalfCloseState:
        return self.machine.state

    @property
    def lingering(self) -> bool:
        """True once a graceful close has started (whatever state it reached)."""
        return self._started is not None

    @property
    def timer_armed(self) -> bool:
        """True while this connection's deadline is set."""
        return self._entry is not None

    @property
    def idle_timeout(self) -> float | None:
        """The idle watch's period (:meth:`watch_idle`), or None."""
        return self._idle_timeout

    def future(self) -> asyncio.Future[CloseResult]:
        """The future that ``connection_lost`` completes with the :class:`CloseResult`."""
        fut = self._future
        if fut is None:
            fut = self._future = self.loop.create_future()
            if self.result is not None:
                fut.set_result(self.result)
        return fut

    def outstanding(self) -> tuple[int, bool]:
        """Our bytes not yet acknowledged by the peer, and whether the count is exact.

        The transport's buffer plus the kernel's unacknowledged bytes (our
        FIN, which the kernel counts as one, left out). Where the kernel does
        not tell, only the buffer is counted and the second value is False.
        """
        transport = self.transport
        buffered = transport.get_write_buffer_size()
        queued = self._ioctl(SIOCOUTQ)
        if queued is None:
            return buffered, False
        # Once shutdown(SHUT_WR) has run the kernel counts our FIN as one byte.
        # asyncio calls it as soon as its buffer is empty; uvloop (libuv) when
        # the socket is next writable: so ask the kernel where the FIN is.
        # TCP_CLOSE with a count left is a reset that came while the FIN was
        # unacknowledged: a peer that has closed its socket answers our late
        # FIN with a RST (measured: a third of the closes in which its FIN
        # reached us before ours left, under load), though it had every byte.
        if queued and not buffered and self.machine.eof_written:
            state = tcp_state(transport)
            if state in TCP_FIN_UNACKED or state == TCP_CLOSE:
                queued -= 1
        return buffered + queued, True

    def quiet(self) -> bool:
        """True when nothing is buffered either way: our bytes all acknowledged, none unread.

        On TLS, bytes queued in the TCP transport under the SSL transport are
        invisible: there, quiet also needs ``tcpi_bytes_acked`` unchanged
        since the quiet wait's last sample (which keeps the mark).
        """
        transport = self.transport
        if transport.get_write_buffer_size():
            return False  # no need to ask the kernel
        total, _exact = self.outstanding()
        if total or self.unread():
            return False
        if not transport.can_write_eof():
            progress = bytes_acked(transport)
            if progress is not None and progress[1] != self._acked_mark:
                return False  # still being acknowledged, or not sampled yet
        return True

    def unread(self) -> int | None:
        """Bytes in the kernel's receive queue, not yet read (``SIOCINQ``); None if unknown."""
        return self._ioctl(SIOCINQ)

    def _ioctl(self, request: int | None) -> int | None:
        """One of the kernel's queue counts (``_socket.send_queue``/``receive_queue``)."""
        sock = self._sock
        if sock is _NOT_YET:
            transport = self.transport
            sock = transport.get_extra_info("socket")
            # TCP, and Unix stream sockets for SIOCINQ only: on a Unix socket
            # SIOCOUTQ counts the memory of the buffers the peer has not read
            # (not bytes, and not acknowledgements). An AF_INET/AF_INET6
            # address is a tuple (a Unix one is a str or bytes): that test
            # spares uvloop's socket.family its AddressFamily().
            if SIOCOUTQ is None or sock is None:
                sock = None
            elif transport.get_extra_info("sockname").__class__ is not tuple:
                family = getattr(sock, "family", None)
                if family == socket.AF_UNIX:
                    self._sock_unix = True
                elif family not in TCP_FAMILIES:
                    sock = None
            self._sock = sock
        if sock is None or request is None or (self._sock_unix and request != SIOCINQ):
            return None
        try:
            raw = fcntl.ioctl(sock.fileno(), request, INT_ZERO)
        except (OSError, ValueError):
            # ValueError: asyncio's TransportSocket on a socket closed under it.
            return None
        value: int = _UNPACK_INT(raw)[0]
        return value

    def lost(self: Self, exc: BaseException | None) -> None:
        """``connection_lost`` ran: make the result. Idempotent."""
        machine = self.machine
        if machine.state is _CLOSED:
            return
        if self._entry is not None:
            self.disarm()
        if self.unacked == -1:
            # Not measured when the close ended (the loop closed the transport
            # itself): both loops still hold the socket during connection_lost.
            self._measure()
        outcome = self.outcome
        if exc is not None and outcome in (None, _CLEAN):
            # A close we believed clean failed while flushing, or the peer
            # reset a connection nobody was closing.
            outcome = _PEER_RESET
        elif outcome is None:
            # Nobody here decided how it ended: the app or the loop closed the
            # transport itself. Clean only if nothing of ours was left
            # unacknowledged and nothing unread (which makes close() a RST).
            unacked = self.unacked
            outcome = _ABORTED if (unacked is not None and unacked > 0) or self.unread() else _CLEAN
        started = self._started
        trailing = self._trailing
        result = self.result = CloseResult(
            outcome,
            self.discarded,
            0.0 if started is None else max(0.0, self.loop.time() - started),
            b"" if trailing is None else bytes(trailing),
            self.unacked,
        )
        self.outcome = outcome
        self._trailing = None
        machine.feed(_ON_LOST)
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(result)
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for waiter in waiters if isinstance(waiters, list) else (waiters,):
                waiter.detach()
                if not waiter.done():
                    waiter.set_result(result)
        # The watches' callbacks hold their owner (a server connection, and
        # through it the stream's writer, a key of _streams._LINGERS): drop them.
        self._on_idle = None
        self._on_quiet = None
        # Nothing forwards to the old protocol any more: drop the reference,
        # so that the protocol and this record (which point at each other)
        # are freed by reference counting, not left to the cyclic GC.
        self._forward = None
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost(self)

    def watch_idle(self, idle_timeout: float, on_idle: Callable[[], bool]) -> None:
        """Before any close: call ``on_idle()`` once nothing was read for ``idle_timeout``.

        Reads are reported by setting :attr:`last_read` (a float store; the
        timer re-arms lazily). ``on_idle`` returns True when it acted (started
        a close); False means "not idle after all", and the watch goes on from
        :attr:`last_read`, which ``on_idle`` may have moved.
        """
        self._idle_timeout = idle_timeout
        self._on_idle = on_idle
        self.last_read = self.loop.time()
        self.at(self.last_read + idle_timeout)

    def when_quiet(self, action: Callable[[], None]) -> None:
        """Call ``action()`` once the connection is :meth:`quiet` (now, if it is).

        Sampled by the timer (a few ms at first, backing off to 250 ms) until
        a close starts or the connection ends; a transfer in progress is never
        interrupted by it. A peer that acknowledges none of our bytes for
        ``send_timeout`` while we wait ends it (IDLE_TIMEOUT), as in a close;
        so does a reset (Linux: TCP_INFO, where the loop watches nothing).
        """
        if self._started is not None or not self.machine.live:
            return
        if self.quiet():
            action()
            return
        self._on_quiet = action
        self._poll = POLL_FIRST
        now = self.loop.time()
        self._progress_at = now
        self.at(now + self._poll)

    def _on_watch_timer(self, now: float) -> None:
        """Before any close: the idle watch and the quiet wait."""
        if not self.machine.live:
            return
        on_quiet = self._on_quiet
        if on_quiet is not None:
            if self.quiet():
                self._on_quiet = None
                on_quiet()
                if self._started is not None or not self.machine.live:
                    return
            elif self._quiet_wait_failed(now):
                return
        idle = self._idle_timeout
        on_idle = self._on_idle
        if idle is not None and on_idle is not None and now >= self.last_read + idle:
            if on_idle():
                return
            if self.last_read + idle <= now:
                # Declined with nothing new to go on: look again a full period later.
                self.last_read = now
        self._arm()

    def _quiet_wait_failed(self, now: float) -> bool:
        """The quiet wait's own bound: True if it ended the connection (stalled, or reset)."""
        progress = bytes_acked(self.transport)
        if progress is None:
            return False  # the platform cannot tell: the caller (a server's grace) bounds it
        state, acked = progress
        if state == TCP_CLOSE:
            self._peer_reset()
            return True
        if acked != self._acked_mark:
            self._acked_mark = acked
            self._progress_at = now
        elif self.transport.get_write_buffer_size() or self._ioctl(SIOCOUTQ):
            if now - self._progress_at >= self._opts().send_timeout:
                self._fail(_IDLE_TIMEOUT)
                return True
        else:
            self._progress_at = now  # nothing of ours outstanding: nothing to wait for
        return False

    def _measure(self) -> None:
        """Record what is unacknowledged now, before the socket is closed or reset."""
        total, exact = self.outstanding()
        self.unacked = total if exact else None

    def _peer_reset(self) -> None:
        self.outcome = _PEER_RESET
        self.machine.feed(_ON_PEER_RESET)
        self.transport.abort()

    def __repr__(self) -> str:
        parts = [self.machine.state.name]
        if self._started is not None:
            parts.append(f"discarded={self.discarded}")
            if self._acked_at is None and self.machine.live:
                parts.append(f"outstanding={self._outstanding}")
        if self._entry is not None:
            parts.append(f"deadline={self.when:.3f}")
        if self.outcome is not None:
            parts.append(f"outcome={self.outcome.name}")
        return f"<Linger {' '.join(parts)}>"

    def _opts(self) -> LingerOptions:
        options = self._options
        return DEFAULT_OPTIONS if options is None else options

    # -- what the close (the subclass) provides --------------------------------

    def _arm(self) -> None:
        """Set the one deadline for what is under way (a watch, or the close)."""
        raise NotImplementedError

    def _fail(self, outcome: CloseOutcome) -> None:
        """Give up on grace with ``outcome``."""
        raise NotImplementedError
