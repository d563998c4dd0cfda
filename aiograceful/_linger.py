"""The lingering closer: flush, half-close, discard until the peer's FIN, bounded.

One :class:`Linger` record goes with each connection (created by
``GracefulProtocol.connection_made``, or by ``graceful_close`` for a stream).
It owns the connection's :class:`~aiograceful._state.HalfCloseMachine`, its one
timer handle, the byte counts and the outcome, and it turns
``connection_lost`` into a :class:`CloseResult`.

While lingering, the transport's protocol is swapped (``transport.set_protocol``)
for a :class:`_Discarder`, a ``BufferedProtocol`` that counts what the peer
still sends into a scratch buffer and drops it. The user's ``data_received`` is
never wrapped; the discarder forwards ``connection_lost`` and the flow-control
callbacks to the protocol it replaced, so a stream's ``wait_closed()`` and a
``GracefulProtocol``'s ``connection_lost`` still run.

Defaults, beside the servers that linger in C:

==================  =========================  ===================  ==================
                    aiograceful                nginx                Apache httpd
==================  =========================  ===================  ==================
total linger time   ``timeout`` 30 s           lingering_time 30 s  30 s (MAX_SECS)
peer silent         ``idle_timeout`` 5 s       lingering_timeout 5s 2 s (SECONDS_TO_LINGER)
bytes discarded     ``max_discard`` 64 MiB     no cap               no cap
==================  =========================  ===================  ==================

The byte cap is ours: a peer can otherwise keep a lingering connection busy for
the whole ``timeout`` at line rate. 64 MiB is far above any request a server
answers early (a 413 for an upload, a 503 at a limit), so the client that is
still sending its body reads the reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
from collections.abc import Callable
from typing import Any, Final

from . import _deadlines
from ._socket import reset, shutdown_error
from ._state import Event, HalfCloseMachine, HalfCloseState

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_DISCARD",
    "DEFAULT_TIMEOUT",
    "UNSET",
    "CloseOutcome",
    "CloseResult",
    "CloseWaiter",
    "DeadlineTimer",
    "Linger",
    "LingerOptions",
    "logger",
]

logger: Final = logging.getLogger("aiograceful")

DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_IDLE_TIMEOUT: Final = 5.0
DEFAULT_MAX_DISCARD: Final = 64 * 1024 * 1024

# One scratch buffer for every discarding connection: the bytes are dropped as
# soon as buffer_updated() returns, so sharing it costs nothing and keeps a
# lingering connection at a few hundred bytes. (Loops in other threads may
# write into it at the same time; what lands there is never read.)
_SCRATCH_SIZE: Final = 64 * 1024
_SCRATCH: Final = memoryview(bytearray(_SCRATCH_SIZE))


class CloseOutcome(enum.Enum):
    """How a graceful close ended."""

    #: The peer's FIN was seen: everything we wrote was delivered in order.
    CLEAN = "clean"
    #: The total linger time (``timeout``) ran out.
    TIMEOUT = "timeout"
    #: The peer sent nothing for ``idle_timeout`` while we lingered.
    IDLE_TIMEOUT = "idle-timeout"
    #: The peer sent more than ``max_discard`` bytes while we lingered.
    OVERFLOW = "overflow"
    #: The peer reset the connection (or it failed under us).
    PEER_RESET = "peer-reset"
    #: A local ``abort()`` (or a cancelled close) ended it with a RST.
    ABORTED = "aborted"


@dataclasses.dataclass(frozen=True, slots=True)
class CloseResult:
    """What a close did.

    ``discarded`` counts the bytes the peer sent that nobody read: read and
    dropped while lingering, plus what the stream's buffer held unread when the
    close began. ``trailing`` holds the peer's bytes instead, when
    ``keep_trailing`` asked for them (up to ``max_discard``). ``duration`` runs
    from the start of the close to ``connection_lost``; it is 0.0 when the
    connection ended without a close being started (a reset, say).
    """

    outcome: CloseOutcome
    discarded: int
    duration: float
    trailing: bytes = b""

    @property
    def clean(self) -> bool:
        """True when the outcome is :attr:`CloseOutcome.CLEAN`."""
        return self.outcome is CloseOutcome.CLEAN


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: Sentinel: "use the connection's configured default" in ``close_gracefully``.
UNSET: Final = _Unset.UNSET


def check_seconds(name: str, value: object, *, allow_none: bool) -> float | None:
    """Validate a time argument: a finite number >= 0 (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        what = "a number of seconds or None" if allow_none else "a number of seconds"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True, slots=True)
