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

The defaults, beside nginx's and Apache's, are in :mod:`aiograceful._options`.

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
import math
from typing import Any, Final

from ._options import DEFAULT_OPTIONS, POLL_MAX, CloseOutcome, CloseResult, LingerOptions
from ._record import POLL_FIRST, CloseRecord
from ._socket import TCP_CLOSE, bytes_acked, reset, shutdown_error, tcp_state
from ._state import Event, HalfCloseState

__all__ = ["CloseWaiter", "Discarder", "Linger"]

# TLS has no half-close in asyncio or uvloop: our close_notify ends both
# directions, and a client that reads until EOF waits for it. So a TLS close
# sends it once our bytes are all acknowledged and the peer has been silent
# this long (or idle_timeout, if shorter). A peer still uploading is not
# silent, and keeps being read; one that is silent is waiting for us.
_TLS_QUIET: Final = 0.2

# Enum members as module constants: Python 3.11's EnumType has a __getattr__, so
# `HalfCloseState.X` is a slow class attribute lookup (about 850 instructions,
# callgrind), about 20 of them per connection on the close's path. A global costs one
# cached dict lookup (and a C variable when compiled).
_CLOSED: Final = HalfCloseState.CLOSED
_CLOSING: Final = HalfCloseState.CLOSING
_FLUSHING: Final = HalfCloseState.FLUSHING
_LINGERING: Final = HalfCloseState.LINGERING
_CLEAN: Final = CloseOutcome.CLEAN
_ABORTED: Final = CloseOutcome.ABORTED
_IDLE_TIMEOUT: Final = CloseOutcome.IDLE_TIMEOUT
_OVERFLOW: Final = CloseOutcome.OVERFLOW
_TIMEOUT: Final = CloseOutcome.TIMEOUT
_ON_ABORT: Final = Event.ABORT
_ON_CLOSE: Final = Event.CLOSE
_ON_EOF_WRITTEN: Final = Event.EOF_WRITTEN
_ON_FLUSHED: Final = Event.FLUSHED
_ON_LINGER: Final = Event.LINGER
_ON_PEER_EOF: Final = Event.PEER_EOF
_ON_TIMER: Final = Event.TIMER

# The states in which the transport has been told to close (not machine.live).
_ENDED: Final = frozenset({_CLOSING, _CLOSED})

# The states in which a close is under way (its timer may end it).
_CLOSE_STATES: Final = frozenset({_LINGERING, _FLUSHING, _CLOSING})


class Discarder(asyncio.Protocol):
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
        return f"<Discarder {self._linger!r}>"


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

    def detach(self) -> None:
        """Forget the close (its result is in): a later cancel gives up nothing."""
        self._linger = None

    def cancel(self, msg: Any | None = None) -> bool:
        cancelled = super().cancel(msg)
        linger = self._linger
        if cancelled and linger is not None:
            self._linger = None
            linger.cancel()
        return cancelled


