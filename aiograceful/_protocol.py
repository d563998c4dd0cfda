"""GracefulProtocol: an asyncio Protocol that knows how its connection closes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, ClassVar, Final

from ._linger import Linger
from ._options import UNSET, CloseResult, LingerOptions, Unset, check_final, check_flag, logger
from ._state import HalfCloseState

__all__ = ["GracefulProtocol", "merge_options"]

# Enum members as module constants (EnumType's __getattr__ makes `HalfCloseState.X` slow:
# see _linger).
_OPEN: Final = HalfCloseState.OPEN
_PEER_EOF: Final = HalfCloseState.PEER_EOF


def merge_options(
    base: LingerOptions,
    timeout: float | Unset,
    idle_timeout: float | Unset | None,
    max_discard: int | Unset | None,
    reset_on_failure: bool | Unset,
    send_timeout: float | Unset = UNSET,
) -> LingerOptions:
    """``base`` with the arguments that were given replacing its fields (validated).

    Built once per distinct ``base`` and arguments (a server's force passes
    the same ones to every connection; validating costs more than the rest
    of a close's bookkeeping). Invalid arguments raise, and an exception is
    never cached; unhashable ones go straight to the check.
    """
    if timeout is idle_timeout is max_discard is reset_on_failure is send_timeout is UNSET:
        return base
    args = (base, timeout, idle_timeout, max_discard, reset_on_failure, send_timeout)
    try:
        hash(args)
    except TypeError:
        return _merge(*args)
    return _merge_cached(*args)


def _merge(
    base: LingerOptions,
    timeout: float | Unset,
    idle_timeout: float | Unset | None,
    max_discard: int | Unset | None,
    reset_on_failure: bool | Unset,
    send_timeout: float | Unset,
) -> LingerOptions:
    changes: dict[str, Any] = {}
    if timeout is not UNSET:
        changes["timeout"] = timeout
    if idle_timeout is not UNSET:
        changes["idle_timeout"] = idle_timeout
    if max_discard is not UNSET:
        changes["max_discard"] = max_discard
    if reset_on_failure is not UNSET:
        changes["reset_on_failure"] = reset_on_failure
    if send_timeout is not UNSET:
        changes["send_timeout"] = send_timeout
    if not changes:
        return base
    fields = {
        "timeout": base.timeout,
        "idle_timeout": base.idle_timeout,
        "max_discard": base.max_discard,
        "reset_on_failure": base.reset_on_failure,
        "send_timeout": base.send_timeout,
        **changes,
    }
    return LingerOptions(**fields)


# typed: 1, 1.0 and True hash alike, and only some of them are valid.
_merge_cached: Final = functools.lru_cache(maxsize=64, typed=True)(_merge)


class GracefulProtocol(asyncio.Protocol):
    """An ``asyncio.Protocol`` that tracks its half-close and closes without losing data.

    Subclass it and write ``data_received`` as usual: it is yours and is never
    wrapped. If you override ``connection_made`` or ``connection_lost``, call
    ``super()``. What the base class adds:

    * :attr:`state`, :attr:`peer_eof`, :attr:`eof_written`: where the close stands.
    * When the peer half-closes, the transport stays open for writing and
      :meth:`on_peer_eof` runs (default: close gracefully once our writes are
      flushed).
    * When both directions are closed and the peer has acknowledged what we
      wrote, the transport is closed: no connection is left in CLOSE_WAIT.
    * :meth:`close_gracefully` lingers (flush, our FIN, discard until the
      peer's FIN, bounded) and reports a :class:`CloseResult`; :meth:`abort`
      sends a real RST; :meth:`wait_closed` waits for the result.
    * :meth:`on_shutdown_notice` is how a :class:`GracefulServer` asks the
      connection to wind down (default: :meth:`close_when_quiet`).

    While a graceful close lingers, what the peer still sends is counted and
    discarded, not passed to ``data_received``.

    The linger defaults come from the class attribute :attr:`linger`, which a
    subclass may override; a server created with linger options sets them per
    connection.
    """

    #: Linger defaults for :meth:`close_gracefully` (and so for the default hooks).
    linger: ClassVar[LingerOptions] = LingerOptions()

    transport: asyncio.Transport
    _graceful: Linger | None = None
    # Set per instance by a GracefulServer's protocol factory.
    _linger_options: LingerOptions | None = None
    _graceful_attach: Callable[[GracefulProtocol], None] | None = None

    # -- asyncio callbacks (thin: they feed the state machine) -------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Record the transport and start tracking the connection. Call ``super()``."""
        # A stream transport (what create_server gives a Protocol); no
        # typing.cast() here: it is a Python call on every connection.
        self.transport = transport  # type: ignore[assignment]
        self._graceful = Linger(
            asyncio.get_running_loop(),
            transport,  # type: ignore[arg-type]
            self,
            self._linger_options or self.linger,
        )
        attach = self._graceful_attach
        if attach is not None:
            attach(self)

    def eof_received(self) -> bool:
        """The peer half-closed: feed the state machine, then run :meth:`on_peer_eof`."""
        graceful = self._graceful
        if graceful is None:  # pragma: no cover - transports call connection_made first
            return False
        if graceful.machine.peer_eof:
            # uvloop reads the FIN again if resume_reading() is called after it
            # (asyncio does not): the event has happened already.
            return self.transport.can_write_eof()
        graceful.peer_eof()
        if graceful.state is _PEER_EOF:
            self._run_hook(self.on_peer_eof)
        # True keeps the transport open for writing after the peer's FIN: the
        # answer to what it sent may still be on its way. (asyncio closes the
        # transport on a false return.) TLS in asyncio cannot half-close and
        # logs a warning on True, so there the answer is False.
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: complete the close result. Call ``super()``."""
        graceful = self._graceful
        if graceful is not None and graceful.result is None:
            # (After a linger, the discarder has made the result already.)
            graceful.lost(exc)

    # -- hooks ---------------------------------------------------------------

    def on_peer_eof(self) -> None:
        """The peer half-closed; we may still write. Default: close gracefully when flushed.

        The default closes at once when nothing of ours is buffered in the
        transport, and otherwise waits with :meth:`close_when_quiet`, so that
        an answer still being produced under flow control (``pause_writing``
        / ``resume_writing``) is not cut. It cannot know of an answer that
        has not been written yet: one produced later (from a task, a timer, a
        thread) needs this hook overridden, or its first write after the
        close meets ``write() after write_eof()``. Override it to finish
        answering first; call :meth:`write_eof` or :meth:`close_gracefully`
        when done (``write_eof`` then closes the transport once the peer has
        acknowledged what we wrote, since both directions are done).
        """
        if self.transport.get_write_buffer_size():
            self.close_when_quiet()
        else:
            self.close_gracefully()

    def on_shutdown_notice(self) -> None:
        """The server is shutting down: tell the peer in protocol terms.

        Called at most once, and only while our write side is open, so it may
        always write (a GOAWAY, a ``Connection: close``, a BYE line); an
        override decides when the connection closes. Default: the server's
        quiet window: once about a second passes with no byte moving either
        way, a graceful close, so that a request already on the wire is
        answered and a transfer in progress is never cut (the server's grace
        period bounds it instead). Called directly (``super()`` from an
        override), the default is :meth:`close_when_quiet`.
        """
        self.close_when_quiet()

    def on_idle_timeout(self) -> None:
        """No data moved for the server's ``idle_timeout``. Default: :meth:`close_gracefully`.

        Override it to decline while a request is half-received (return
        without closing; the server asks again after another period). Only a
        :class:`GracefulServer` with ``idle_timeout`` calls it.
        """
        self.close_gracefully()

    # -- queries ---------------------------------------------------------

    @property
    def state(self) -> HalfCloseState:
        """The connection's :class:`HalfCloseState` (``OPEN`` before ``connection_made``)."""
        graceful = self._graceful
        return _OPEN if graceful is None else graceful.state

    @property
    def peer_eof(self) -> bool:
        """True once the peer's FIN has arrived."""
        graceful = self._graceful
        return graceful is not None and graceful.machine.peer_eof

    @property
    def eof_written(self) -> bool:
        """True once our FIN has been queued (``write_eof``, or a graceful close)."""
        graceful = self._graceful
        return graceful is not None and graceful.machine.eof_written

    @property
    def close_result(self) -> CloseResult | None:
        """The :class:`CloseResult`, once ``connection_lost`` has run; else None."""
        graceful = self._graceful
        return None if graceful is None else graceful.result

    # -- actions ---------------------------------------------------------

    def write_eof(self) -> None:
        """Half-close our side (send our FIN after what is buffered). Idempotent.

        If the peer's FIN is already in, the transport is closed. A peer reset
        met here ends the connection with ``PEER_RESET``; nothing is raised.
        """
        graceful = self._require()
        if not self.transport.can_write_eof():
            # TLS (asyncio and uvloop) has no half-close: close_notify ends
            # both directions. Raise as asyncio does rather than close, which
            # would cut the answer to what the peer may still be sending.
            raise NotImplementedError(
                "write_eof() is not supported on this transport (TLS cannot half-close); "
                "use close_gracefully(), which lingers until the peer closes"
            )
        graceful.write_eof()

    def close_gracefully(
        self,
        *,
        timeout: float | Unset = UNSET,
        idle_timeout: float | Unset | None = UNSET,
        max_discard: int | Unset | None = UNSET,
        final: bytes = b"",
        keep_trailing: bool = False,
        reset_on_failure: bool | Unset = UNSET,
        send_timeout: float | Unset = UNSET,
    ) -> asyncio.Future[CloseResult]:
        """Start a lingering close; return a future of its :class:`CloseResult`.

        Flush, write ``final``, send our FIN, then discard (or keep, with
        ``keep_trailing``) what the peer sends until its FIN. While our bytes
        are still going out, the peer may go ``send_timeout`` seconds without
        acknowledging any; once they are all acknowledged, ``timeout``
        seconds in all, ``idle_timeout`` seconds of silence and
        ``max_discard`` bytes bound the wait for its FIN. Options left out
        come from the server's linger options, else :attr:`linger`.

        Idempotent: a second call starts nothing (its options are ignored) and
        its future gets the same result. Each call returns a future of its own;
        a synchronous callback may call this and never await it. Cancelling
        the returned future gives up on grace (outcome ABORTED): the transport
        is closed the plain way when nothing is unread, and reset otherwise.
        """
        base = self._linger_options or self.linger
        # The common call, close_gracefully() alone, checks nothing it need not.
        if timeout is idle_timeout is max_discard is reset_on_failure is send_timeout is UNSET:
            options = base
        else:
            options = merge_options(
                base, timeout, idle_timeout, max_discard, reset_on_failure, send_timeout
            )
        data = final if final.__class__ is bytes else check_final(final)
        keep = False if keep_trailing is False else check_flag("keep_trailing", keep_trailing)
        graceful = self._graceful
        if graceful is None:
            graceful = self._require()  # raises
        graceful.begin(options, final=data, keep_trailing=keep)
        return graceful.waiter()

    def close_when_quiet(
        self,
        *,
        timeout: float | Unset = UNSET,
        idle_timeout: float | Unset | None = UNSET,
        max_discard: int | Unset | None = UNSET,
        reset_on_failure: bool | Unset = UNSET,
        send_timeout: float | Unset = UNSET,
    ) -> asyncio.Future[CloseResult]:
        """Close gracefully once nothing is buffered either way; return a future of the result.

        Quiet means: our transport buffer empty, every byte we wrote
        acknowledged by the peer (where the platform tells) and nothing in
        the kernel's receive queue. A transfer in progress therefore
        finishes first. The connection's state is sampled by its timer (every
        few milliseconds at first, backing off to 250 ms); nothing else
        bounds the wait, so a server's grace period (or the caller) must.
        The options are those of :meth:`close_gracefully`. Cancelling the
        returned future gives up on grace, as it does there.
        """
        options = merge_options(
            self._linger_options or self.linger,
            timeout,
            idle_timeout,
            max_discard,
            reset_on_failure,
            send_timeout,
        )
        graceful = self._require()
        waiter = graceful.waiter()
        graceful.when_quiet(lambda: graceful.begin(options))
        return waiter

    def abort(self) -> None:
        """Reset the connection now: SO_LINGER {1, 0}, then close (a real RST).

        The close result's outcome is ``ABORTED``. A no-op once the connection
        is gone.
        """
        self._require().abort()

    async def wait_closed(self) -> CloseResult:
        """Wait for the connection to end; return its :class:`CloseResult`.

        Cancelling this wait does not touch the connection.
        """
        return await asyncio.shield(self._require().future())

    # -- helpers -----------------------------------------------------------

    def _require(self) -> Linger:
        graceful = self._graceful
        if graceful is None:
            raise RuntimeError(f"{type(self).__name__} is not connected (no connection_made yet)")
        return graceful

    def _run_hook(self, hook: Callable[[], None]) -> None:
        """Run a user hook; if it raises, log it and close the connection gracefully."""
        try:
            hook()
        except Exception:
            logger.exception(
                "%s.%s raised; closing the connection", type(self).__name__, hook.__name__
            )
            self.close_gracefully()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._graceful!r}>"