class LingerOptions:
    """How long and how much a graceful close may linger.

    * ``timeout``: total seconds from the start of the close to the end of the
      connection (never ``None``: a graceful close is always bounded).
    * ``idle_timeout``: seconds the peer may stay silent while we linger;
      ``None`` for no idle limit (``timeout`` still applies).
    * ``max_discard``: bytes the peer may still send; ``None`` for no cap.
    * ``reset_on_failure``: end every outcome other than CLEAN with a RST
      (SO_LINGER {1, 0}); when False the socket is simply closed (the kernel
      still resets it if unread bytes are queued).

    Construction validates every field and raises ``TypeError``/``ValueError``
    naming the field.
    """

    timeout: float = DEFAULT_TIMEOUT
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    max_discard: int | None = DEFAULT_MAX_DISCARD
    reset_on_failure: bool = True

    def __post_init__(self) -> None:
        timeout = check_seconds("timeout", self.timeout, allow_none=False)
        idle = check_seconds("idle_timeout", self.idle_timeout, allow_none=True)
        cap = self.max_discard
        if cap is not None:
            if isinstance(cap, bool) or not isinstance(cap, int):
                raise TypeError(f"max_discard must be an int or None, got {type(cap).__name__}")
            if cap < 0:
                raise ValueError(f"max_discard must be >= 0, got {cap}")
        if not isinstance(self.reset_on_failure, bool):
            raise TypeError(
                f"reset_on_failure must be a bool, got {type(self.reset_on_failure).__name__}"
            )
        object.__setattr__(self, "timeout", timeout)
        object.__setattr__(self, "idle_timeout", idle)


def check_final(final: object) -> bytes:
    """Validate a ``final`` argument; return it as bytes."""
    if not isinstance(final, bytes | bytearray | memoryview):
        raise TypeError(f"final must be bytes-like, got {type(final).__name__}")
    return bytes(final)