class Linger(CloseRecord):
    """The close of one connection: flush, half-close, discard, the bounds, the outcome.

    The record it extends (:class:`~aiograceful._record.CloseRecord`) holds
    the state, the counts and the result; this adds the close proper.
    """

    __slots__ = ()

    def waiter(self) -> CloseWaiter:
        """A new :class:`CloseWaiter` for one caller, completed with the result."""
        waiter = CloseWaiter(loop=self.loop)
        result = self.result
        if result is not None:
            waiter.detach()
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

    def peer_eof(self) -> None:
        """The peer's FIN arrived (``eof_received``)."""
        machine = self.machine
        was = machine.state
        state = machine.feed(_ON_PEER_EOF)
        if state is _FLUSHING and was is not _FLUSHING:
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
        if machine.feed(_ON_EOF_WRITTEN) is _FLUSHING and was is not _FLUSHING:
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
            machine.feed(_ON_PEER_EOF)
        was = machine.state
        state = machine.feed(_ON_LINGER)
        transport.set_protocol(Discarder(self, self._forward))
        if unread and self._take(unread):
            return
        if transport.is_closing():
            # Closed (or aborted) under us before the close began: all that is
            # left is connection_lost, still bounded by the timer.
            if machine.live:
                machine.feed(_ON_CLOSE)
            self._arm()
            return
        if state is _LINGERING and not transport.is_reading():
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
        if state is _FLUSHING and was is not _FLUSHING:
            self._flush()
        elif self._acked_at is None and machine.state is _LINGERING:
            # _arm() for the common case, inlined: the first sample of the send side.
            poll = self._poll
            self._poll = min(poll * 2, options.poll_cap)
            self.at(min(self._hard_deadline, now + poll))
        else:
            self._arm()

    def abort(self) -> None:
        """RST now (outcome ABORTED). A no-op once ``connection_lost`` has run."""
        machine = self.machine
        if machine.state is _CLOSED:
            return
        if self.outcome is None or self.outcome is _CLEAN:
            self.outcome = _ABORTED
        self._measure()
        machine.feed(_ON_ABORT)
        reset(self.transport)

    def let_go(self, outcome: CloseOutcome = _TIMEOUT) -> None:
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
        if self.outcome is None or self.outcome is _CLEAN:
            self.outcome = _ABORTED
        machine.feed(_ON_CLOSE)
        self._acked_at = None
        self._outstanding = -1  # the next sample starts the count afresh
        self._poll = POLL_FIRST
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

    def observe(self) -> None:
        """Route the transport's callbacks through this record without starting a close.

        Used before an abort of a connection nobody was closing, so that
        ``connection_lost`` still makes the result.
        """
        if self._options is None:
            self._options = DEFAULT_OPTIONS
        self.transport.set_protocol(Discarder(self, self._forward))

    def shorten(self, seconds: float) -> None:
        """Bound everything left of the close (or of a quiet wait) to ``seconds`` from now.

        A server's forced close: unlike the close's own timers, this cuts a
        transfer in progress when it runs out (outcome TIMEOUT).
        """
        if self.machine.state is _CLOSED:
            return
        self._hard_deadline = min(self._hard_deadline, self.loop.time() + seconds)
        self.at(self._hard_deadline)

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
        self._fail(_OVERFLOW)
        return True

    def _over_cap(self) -> bool:
        cap = self._opts().max_discard
        if cap is None:
            return False
        trailing = self._trailing
        return self.discarded + (0 if trailing is None else len(trailing)) > cap

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
        self._poll = POLL_FIRST
        self._arm()

    def _flushed(self, exact: bool) -> None:
        self.machine.feed(_ON_FLUSHED)
        if self.outcome is None:
            self.outcome = _CLEAN
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
        if state is _CLOSED:
            return
        now = self.loop.time()
        when = self._hard_deadline
        if self._started is None and state is not _FLUSHING:
            if state is _CLOSING:
                when = min(when, self._next_poll(now, POLL_MAX))
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
            if state is _LINGERING:
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
        if state is _CLOSED:
            return
        now = self.loop.time()
        if now >= self._hard_deadline:
            self._fail(_TIMEOUT)
            return
        if self._started is None and state not in (_FLUSHING, _CLOSING):
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
                if state is _FLUSHING:
                    self._flushed(exact)
                    return
                if state is _LINGERING and self.machine.eof_written and self._over_cap():
                    # Read past the cap while our answer went out: now it is in.
                    self._fail(_OVERFLOW)
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
                    self._fail(_IDLE_TIMEOUT)
                    return
        else:
            if not self.machine.eof_written and self._tls_progress():
                # TLS: the peer is still acknowledging bytes of ours that sat
                # where we cannot see them: not all in yet, so the clock restarts.
                self._acked_at = now
            elif state is _LINGERING and self._over_cap():
                self._fail(_OVERFLOW)
                return
            acked_at = self._acked_at
            if now >= acked_at + options.timeout:
                self._fail(_TIMEOUT)
                return
            if state is _LINGERING:
                silent = now - max(self.last_read, acked_at)
                if not self.machine.eof_written and self._trailing is None and silent >= _TLS_QUIET:
                    # TLS: the peer has everything and is waiting for our close_notify.
                    self.machine.feed(_ON_CLOSE)
                    self._acked_at = now  # `timeout` now bounds the TLS shutdown
                    self.transport.close()
                elif options.idle_timeout is not None and silent >= options.idle_timeout:
                    self._fail(_IDLE_TIMEOUT)
                    return
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

    def _fail(self, outcome: CloseOutcome) -> None:
        """A bound fired: give up on grace, the plain-close way unless the options ask for a RST."""
        if not self._opts().reset_on_failure:
            self.let_go(outcome)
        elif self._give_up(outcome):
            reset(self.transport)

    def _give_up(self, outcome: CloseOutcome) -> bool:
        """Record ``outcome`` and what is unacknowledged; False if the connection is gone."""
        machine = self.machine
        if machine.state is _CLOSED:
            return False
        if self.outcome is None or self.outcome is _CLEAN:
            self.outcome = outcome
        self._measure()
        # TIMER ends a close under way; before one (a quiet wait that
        # stalled, say), giving up on the connection is an abort.
        machine.feed(_ON_TIMER if machine.state in _CLOSE_STATES else _ON_ABORT)
        return True
