"""What a close may do and what it reports: the options, the outcomes, the result, their checks.

* :class:`LingerOptions`: the bounds of one graceful close, validated once
  when made (one frozen object, shared by every close that uses it).
* :class:`CloseOutcome` and :class:`CloseResult`: how a close ended.
* ``check_*``: the argument checks every public entry point uses, raising
  ``TypeError``/``ValueError`` naming the argument before anything is touched.
* ``logger``: the ``aiograceful`` logger.

Defaults, beside the servers that linger in C:

==================  =========================  ===================  ==================
                    aiograceful                nginx                Apache httpd
==================  =========================  ===================  ==================
no byte acked       ``send_timeout`` 60 s      send_timeout 60 s    Timeout 60 s
total linger time   ``timeout`` 30 s           lingering_time 30 s  30 s (MAX_SECS)
peer silent         ``idle_timeout`` 5 s       lingering_timeout 5s 2 s (SECONDS_TO_LINGER)
bytes discarded     ``max_discard`` 64 MiB     no cap               no cap
==================  =========================  ===================  ==================
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from typing import Final

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_DISCARD",
    "DEFAULT_OPTIONS",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "POLL_MAX",
    "UNSET",
    "CloseOutcome",
    "CloseResult",
    "LingerOptions",
    "Unset",
    "check_final",
    "check_flag",
    "check_seconds",
    "logger",
]

logger: Final = logging.getLogger("aiograceful")

DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_IDLE_TIMEOUT: Final = 5.0
DEFAULT_MAX_DISCARD: Final = 64 * 1024 * 1024
DEFAULT_SEND_TIMEOUT: Final = 60.0
#: The longest interval between two samples of a close's send side.
POLL_MAX: Final = 1.0


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


class Unset(enum.Enum):
    """The type of :data:`UNSET`."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: Sentinel: "use the connection's configured default" in ``close_gracefully``.
UNSET: Final = Unset.UNSET


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
        poll = min(POLL_MAX, send / 4, timeout / 4)
        if idle is not None:
            poll = min(poll, idle / 4)
        # Computed once: the close's timer reads it on every arming.
        object.__setattr__(self, "poll_cap", max(poll, 0.001))


#: The options of a close nobody configured.
DEFAULT_OPTIONS: Final = LingerOptions()


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
