"""The lingering close behind asyncio's streams API: ``graceful_close`` and ``abort``."""

from __future__ import annotations

import asyncio
import functools
import weakref
from typing import Final, TypeGuard, cast

from ._linger import Discarder, Linger
from ._options import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_DISCARD,
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_TIMEOUT,
    CloseOutcome,
    CloseResult,
    LingerOptions,
    check_final,
    check_flag,
)
from ._socket import reset

__all__ = ["abort", "graceful_close", "let_go", "linger_of"]

# The close of each writer, so that a second graceful_close() (or the server's,
# after a handler's own) returns the same result instead of starting another.
_LINGERS: Final[weakref.WeakKeyDictionary[asyncio.StreamWriter, Linger]] = (
    weakref.WeakKeyDictionary()
)


def _recorded(writer: asyncio.StreamWriter) -> Linger | None:
    """The close record already tied to ``writer``, if any.

    A :class:`GracefulServer` handler's writer carries its own (``linger``),
    so that the server's close needs no entry here and a later
    ``graceful_close(writer)`` still finds the result. (Such a writer never
    gets an entry: ``_start`` and ``abort`` add one only for a writer
    without a record of its own; so it is looked at first, which spares
    the weak dictionary's lookup.)
    """
    own = getattr(writer, "linger", None)
    if isinstance(own, Linger):
        return own
    return _LINGERS.get(writer)


def linger_of(transport: asyncio.BaseTransport) -> Linger | None:
    """The :class:`Linger` record driving ``transport``, if aiograceful has one."""
    protocol = transport.get_protocol()
    if isinstance(protocol, Discarder):
        return protocol.linger
    # GracefulProtocol and the server's stream protocol keep their record here.
    linger = getattr(protocol, "_graceful", None)
    return linger if isinstance(linger, Linger) else None


def _take_unread(protocol: asyncio.BaseProtocol | None) -> tuple[bytes, bool]:
    """Take the bytes a stream's reader holds unread; also say if it saw the peer's FIN.

    asyncio gives no public way to reach a writer's reader or to empty it
    without awaiting, so this reads CPython's ``StreamReaderProtocol._stream_reader``
    and ``StreamReader._buffer`` (both present from 3.8 to 3.13, and used by
    uvloop too, which runs asyncio's own streams). If they are missing, the
    unread bytes are simply not counted.
    """
    reader = getattr(protocol, "_stream_reader", None)
    if not isinstance(reader, asyncio.StreamReader):
        return b"", False
    return take_from(reader)