def check_flag(name: str, value: object) -> bool:
    """Validate a boolean keyword argument."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class DeadlineTimer:
    """One ``loop.call_at`` handle, re-armed lazily.

    :meth:`at` only reschedules when the new deadline is *earlier* than the
    armed one. A later deadline (an idle timer pushed back by a read) is left to
    the callback: it fires early, finds the real deadline still ahead and
    calls :meth:`at` again. So a busy connection costs a float store per read,
    not a heap operation.
    """

    __slots__ = ("_callback", "_handle", "_loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self.when = math.inf

    @property
    def armed(self) -> bool:
        """True while a handle is scheduled."""
        return self._handle is not None

    def at(self, when: float) -> None:
        """Make sure the callback runs no later than ``when`` (loop time)."""
        handle = self._handle
        if handle is not None:
            if when >= self.when:
                return
            handle.cancel()
        self.when = when
        # The timer itself is the callback (see __call__): no bound method
        # is allocated per arming.
        self._handle = self._loop.call_at(when, self)

    def cancel(self) -> None:
        """Cancel the handle, if any, and drop the reference to it."""
        handle = self._handle
        if handle is not None:
            handle.cancel()
            self._handle = None
            self.when = math.inf

    def __call__(self) -> None:
        self._handle = None
        self.when = math.inf
        self._callback()

    def __repr__(self) -> str:
        if self._handle is None:
            return "<DeadlineTimer unarmed>"
        return f"<DeadlineTimer when={self.when:.3f}>"


class _Discarder(asyncio.BufferedProtocol):
    """The protocol a transport talks to while its connection lingers."""

    __slots__ = ("_forward", "_linger")

    def __init__(self, linger: Linger, forward: asyncio.BaseProtocol | None) -> None:
        self._linger = linger
        self._forward = forward

    @property
    def linger(self) -> Linger:
        return self._linger

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._linger.scratch

    def buffer_updated(self, nbytes: int) -> None:
        self._linger.on_read(nbytes)

    def eof_received(self) -> bool:
        self._linger.peer_eof()
        # peer_eof() has already started the close; False tells the transport
        # the same thing (and keeps asyncio's TLS transport from warning that
        # True "has no effect when using ssl").
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._linger.lost(exc)
        forward = self._forward
        if forward is not None:
            self._forward = None
            forward.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._forward is not None:
            self._forward.pause_writing()

    def resume_writing(self) -> None:
        if self._forward is not None:
            self._forward.resume_writing()

    def __repr__(self) -> str:
        return f"<_Discarder {self._linger!r}>"


class CloseWaiter(asyncio.Future[CloseResult]):
    """One caller's future of a close's :class:`CloseResult`.

    Each caller gets its own, so that one caller cancelling (a ``wait_for``
    that timed out, say) cannot take the result away from the others.
    Cancelling it gives up on grace: the connection is aborted, in the manner
    of trio's ``aclose``, and the other callers see ``ABORTED``. Overriding
    ``cancel`` (which ``Task.cancel`` and ``wait_for`` call on the future a
    task awaits) costs nothing until it happens, where a done callback would
    cost an allocation and a loop iteration on every close.
    """

    __slots__ = ("_linger",)

    _linger: Linger | None

    def cancel(self, msg: Any | None = None) -> bool:
        cancelled = super().cancel(msg)
        linger = self._linger
        if cancelled and linger is not None:
            self._linger = None
            linger.abort()
        return cancelled


class Linger:
    """The close of one connection: state, deadlines, counts, outcome, result."""

    __slots__ = (
        "_deadline",
        "_forward",
        "_future",
        "_idle_timeout",
        "_on_idle",
        "_options",
        "_scratch",
        "_started",
        "_timer",
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
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.Transport,
        forward: asyncio.BaseProtocol | None,
    ) -> None:
        self.loop = loop
        self.transport = transport
        self.machine = HalfCloseMachine()
        self._forward = forward
        # Made on first use: a connection that never lingers (nor watches
        # for idleness) never pays for it.
        self._timer: _deadlines.DeadlineTimer | None = None
        self._options: LingerOptions | None = None
        self._started: float | None = None
        self._deadline = math.inf
        self._idle_timeout: float | None = None
        self._on_idle: Callable[[], bool] | None = None
        #: Called (synchronously) at the end of :meth:`lost`, once the result is made.
        self.on_lost: Callable[[Linger], None] | None = None
        self._future: asyncio.Future[CloseResult] | None = None
        self._waiters: list[CloseWaiter] | None = None
        self._trailing: bytearray | None = None
        self._scratch = _SCRATCH
        self.discarded = 0
        self.last_read = 0.0
        self.outcome: CloseOutcome | None = None
        self.result: CloseResult | None = None

    # -- queries ---------------------------------------------------------

    @property
    def state(self) -> HalfCloseState:
        return self.machine.state

    @property
    def lingering(self) -> bool:
        """True once a graceful close has started (whatever state it reached)."""
        return self._started is not None

    @property
    def timer_armed(self) -> bool:
        """True while this connection's timer handle is scheduled."""
        timer = self._timer
        return timer is not None and timer.armed

    @property
    def scratch(self) -> memoryview:
        return self._scratch

    def future(self) -> asyncio.Future[CloseResult]:
        """The future that ``connection_lost`` completes with the :class:`CloseResult`."""
        fut = self._future
        if fut is None:
            fut = self._future = self.loop.create_future()
            if self.result is not None:
                fut.set_result(self.result)
        return fut

    def waiter(self) -> CloseWaiter:
        """A new :class:`CloseWaiter` for one caller, completed with the result."""
        waiter = CloseWaiter(loop=self.loop)
        result = self.result
        if result is not None:
            waiter._linger = None
            waiter.set_result(result)
            return waiter
        waiter._linger = self
        waiters = self._waiters
        if waiters is None:
            self._waiters = [waiter]
        else:
            waiters.append(waiter)
        return waiter

    # -- events from the owner -------------------------------------------

    def peer_eof(self) -> None:
        """The peer's FIN arrived (``eof_received``)."""
        machine = self.machine
        was_live = machine.live
        state = machine.feed(Event.PEER_EOF)
        if was_live and state is HalfCloseState.CLOSING:
            # Both directions are now closed: the peer's FIN came after ours.
            self.outcome = CloseOutcome.CLEAN
            self.transport.close()

    def write_eof(self) -> None:
        """Half-close our side (idempotent); close the transport if the peer's side is done."""
        machine = self.machine
        if machine.eof_written or not machine.live:
            return
        exc = shutdown_error(self.transport)
        if exc is not None:
            self._peer_reset()
            return
        if machine.feed(Event.EOF_WRITTEN) is HalfCloseState.CLOSING:
            self.outcome = CloseOutcome.CLEAN
            self.transport.close()

    def begin(
        self,
        options: LingerOptions,
        *,
        final: bytes = b"",
        keep_trailing: bool = False,
        unread: bytes = b"",
        peer_eof: bool = False,
    ) -> None:
        """Start the graceful close. A no-op if one has started or the transport is closing.

        ``unread`` and ``peer_eof`` describe what a stream's reader already
        holds: its unread bytes, and whether it has seen the peer's FIN.
        """
        machine = self.machine
        if self._started is not None or not machine.live:
            return
        if final and machine.eof_written:
            # Both loops refuse write() after write_eof(); refuse before touching anything.
            raise RuntimeError("cannot write final: write_eof() was already called")
        transport = self.transport
        if final and not transport.is_closing():
            # Written first: if the loop refuses it, nothing has changed yet.
            transport.write(final)
        now = self.loop.time()
        self._options = options
        self._started = now
        self._deadline = now + options.timeout
        self.last_read = now
        if keep_trailing:
            self._trailing = bytearray()
            self._scratch = memoryview(bytearray(_SCRATCH_SIZE))
        if peer_eof and not machine.peer_eof:
            machine.feed(Event.PEER_EOF)
        state = machine.feed(Event.LINGER)
        transport.set_protocol(_Discarder(self, self._forward))
        self._arm()
        if unread and self._take(unread):
            return
        if transport.is_closing():
            # Closed (or aborted) under us before the close began: all that is
            # left is connection_lost, still bounded by the timer.
            if machine.live:
                machine.feed(Event.CLOSE)
            return
        if state is HalfCloseState.CLOSING:
            # The peer's FIN is already in, so nothing is left to wait for:
            # close() flushes what we wrote, then sends our FIN.
            self.outcome = CloseOutcome.CLEAN
            transport.close()
            return
        if not transport.is_reading():
            # Paused by the previous protocol's flow control (a full
            # StreamReader): discarding must read, or the peer stalls.
            transport.resume_reading()
        if transport.can_write_eof():
            self.write_eof()
        else:
            # TLS in asyncio has no half-close: close() sends close_notify
            # after flushing. asyncio's own bound on that (ssl_shutdown_timeout,
            # 30 s) is not ours; the timer still aborts at ``timeout``.
            machine.feed(Event.CLOSE)
            transport.close()

    def abort(self) -> None:
        """RST now (outcome ABORTED). A no-op once ``connection_lost`` has run."""
        machine = self.machine
        if machine.state is HalfCloseState.CLOSED:
            return
        if self.outcome is None or self.outcome is CloseOutcome.CLEAN:
            self.outcome = CloseOutcome.ABORTED
        machine.feed(Event.ABORT)
        reset(self.transport)

    def on_read(self, nbytes: int) -> None:
        """The discarder read ``nbytes`` into :attr:`scratch`."""
        self.last_read = self.loop.time()
        if self._trailing is not None:
            self._take(self._scratch[:nbytes])
            return
        self.discarded += nbytes
        options = self._options
        assert options is not None  # set by begin() before the discarder exists
        if options.max_discard is not None and self.discarded > options.max_discard:
            self._fail(CloseOutcome.OVERFLOW)

    def lost(self, exc: BaseException | None) -> None:
        """``connection_lost`` ran: make the result. Idempotent."""
        machine = self.machine
        if machine.state is HalfCloseState.CLOSED:
            return
        timer = self._timer
        if timer is not None:
            timer.cancel()
            # The timer's callback is our bound method: drop the cycle.
            self._timer = None
        outcome = self.outcome
        if exc is not None and outcome in (None, CloseOutcome.CLEAN):
            # A close we believed clean failed while flushing, or the peer
            # reset a connection nobody was closing.
            outcome = CloseOutcome.PEER_RESET
        elif outcome is None:
            outcome = CloseOutcome.CLEAN
        started = self._started
        trailing = self._trailing
        self.result = CloseResult(
            outcome=outcome,
            discarded=self.discarded,
            duration=0.0 if started is None else max(0.0, self.loop.time() - started),
            trailing=b"" if trailing is None else bytes(trailing),
        )
        self.outcome = outcome
        self._trailing = None
        self._scratch = _SCRATCH
        machine.feed(Event.LOST)
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(self.result)
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for waiter in waiters:
                waiter._linger = None
                if not waiter.done():
                    waiter.set_result(self.result)
        # The idle watch's callback holds its owner (a server connection, and
        # through it the stream's writer, a key of _streams._LINGERS): drop it.
        self._on_idle = None
        # Nothing forwards to the old protocol any more: drop the reference,
        # so that the protocol and this record (which point at each other)
        # are freed by reference counting, not left to the cyclic GC.
        self._forward = None
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost(self)

    # -- internals ---------------------------------------------------------

    def _take(self, data: bytes | memoryview) -> bool:
        """Account for bytes the peer sent during the close; True if that overflowed."""
        options = self._options
        assert options is not None
        cap = options.max_discard
        trailing = self._trailing
        if trailing is None:
            self.discarded += len(data)
        else:
            room = len(data) if cap is None else max(0, cap - len(trailing))
            trailing += data[:room]
            self.discarded += max(0, len(data) - room)
        if cap is not None and self.discarded + (0 if trailing is None else len(trailing)) > cap:
            self._fail(CloseOutcome.OVERFLOW)
            return True
        return False

    def observe(self) -> None:
        """Route the transport's callbacks through this record without starting a close.

        Used before an abort of a connection nobody was closing, so that
        ``connection_lost`` still makes the result.
        """
        if self._options is None:
            self._options = LingerOptions()
        self.transport.set_protocol(_Discarder(self, self._forward))

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
        self._clock().at(self.last_read + idle_timeout)

    def shorten(self, seconds: float) -> None:
        """Bring the close's total deadline forward to at most ``seconds`` from now."""
        if self._started is None or self.machine.state is HalfCloseState.CLOSED:
            return
        self._deadline = min(self._deadline, self.loop.time() + seconds)
        self._clock().at(self._deadline)

    def _clock(self) -> _deadlines.DeadlineTimer:
        timer = self._timer
        if timer is None:
            timer = self._timer = _deadlines.DeadlineTimer(self.loop, self._on_timer)
        return timer

    def _arm(self) -> None:
        if self._started is None:
            idle = self._idle_timeout
            if idle is not None:
                self._clock().at(self.last_read + idle)
            return
        options = self._options
        assert options is not None
        deadline = self._deadline
        if options.idle_timeout is not None and self.machine.state is HalfCloseState.LINGERING:
            deadline = min(deadline, self.last_read + options.idle_timeout)
        self._clock().at(deadline)

    def _on_timer(self) -> None:
        if self.machine.state is HalfCloseState.CLOSED:
            return
        now = self.loop.time()
        options = self._options
        if self._started is None or options is None:
            self._on_idle_timer(now)
            return
        if now >= self._deadline:
            self._fail(CloseOutcome.TIMEOUT)
        elif options.idle_timeout is not None and self.machine.state is HalfCloseState.LINGERING:
            if self.transport.get_write_buffer_size():
                # Our reply is still being flushed: a peer busy reading it is
                # not idle. Like nginx, count silence only once it is sent.
                self.last_read = now
            elif now >= self.last_read + options.idle_timeout:
                self._fail(CloseOutcome.IDLE_TIMEOUT)
                return
            self._arm()
        else:
            self._arm()

    def _on_idle_timer(self, now: float) -> None:
        idle = self._idle_timeout
        on_idle = self._on_idle
        if idle is None or on_idle is None or not self.machine.live:
            return
        if now < self.last_read + idle:
            self._arm()
            return
        if on_idle():
            return
        if self.last_read + idle <= now:
            # Declined with nothing new to go on: look again a full period later.
            self.last_read = now
        self._arm()

    def _fail(self, outcome: CloseOutcome) -> None:
        """Give up on grace: record ``outcome`` and close by force."""
        machine = self.machine
        if machine.state is HalfCloseState.CLOSED:
            return
        if self.outcome is None or self.outcome is CloseOutcome.CLEAN:
            self.outcome = outcome
        machine.feed(Event.TIMER)
        options = self._options
        if options is None or options.reset_on_failure:
            reset(self.transport)
        else:
            # A plain close of the socket, never a wait on the send buffer:
            # abort() drops what is unsent, and the kernel sends a FIN (or a
            # RST, if unread bytes are still queued).
            self.transport.abort()

    def _peer_reset(self) -> None:
        self.outcome = CloseOutcome.PEER_RESET
        self.machine.feed(Event.PEER_RESET)
        self.transport.abort()

    def __repr__(self) -> str:
        parts = [self.machine.state.name]
        if self._started is not None:
            parts.append(f"discarded={self.discarded}")
        timer = self._timer
        if timer is not None and timer.armed:
            parts.append(f"deadline={timer.when:.3f}")
        if self.outcome is not None:
            parts.append(f"outcome={self.outcome.name}")
        return f"<Linger {' '.join(parts)}>"
