"""The lingering closer: flush, half-close, discard until the peer's FIN, bounded.

One :class:`Linger` record goes with each connection (created by
``GracefulProtocol.connection_made``, or by ``graceful_close`` for a stream).
It owns the connection's :class:`~aiograceful._state.HalfCloseMachine`, its one
deadline (the record is its own entry on the loop's deadline heap), the byte
counts and the outcome, and it turns ``connection_lost`` into a :class:`CloseResult`.

While lingering, the transport's protocol is swapped (``transport.set_protocol``)
for a :class:`_Discarder`, a plain ``Protocol`` that counts what the peer
still sends and drops it. The user's ``data_received`` is
never wrapped; the discarder forwards ``connection_lost`` and the flow-control
callbacks to the protocol it replaced, so a stream's ``wait_closed()`` and a
``GracefulProtocol``'s ``connection_lost`` still run.

Defaults, beside the servers that linger in C:

==================  =========================  ===================  ==================
                    aiograceful                nginx                Apache httpd
==================  =========================  ===================  ==================
no byte acked       ``send_timeout`` 60 s      send_timeout 60 s    Timeout 60 s
total linger time   ``timeout`` 30 s           lingering_time 30 s  30 s (MAX_SECS)
peer silent         ``idle_timeout`` 5 s       lingering_timeout 5s 2 s (SECONDS_TO_LINGER)
bytes discarded     ``max_discard`` 64 MiB     no cap               no cap
==================  =========================  ===================  ==================

The timing model: a close has a send side and a receive side, and is done
when both are. While our bytes are still going out (the transport's buffer,
and the kernel's unacknowledged count where the platform tells: see
:func:`~aiograceful._socket.send_queue`), the only bound is ``send_timeout``:
the longest the peer may go without acknowledging a single byte. A peer that
keeps reading, however slowly, is never cut by the close's own timers (a
naive ``close()`` would have delivered it too: the kernel keeps sending).
Once everything is acknowledged, ``timeout`` (total) and ``idle_timeout``
(silence) start, and bound the wait for the peer's FIN. After the peer's FIN
the socket stays open until the peer has acknowledged our last byte
(``FLUSHING``), so the close can say so: ``CloseResult.unacked``.

asyncio gives no callback for an acknowledgement, so the send side is
sampled by the connection's one timer: every few milliseconds at first,
backing off to a fraction of the bounds. The sample is one ``ioctl``, taken
only while a close waits on it; reads and writes pay nothing.

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
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, Final

from . import _deadlines
from ._socket import (
    _INT_ZERO,
    _SIOCINQ,
    _SIOCOUTQ,
    _TCP_FAMILIES,
    TCP_CLOSE,
    TCP_FIN_UNACKED,
    bytes_acked,
    reset,
    shutdown_error,
    tcp_state,
)
from ._state import Event, HalfCloseMachine, HalfCloseState

if sys.platform != "win32":
    import fcntl

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_DISCARD",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "UNSET",
    "CloseOutcome",
    "CloseResult",
    "CloseWaiter",
    "Linger",
    "LingerOptions",
    "logger",
]

logger: Final = logging.getLogger("aiograceful")

DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_IDLE_TIMEOUT: Final = 5.0
DEFAULT_MAX_DISCARD: Final = 64 * 1024 * 1024
DEFAULT_SEND_TIMEOUT: Final = 60.0

# The send side is sampled first after _POLL_FIRST seconds, then at doubling
# intervals up to _POLL_MAX (and a quarter of the bounds in force), so that a
# close whose last bytes are acknowledged within a round trip costs one
# sample, and a long download a few per second at most.
_POLL_FIRST: Final = 0.005
_POLL_MAX: Final = 1.0
# TLS has no half-close in asyncio or uvloop: our close_notify ends both
# directions, and a client that reads until EOF waits for it. So a TLS close
# sends it once our bytes are all acknowledged and the peer has been silent
# this long (or idle_timeout, if shorter). A peer still uploading is not
# silent, and keeps being read; one that is silent is waiting for us.
_TLS_QUIET: Final = 0.2

# Linger._sock before the transport's socket has been looked up.
_NOT_YET: Final = object()
_UNPACK_INT: Final = struct.Struct("i").unpack

# The states in which the transport has been told to close (not machine.live).
_ENDED: Final = frozenset({HalfCloseState.CLOSING, HalfCloseState.CLOSED})

# The states in which a close is under way (its timer may end it).
_CLOSE_STATES: Final = frozenset(
    {HalfCloseState.LINGERING, HalfCloseState.FLUSHING, HalfCloseState.CLOSING}
)


class CloseOutcome(enum.Enum):
    """How a graceful close ended."""

    # Members are singletons compared by identity: hash them so too (Enum's
    # own __hash__ is a Python call, paid where outcomes are counted).
    __hash__ = object.__hash__

    #: The peer's FIN was seen after ours and (where the platform tells) the
    #: peer acknowledged every byte we wrote.
    CLEAN = "clean"
    #: The total linger time (``timeout``, counted once our bytes were all
    #: acknowledged) ran out, or a server's forced close did.
    TIMEOUT = "timeout"
    #: The peer stopped making progress: it sent nothing for ``idle_timeout``
    #: while we waited for its FIN, or it acknowledged none of our bytes for
    #: ``send_timeout`` (then ``CloseResult.unacked`` is > 0).
    IDLE_TIMEOUT = "idle-timeout"
    #: The peer sent more than ``max_discard`` bytes while we lingered.
    OVERFLOW = "overflow"
    #: The peer reset the connection (or it failed under us).
    PEER_RESET = "peer-reset"
    #: A local ``abort()`` ended it with a RST, or a cancelled close gave up
    #: on grace, or the app closed the transport itself with bytes of ours
    #: unacknowledged (or unread bytes, which make the kernel send a RST).
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
    ``unacked`` counts the bytes we wrote that the peer had not acknowledged
    when the socket was closed: 0 means the peer's TCP has everything; None
    where the platform cannot tell (only Linux is wired; see ``_socket.py``).
    """

    outcome: CloseOutcome
    discarded: int
    duration: float
    trailing: bytes = b""
    unacked: int | None = None

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

    * ``timeout``: total seconds the close waits for the peer's FIN once our
      bytes are all acknowledged (never ``None``: a graceful close is always
      bounded).
    * ``idle_timeout``: seconds the peer may stay silent while we wait for its
      FIN; ``None`` for no idle limit (``timeout`` still applies).
    * ``max_discard``: bytes the peer may still send; ``None`` for no cap.
    * ``reset_on_failure``: when a bound ends the close (TIMEOUT,
      IDLE_TIMEOUT, OVERFLOW), reset the connection (SO_LINGER {1, 0}), which
      drops what the kernel still holds to send (nginx's
      ``reset_timedout_connection``). False by default: the close lets go as
      a plain ``close()`` does (:meth:`Linger.let_go`), and the kernel keeps
      sending what it holds, then a FIN (a RST only if unread bytes are queued).
    * ``send_timeout``: while our bytes are still going out, the longest the
      peer may go without acknowledging any of them (nginx's ``send_timeout``).

    Construction validates every field and raises ``TypeError``/``ValueError``
    naming the field.
    """

    timeout: float = DEFAULT_TIMEOUT
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    max_discard: int | None = DEFAULT_MAX_DISCARD
    reset_on_failure: bool = False
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    #: The longest interval between two samples of the send side (derived:
    #: a quarter of the shortest bound, at most 1 s).
    poll_cap: float = dataclasses.field(init=False, repr=False, compare=False, default=0.0)

    def __post_init__(self) -> None:
        timeout = check_seconds("timeout", self.timeout, allow_none=False)
        idle = check_seconds("idle_timeout", self.idle_timeout, allow_none=True)
        send = check_seconds("send_timeout", self.send_timeout, allow_none=False)
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
        object.__setattr__(self, "send_timeout", send)
        assert timeout is not None
        assert send is not None
        poll = min(_POLL_MAX, send / 4, timeout / 4)
        if idle is not None:
            poll = min(poll, idle / 4)
        # Computed once: the close's timer reads it on every arming.
        object.__setattr__(self, "poll_cap", max(poll, 0.001))


_DEFAULT_OPTIONS: Final = LingerOptions()


def check_final(final: object) -> bytes:
    """Validate a ``final`` argument; return it as bytes."""
    if final.__class__ is bytes:
        return final  # the common case, b"": no copy
    if not isinstance(final, bytes | bytearray | memoryview):
        raise TypeError(f"final must be bytes-like, got {type(final).__name__}")
    return bytes(final)


def check_flag(name: str, value: object) -> bool:
    """Validate a boolean keyword argument."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


class _Discarder(asyncio.Protocol):
    """The protocol a transport talks to while its connection lingers."""

    __slots__ = ("_forward", "_linger")

    def __init__(self, linger: Linger, forward: asyncio.BaseProtocol | None) -> None:
        self._linger = linger
        self._forward = forward

    @property
    def linger(self) -> Linger:
        return self._linger

    # A plain Protocol, not a BufferedProtocol into a shared scratch buffer:
    # the swap to it is the one on every close's fast path, and on both loops
    # set_protocol() to a BufferedProtocol costs more (uvloop changes its read
    # mode: 0.86 against 0.29 us). What is read while lingering is dropped at once.
    def data_received(self, data: bytes) -> None:
        self._linger.on_read(data)

    def eof_received(self) -> bool:
        linger = self._linger
        linger.peer_eof()
        # True keeps the socket open: the close waits for the peer to
        # acknowledge our last bytes (FLUSHING), then closes it itself. TLS
        # cannot half-close (asyncio starts its own shutdown after the peer's
        # close_notify, and warns that True "has no effect when using ssl").
        return linger.transport.can_write_eof()

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
    Cancelling it gives up on grace (:meth:`Linger.cancel`: the transport is
    closed the plain way when nothing is unread, reset otherwise) and the
    other callers see ``ABORTED``. Overriding
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
            linger.cancel()
        return cancelled


class Linger(_deadlines.Timed):
    """The close of one connection: state, deadlines, counts, outcome, result.

    It is its own timer (:class:`~aiograceful._deadlines.Timed`): one
    deadline on the loop's shared structure, :meth:`_on_deadline` when due.
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
        self._poll = _POLL_FIRST
        self._idle_timeout: float | None = None
        self._on_idle: Callable[[], bool] | None = None
        self._on_quiet: Callable[[], None] | None = None
        #: Called (synchronously) at the end of :meth:`lost`, once the result is made.
        self.on_lost: Callable[[Linger], None] | None = None
        self._future: asyncio.Future[CloseResult] | None = None
        # One caller's waiter (the common case: no list), or a list of them.
        self._waiters: CloseWaiter | list[CloseWaiter] | None = None
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
            self._waiters = waiter
        elif isinstance(waiters, list):
            waiters.append(waiter)
        else:
            self._waiters = [waiters, waiter]
        return waiter

    def outstanding(self) -> tuple[int, bool]:
        """Our bytes not yet acknowledged by the peer, and whether the count is exact.

        The transport's buffer plus the kernel's unacknowledged bytes (our
        FIN, which the kernel counts as one, left out). Where the kernel does
        not tell, only the buffer is counted and the second value is False.
        """
        transport = self.transport
        buffered = transport.get_write_buffer_size()
        queued = self._ioctl(_SIOCOUTQ)
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
        return self._ioctl(_SIOCINQ)

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
            if _SIOCOUTQ is None or sock is None:
                sock = None
            elif transport.get_extra_info("sockname").__class__ is not tuple:
                family = getattr(sock, "family", None)
                if family == socket.AF_UNIX:
                    self._sock_unix = True
                elif family not in _TCP_FAMILIES:
                    sock = None
            self._sock = sock
        if sock is None or request is None or (self._sock_unix and request != _SIOCINQ):
            return None
        try:
            raw = fcntl.ioctl(sock.fileno(), request, _INT_ZERO)
        except (OSError, ValueError):
            # ValueError: asyncio's TransportSocket on a socket closed under it.
            return None
        value: int = _UNPACK_INT(raw)[0]
        return value

    # -- events from the owner -------------------------------------------

    def peer_eof(self) -> None:
        """The peer's FIN arrived (``eof_received``)."""
        machine = self.machine
        was = machine.state
        state = machine.feed(Event.PEER_EOF)
        if state is HalfCloseState.FLUSHING and was is not HalfCloseState.FLUSHING:
            # Both directions are now done: close once our bytes are acknowledged.
            self._flush()

    def write_eof(self) -> bool:
        """Half-close our side (idempotent); close once the peer's side is done and ours acked.

        Returns False if the peer had reset the connection (it is then closing).
        """
        machine = self.machine
        if machine.eof_written or machine.state in _ENDED:
            return True
        exc = shutdown_error(self.transport)
        if exc is not None:
            self._peer_reset()
            return False
        was = machine.state
        if (
            machine.feed(Event.EOF_WRITTEN) is HalfCloseState.FLUSHING
            and was is not HalfCloseState.FLUSHING
        ):
            self._flush()
        return True

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
        if self._started is not None or machine.state in _ENDED:
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
        self.last_read = now
        self._on_quiet = None
        if self._acked_at is None:
            self._progress_at = now
        if keep_trailing:
            self._trailing = bytearray()
        if peer_eof and not machine.peer_eof:
            machine.feed(Event.PEER_EOF)
        was = machine.state
        state = machine.feed(Event.LINGER)
        transport.set_protocol(_Discarder(self, self._forward))
        if unread and self._take(unread):
            return
        if transport.is_closing():
            # Closed (or aborted) under us before the close began: all that is
            # left is connection_lost, still bounded by the timer.
            if machine.live:
                machine.feed(Event.CLOSE)
            self._arm()
            return
        if state is HalfCloseState.LINGERING and not transport.is_reading():
            # Paused by the previous protocol's flow control (a full
            # StreamReader): discarding must read, or the peer stalls.
            transport.resume_reading()
        if transport.can_write_eof() and not self.write_eof():
            return  # reset under us
        # On TLS (no half-close in asyncio or uvloop) nothing is sent now: the
        # close keeps reading and discarding until the peer's close_notify or
        # FIN, then closes (close_notify after the flush). Closing at once
        # would make asyncio's SSL shutdown treat the client's next record,
        # the upload it is still sending, as an error, and reset it.
        if state is HalfCloseState.FLUSHING and was is not HalfCloseState.FLUSHING:
            self._flush()
        elif self._acked_at is None and machine.state is HalfCloseState.LINGERING:
            # _arm() for the common case, inlined: the first sample of the send side.
            poll = self._poll
            self._poll = min(poll * 2, options.poll_cap)
            self.at(min(self._hard_deadline, now + poll))
        else:
            self._arm()

    def abort(self) -> None:
        """RST now (outcome ABORTED). A no-op once ``connection_lost`` has run."""
        machine = self.machine
        if machine.state is HalfCloseState.CLOSED:
            return
        if self.outcome is None or self.outcome is CloseOutcome.CLEAN:
            self.outcome = CloseOutcome.ABORTED
        self._measure()
        machine.feed(Event.ABORT)
        reset(self.transport)

    def let_go(self, outcome: CloseOutcome = CloseOutcome.TIMEOUT) -> None:
        """Stop waiting now, the way a plain ``close()`` lets go. A no-op once closed.

        What the peer has not acknowledged is measured first (``unacked``),
        and ``outcome`` names the bound that fired (unless an outcome other
        than CLEAN is already recorded). Then the socket is closed without
        SO_LINGER: nothing more waits in the process, and the kernel keeps
        sending what it holds, then our FIN, within its orphan limits
        (``tcp_orphan_retries``, ``tcp_fin_timeout``, ``tcp_max_orphans`` on
        Linux). As with a plain close, the kernel sends a RST instead if
        bytes from the peer sit unread in the receive queue. So letting go
        never delivers less than a naive close; :meth:`abort` is the RST.
        """
        if not self._give_up(outcome):
            return
        # asyncio's transport.abort() and uvloop's both close the descriptor
        # at once, with no SO_LINGER: the plain close, never a wait on the
        # send buffer. What is still in the transport's own buffer is lost,
        # as with a stock server's exit. It is not pushed to the kernel
        # first: both loops send as soon as the socket is writable, so that
        # buffer holds bytes only while the kernel's send buffer is (nearly)
        # full, where a non-blocking send() would take little or nothing;
        # and neither loop gives a public way to reach those bytes (asyncio's
        # are a private deque, uvloop's are in C). The kernel's buffer is the
        # large one: Linux autotunes it up to tcp_wmem's maximum (4 MiB by
        # default), and it took all of a 2 MiB write to a stalled reader.
        self.transport.abort()

    def cancel(self) -> None:
        """The close's caller was cancelled: give up on grace without losing more than close().

        Unless bytes are known to be unread, the transport is closed the plain
        way: the loop flushes its buffer and the kernel goes on sending what it
        holds, as it would after a naive ``writer.close()``; that flush is
        still bounded by ``send_timeout``. Where the platform cannot tell, that
        is exactly the naive close. With bytes unread, closing would reset the
        connection anyway: RST now. Either way the outcome is ABORTED.
        """
        machine = self.machine
        if not machine.live:
            return  # closing already, or gone
        if self.unread():
            self.abort()  # bytes unread: close() would reset it all the same
            return
        if self.outcome is None or self.outcome is CloseOutcome.CLEAN:
            self.outcome = CloseOutcome.ABORTED
        machine.feed(Event.CLOSE)
        self._acked_at = None
        self._outstanding = -1  # the next sample starts the count afresh
        self._poll = _POLL_FIRST
        self.transport.close()
        self._arm()

    def on_read(self, data: bytes) -> None:
        """The discarder read ``data`` from the peer."""
        self.last_read = self.loop.time()
        if self._trailing is not None:
            self._take(data)
            return
        self.discarded += len(data)
        options = self._options
        assert options is not None  # set by begin() before the discarder exists
        cap = options.max_discard
        if cap is not None and self.discarded > cap:
            self._overflow()

    def lost(self, exc: BaseException | None) -> None:
        """``connection_lost`` ran: make the result. Idempotent."""
        machine = self.machine
        if machine.state is HalfCloseState.CLOSED:
            return
        if self._entry is not None:
            self.disarm()
        if self.unacked == -1:
            # Not measured when the close ended (the loop closed the transport
            # itself): both loops still hold the socket during connection_lost.
            self._measure()
        outcome = self.outcome
        if exc is not None and outcome in (None, CloseOutcome.CLEAN):
            # A close we believed clean failed while flushing, or the peer
            # reset a connection nobody was closing.
            outcome = CloseOutcome.PEER_RESET
        elif outcome is None:
            # Nobody here decided how it ended: the app or the loop closed the
            # transport itself. Clean only if nothing of ours was left
            # unacknowledged and nothing unread (which makes close() a RST).
            unacked = self.unacked
            if (unacked is not None and unacked > 0) or self.unread():
                outcome = CloseOutcome.ABORTED
            else:
                outcome = CloseOutcome.CLEAN
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
        machine.feed(Event.LOST)
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(result)
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for waiter in waiters if isinstance(waiters, list) else (waiters,):
                waiter._linger = None
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

    # -- watches before a close ------------------------------------------------

    def observe(self) -> None:
        """Route the transport's callbacks through this record without starting a close.

        Used before an abort of a connection nobody was closing, so that
        ``connection_lost`` still makes the result.
        """
        if self._options is None:
            self._options = _DEFAULT_OPTIONS
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
        self._poll = _POLL_FIRST
        now = self.loop.time()
        self._progress_at = now
        self.at(now + self._poll)

    def shorten(self, seconds: float) -> None:
        """Bound everything left of the close (or of a quiet wait) to ``seconds`` from now.

        A server's forced close: unlike the close's own timers, this cuts a
        transfer in progress when it runs out (outcome TIMEOUT).
        """
        if self.machine.state is HalfCloseState.CLOSED:
            return
        self._hard_deadline = min(self._hard_deadline, self.loop.time() + seconds)
        self.at(self._hard_deadline)

    # -- internals ---------------------------------------------------------

    def _opts(self) -> LingerOptions:
        options = self._options
        return _DEFAULT_OPTIONS if options is None else options

    def _take(self, data: bytes | memoryview) -> bool:
        """Account for bytes the peer sent during the close; True if that overflowed.

        The cap is enforced once our bytes are all acknowledged (the timing
        model): a reset while our answer is still going out would drop it,
        which a naive close does not. Until then the close keeps discarding;
        the send side is bounded by ``send_timeout``.
        """
        options = self._opts()
        cap = options.max_discard
        trailing = self._trailing
        if trailing is None:
            self.discarded += len(data)
        else:
            room = len(data) if cap is None else max(0, cap - len(trailing))
            trailing += data[:room]
            self.discarded += max(0, len(data) - room)
        return self._over_cap() and self._overflow()

    def _overflow(self) -> bool:
        """Past the cap: fail with OVERFLOW once our bytes are all in; True if it did."""
        if not self.machine.eof_written:
            # TLS: our bytes may sit unseen under the SSL transport; the timer
            # decides, once tcpi_bytes_acked stops moving (_on_deadline).
            return False
        if self._acked_at is None:
            if self.outstanding()[0]:
                return False  # our answer is still going out: keep discarding
            self._acked_at = self.loop.time()
        self._fail(CloseOutcome.OVERFLOW)
        return True

    def _over_cap(self) -> bool:
        cap = self._opts().max_discard
        if cap is None:
            return False
        trailing = self._trailing
        return self.discarded + (0 if trailing is None else len(trailing)) > cap

    def _measure(self) -> None:
        """Record what is unacknowledged now, before the socket is closed or reset."""
        total, exact = self.outstanding()
        self.unacked = total if exact else None

    def _flush(self) -> None:
        """Both directions are done: close now if the peer has all our bytes, else wait for it."""
        if self.transport.get_write_buffer_size():
            # Bytes of ours are still in the transport: no need to ask the
            # kernel now; the first sample starts the count (as after begin()).
            total = -1
        elif self._acked_at is not None and self._outstanding == 0 and self.machine.eof_written:
            # A sample found everything acknowledged (the kernel said so:
            # exact), and nothing can have been written since our FIN (both
            # loops refuse write() after write_eof()): the peer has it all.
            # Our FIN itself is never counted (see outstanding()).
            self._flushed(True)
            return
        else:
            total, exact = self.outstanding()
            if total == 0:
                self._flushed(exact)
                return
        now = self.loop.time()
        self._acked_at = None
        if self._started is None:
            self._progress_at = now  # a close through write_eof(): the watch starts now
        self._outstanding = total
        self._poll = _POLL_FIRST
        self._arm()

    def _flushed(self, exact: bool) -> None:
        self.machine.feed(Event.FLUSHED)
        if self.outcome is None:
            self.outcome = CloseOutcome.CLEAN
        self.unacked = 0 if exact else None
        # Nothing is unread (the peer is done) and nothing is unsent: close()
        # sends nothing but our FIN if it was not queued yet.
        self.transport.close()

    def _next_poll(self, now: float, cap: float) -> float:
        poll = self._poll
        self._poll = min(poll * 2, cap)
        return now + poll

    def _arm(self) -> None:
        state = self.machine.state
        if state is HalfCloseState.CLOSED:
            return
        now = self.loop.time()
        when = self._hard_deadline
        if self._started is None and state is not HalfCloseState.FLUSHING:
            if state is HalfCloseState.CLOSING:
                when = min(when, self._next_poll(now, _POLL_MAX))
            else:
                idle = self._idle_timeout
                if idle is not None and self._on_idle is not None:
                    when = min(when, self.last_read + idle)
                if self._on_quiet is not None:
                    when = min(when, self._next_poll(now, 0.25))
            if when < math.inf:
                self.at(when)
            return
        options = self._opts()
        acked_at = self._acked_at
        if acked_at is None:
            when = min(when, self._next_poll(now, options.poll_cap))
        else:
            when = min(when, acked_at + options.timeout)
            if state is HalfCloseState.LINGERING:
                silent = max(self.last_read, acked_at)
                if options.idle_timeout is not None:
                    when = min(when, silent + options.idle_timeout)
                if not self.machine.eof_written and self._trailing is None:
                    when = min(when, silent + _TLS_QUIET)
            if not self.machine.eof_written:
                # TLS: keep sampling the send side (see _tls_progress).
                when = min(when, self._next_poll(now, options.poll_cap))
        self.at(when)

    def _on_deadline(self) -> None:
        state = self.machine.state
        if state is HalfCloseState.CLOSED:
            return
        now = self.loop.time()
        if now >= self._hard_deadline:
            self._fail(CloseOutcome.TIMEOUT)
            return
        if self._started is None and state not in (HalfCloseState.FLUSHING, HalfCloseState.CLOSING):
            self._on_watch_timer(now)
            return
        options = self._opts()
        if self._acked_at is None:
            # The send side: sample what is still outstanding.
            total, exact = self.outstanding()
            if total == 0:
                self._acked_at = now
                # 0: the kernel said nothing is outstanding; -1: it could not tell.
                self._outstanding = 0 if exact else -1
                if not self.machine.eof_written:
                    self._tls_progress()  # the mark the next samples compare with
                if state is HalfCloseState.FLUSHING:
                    self._flushed(exact)
                    return
                if (
                    state is HalfCloseState.LINGERING
                    and self.machine.eof_written
                    and self._over_cap()
                ):
                    # Read past the cap while our answer went out: now it is in.
                    self._fail(CloseOutcome.OVERFLOW)
                    return
            else:
                if (
                    total < self._outstanding
                    or self._outstanding < 0
                    or (not self.machine.eof_written and self._tls_progress())
                ):
                    self._progress_at = now  # the peer acknowledged something
                elif tcp_state(self.transport) == TCP_CLOSE:
                    # Reset while nothing of the loop's watched the socket
                    # (FLUSHING: no reader after the FIN, no writer with
                    # the buffer empty): the count will never go down.
                    self._peer_reset()
                    return
                self._outstanding = total
                if now - self._progress_at >= options.send_timeout:
                    # The peer stopped reading (a zero window that never reopens).
                    self._fail(CloseOutcome.IDLE_TIMEOUT)
                    return
        else:
            if not self.machine.eof_written and self._tls_progress():
                # TLS: the peer is still acknowledging bytes of ours that sat
                # where we cannot see them: not all in yet, so the clock restarts.
                self._acked_at = now
            elif state is HalfCloseState.LINGERING and self._over_cap():
                self._fail(CloseOutcome.OVERFLOW)
                return
            acked_at = self._acked_at
            if now >= acked_at + options.timeout:
                self._fail(CloseOutcome.TIMEOUT)
                return
            if state is HalfCloseState.LINGERING:
                silent = now - max(self.last_read, acked_at)
                if not self.machine.eof_written and self._trailing is None and silent >= _TLS_QUIET:
                    # TLS: the peer has everything and is waiting for our close_notify.
                    self.machine.feed(Event.CLOSE)
                    self._acked_at = now  # `timeout` now bounds the TLS shutdown
                    self.transport.close()
                elif options.idle_timeout is not None and silent >= options.idle_timeout:
                    self._fail(CloseOutcome.IDLE_TIMEOUT)
                    return
        self._arm()

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

    def _tls_progress(self) -> bool:
        """TLS: True if the peer acknowledged more of our bytes since the last sample.

        An SSL transport reports only its own buffer: the bytes already
        encrypted and queued in the TCP transport under it are invisible
        (uvloop does not expose that transport), so an empty kernel queue
        for a moment reads as "all acknowledged" while megabytes wait above
        it. ``tcpi_bytes_acked`` still moving says they were not.
        """
        progress = bytes_acked(self.transport)
        if progress is None:
            return False
        acked = progress[1]
        moved = self._acked_mark >= 0 and acked != self._acked_mark
        self._acked_mark = acked
        return moved

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
        elif self.transport.get_write_buffer_size() or self._ioctl(_SIOCOUTQ):
            if now - self._progress_at >= self._opts().send_timeout:
                self._fail(CloseOutcome.IDLE_TIMEOUT)
                return True
        else:
            self._progress_at = now  # nothing of ours outstanding: nothing to wait for
        return False

    def _fail(self, outcome: CloseOutcome) -> None:
        """A bound fired: give up on grace, the plain-close way unless the options ask for a RST."""
        if not self._opts().reset_on_failure:
            self.let_go(outcome)
        elif self._give_up(outcome):
            reset(self.transport)

    def _give_up(self, outcome: CloseOutcome) -> bool:
        """Record ``outcome`` and what is unacknowledged; False if the connection is gone."""
        machine = self.machine
        if machine.state is HalfCloseState.CLOSED:
            return False
        if self.outcome is None or self.outcome is CloseOutcome.CLEAN:
            self.outcome = outcome
        self._measure()
        # TIMER ends a close under way; before one (a quiet wait that
        # stalled, say), giving up on the connection is an abort.
        machine.feed(Event.TIMER if machine.state in _CLOSE_STATES else Event.ABORT)
        return True

    def _peer_reset(self) -> None:
        self.outcome = CloseOutcome.PEER_RESET
        self.machine.feed(Event.PEER_RESET)
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