def take_from(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """:func:`_take_unread` for a reader already at hand (the stream server's own)."""
    buffer = getattr(reader, "_buffer", None)
    data = b""
    if isinstance(buffer, bytearray) and buffer:
        data = bytes(buffer)
        buffer.clear()
    return data, reader.at_eof()


def _check_writer(writer: object) -> asyncio.StreamWriter:
    if not isinstance(writer, asyncio.StreamWriter):
        raise TypeError(f"writer must be an asyncio.StreamWriter, got {type(writer).__name__}")
    return writer


async def graceful_close(
    writer: asyncio.StreamWriter,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_discard: int | None = DEFAULT_MAX_DISCARD,
    final: bytes = b"",
    keep_trailing: bool = False,
    reset_on_failure: bool = False,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
) -> CloseResult:
    """Close a stream without losing what was written to it.

    Flush ``writer``, write ``final`` if given, half-close (our FIN), then read
    and discard what the peer still sends until its FIN. Then close, wait for
    the transport to be gone, and return a :class:`CloseResult`.

    The close is bounded by lack of progress, never by progress. While our
    bytes are still going out, the peer may go ``send_timeout`` seconds
    without acknowledging any (a slow reader is never cut). Once they are all
    acknowledged, ``timeout`` seconds in all, ``idle_timeout`` seconds of
    silence (``None``: no idle limit) and ``max_discard`` bytes (``None``: no
    cap) bound the wait for the peer's FIN; after it, the socket stays open
    until the peer has acknowledged our last byte, so ``result.unacked`` can
    say 0. When a bound ends the close, it lets go as a plain close does: a
    FIN, with what the kernel holds still delivered (a RST only if bytes from
    the peer are unread); ``reset_on_failure=True`` resets instead, dropping
    it. With ``keep_trailing=True`` the peer's bytes are kept in
    ``result.trailing`` (up to ``max_discard``), which is how a client reads a
    server's last answers after its own FIN; the stream's unread bytes count
    among them.

    Works on a server's writer and a client's alike. Idempotent: a second call
    returns the first one's result (its options are ignored).

    Cancelling it (a ``wait_for`` or ``asyncio.timeout`` around it) gives up
    on grace, and ``CancelledError`` propagates; the outcome is ``ABORTED``.
    Where nothing is unread, the transport is then closed the plain way, so
    that what is queued still goes out as after ``writer.close()`` (a RST
    would drop it); where bytes are unread, closing would reset anyway, so it
    resets now. Bound a close with its own options rather than a timeout
    around it: a timeout cannot tell a slow reader from a stalled one.

    On a TLS writer, where asyncio has no half-close, it lingers all the
    same: it keeps reading and discarding until the peer's close_notify or
    FIN (or the bounds), then closes with close_notify. The writer's own
    ``wait_closed()`` completes too.

    Raises ``TypeError``/``ValueError`` for bad arguments, before touching the
    connection.
    """
    stream = _check_writer(writer)
    options = _options(timeout, idle_timeout, max_discard, reset_on_failure, send_timeout)
    data = final if final.__class__ is bytes else check_final(final)
    keep = False if keep_trailing is False else check_flag("keep_trailing", keep_trailing)
    linger = _recorded(stream)
    if linger is None or not linger.lingering:
        linger = _start(stream, linger, options, data, keep)
        if linger is None:
            # The connection is already gone; wait_closed() says how.
            return await _already_closed(stream)
    try:
        # Our own waiter: cancelling this task cancels it, which gives up on grace.
        return await linger.waiter()
    except asyncio.CancelledError:
        linger.cancel()
        raise


def _start(
    stream: asyncio.StreamWriter,
    linger: Linger | None,
    options: LingerOptions,
    final: bytes,
    keep_trailing: bool,
) -> Linger | None:
    """Begin the close of ``stream`` (its record ``linger``, if known); None if it is gone."""
    transport = cast(asyncio.Transport, stream.transport)
    # Typeshed says get_protocol() never returns None; asyncio's
    # transports do return None once connection_lost has run.
    protocol: asyncio.BaseProtocol | None = transport.get_protocol()
    if linger is None:
        linger = linger_of(transport)
    if linger is None:
        if protocol is None:
            return None
        linger = Linger(asyncio.get_running_loop(), transport, protocol)
    if not linger.lingering and linger.result is None:
        if final and not transport.is_closing():
            # Before the reader is emptied: asyncio and uvloop refuse
            # write() after the app's own writer.write_eof(), which no
            # public API reveals, and then nothing must have changed.
            transport.write(final)
            final = b""
        unread, peer_eof = _take_unread(protocol)
        linger.begin(
            options, final=final, keep_trailing=keep_trailing, unread=unread, peer_eof=peer_eof
        )
    if getattr(stream, "linger", None) is not linger:
        _LINGERS[stream] = linger
    return linger


@functools.lru_cache(maxsize=64, typed=True)
def _cached_options(
    timeout: float,
    idle_timeout: float | None,
    max_discard: int | None,
    reset_on_failure: bool,
    send_timeout: float,
) -> LingerOptions:
    return LingerOptions(timeout, idle_timeout, max_discard, reset_on_failure, send_timeout)


def _options(
    timeout: float,
    idle_timeout: float | None,
    max_discard: int | None,
    reset_on_failure: bool,
    send_timeout: float,
) -> LingerOptions:
    """The validated :class:`LingerOptions`, built once per distinct set of arguments.

    Validating them costs more than the rest of a close's bookkeeping, and a
    server passes the same ones on every connection. (Invalid ones raise, and
    an exception is never cached; unhashable ones go straight to the check.)
    """
    args = (timeout, idle_timeout, max_discard, reset_on_failure, send_timeout)
    try:
        hash(args)
    except TypeError:
        return LingerOptions(*args)
    return _cached_options(*args)


async def _already_closed(writer: asyncio.StreamWriter) -> CloseResult:
    try:
        await writer.wait_closed()
    except OSError:
        return CloseResult(CloseOutcome.PEER_RESET, 0, 0.0)
    return CloseResult(CloseOutcome.CLEAN, 0, 0.0)


def _is_transport(obj: object) -> TypeGuard[asyncio.BaseTransport]:
    # uvloop's transports do not derive from (nor register with)
    # asyncio.BaseTransport, so a transport is recognised by what abort needs.
    if isinstance(obj, asyncio.BaseTransport):
        return True
    return all(
        callable(getattr(obj, name, None)) for name in ("abort", "get_extra_info", "is_closing")
    )


def abort(writer_or_transport: asyncio.StreamWriter | asyncio.BaseTransport) -> None:
    """Reset a connection now: SO_LINGER {1, 0}, then close, so the peer gets a RST.

    ``transport.abort()`` alone is a plain close in asyncio and uvloop (a FIN
    when nothing is queued). Accepts a ``StreamWriter`` or a transport. If a
    graceful close is under way, its result becomes ``ABORTED``.
    """
    target: object = writer_or_transport
    if isinstance(target, asyncio.StreamWriter):
        linger = _recorded(target)
        transport: asyncio.BaseTransport = target.transport
    elif _is_transport(target):
        linger = None
        transport = target
    else:
        raise TypeError(
            "writer_or_transport must be an asyncio.StreamWriter or transport, "
            f"got {type(writer_or_transport).__name__}"
        )
    if linger is None:
        linger = linger_of(transport)
    if linger is None and isinstance(target, asyncio.StreamWriter):
        # Give the writer a record, so that a graceful_close() after this
        # abort reports ABORTED rather than guessing from wait_closed().
        protocol: asyncio.BaseProtocol | None = transport.get_protocol()
        if protocol is not None and not transport.is_closing():
            linger = Linger(
                asyncio.get_running_loop(), cast(asyncio.Transport, transport), protocol
            )
            linger.observe()
            _LINGERS[target] = linger
    if linger is not None:
        linger.abort()
    else:
        reset(transport)


def let_go(writer: asyncio.StreamWriter) -> None:
    """Stop waiting for ``writer``'s close now, the way a plain close does (:meth:`Linger.let_go`).

    A FIN, and what the kernel holds is still delivered: for a drop-in whose
    server's own grace ran out. Without a close under way, the transport is
    closed the same plain way (``abort()`` without SO_LINGER).
    """
    linger = _recorded(writer)
    if linger is None:
        linger = linger_of(writer.transport)
    if linger is not None:
        linger.let_go()
    else:
        writer.transport.abort()
