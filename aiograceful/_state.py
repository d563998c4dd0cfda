"""The half-close state machine of one TCP connection.

Theory of operation
-------------------
A TCP connection has two directions that close independently. The peer closes
its direction by sending a FIN (asyncio calls ``eof_received``); we close ours
with ``write_eof()`` (``shutdown(SHUT_WR)``, a FIN after the send buffer has
drained). Closing the *socket* while bytes are still unread makes Linux send a
RST instead of a FIN, and the peer loses whatever we wrote last. So the socket
may only be closed once the peer's FIN has been seen, or when we have decided
to give up (a timer, a byte cap, an abort, a reset).

The states::

    OPEN --peer FIN--> PEER_EOF --our FIN / linger--> FLUSHING --flushed--> CLOSING --> CLOSED
      |                                                ^  ^                 ^      lost
      +--our FIN--> EOF_WRITTEN --peer FIN-------------+  |                 |
      |                  |                                |  timer, reset,  |
      +--linger--> LINGERING <--linger--+   peer FIN -----+  abort, close --+

* ``LINGERING``: a graceful close is under way. Our FIN is queued (or, on a
  transport that cannot half-close, the close waits for the peer's); whatever
  the peer still sends is read and discarded until its FIN, bounded by
  timers and a cap.
* ``FLUSHING``: both directions are done (the peer's FIN is in, and ours is
  queued, or the peer's TLS close arrived), but the peer has not yet
  acknowledged all we wrote. The socket stays open until it has (event
  ``FLUSHED``), so that closing it cannot cut what the kernel still sends,
  and so that the close can tell; the send-side timer bounds the wait.
* ``CLOSING``: the transport has been told to close or abort; the only thing
  left to happen is ``connection_lost``.
* ``CLOSED`` is the one terminal state: ``connection_lost`` has run. No event
  leaves it.

The whole machine is the table ``_TRANSITIONS`` below. Anything it does not
list is a bug in the caller and raises :class:`StateError`. The machine does
no I/O: the caller looks at the transition and acts on it (for example it
closes the transport when the state becomes ``CLOSING``).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["Event", "HalfCloseMachine", "HalfCloseState", "StateError"]


class HalfCloseState(enum.Enum):
    """Where a connection stands in its close."""

    # Members are singletons, so identity is equality: hash by identity in C
    # instead of Enum's Python-level hash of the name. The state table is
    # looked up on every event of every connection.
    __hash__ = object.__hash__

    #: Both directions are open.
    OPEN = "open"
    #: The peer sent its FIN; we may still write (TCP's CLOSE_WAIT).
    PEER_EOF = "peer-eof"
    #: We wrote our FIN; the peer may still send, and its data is still delivered.
    EOF_WRITTEN = "eof-written"
    #: A graceful close is under way: our FIN is out, the peer's data is discarded.
    LINGERING = "lingering"
    #: Both directions are done; waiting for the peer to acknowledge our last bytes.
    FLUSHING = "flushing"
    #: The transport is closing or aborting; ``connection_lost`` is all that is left.
    CLOSING = "closing"
    #: ``connection_lost`` has run. Terminal.
    CLOSED = "closed"


class Event(enum.Enum):
    """What can happen to a connection (internal)."""

    __hash__ = object.__hash__  # see HalfCloseState

    PEER_EOF = "peer-eof"  # eof_received: the peer's FIN
    EOF_WRITTEN = "eof-written"  # we called transport.write_eof()
    LINGER = "linger"  # a graceful close started
    FLUSHED = "flushed"  # the peer has acknowledged every byte we wrote
    CLOSE = "close"  # we called transport.close() (a close handed to the kernel)
    PEER_RESET = "peer-reset"  # an OSError told us the peer reset the connection
    ABORT = "abort"  # a local abort(): RST now
    TIMER = "timer"  # the linger deadline or byte cap ran out: force the close
    LOST = "lost"  # connection_lost


class StateError(RuntimeError):
    """An event arrived that the state table does not allow: a bug in aiograceful."""


_S = HalfCloseState
_E = Event

# Events that end a live connection the same way from every live state.
_FORCED: Final = {_E.CLOSE: _S.CLOSING, _E.PEER_RESET: _S.CLOSING, _E.ABORT: _S.CLOSING}

_TRANSITIONS: Final[dict[tuple[HalfCloseState, Event], HalfCloseState]] = {
    # OPEN: either side may half-close first, or we may start a graceful close.
    (_S.OPEN, _E.PEER_EOF): _S.PEER_EOF,
    (_S.OPEN, _E.EOF_WRITTEN): _S.EOF_WRITTEN,
    (_S.OPEN, _E.LINGER): _S.LINGERING,
    # PEER_EOF: the peer is done sending. Our FIN ends our direction too, and
    # a graceful close has nothing to read (the receive queue is empty); what
    # is left is the peer's acknowledgement of what we wrote.
    (_S.PEER_EOF, _E.EOF_WRITTEN): _S.FLUSHING,
    (_S.PEER_EOF, _E.LINGER): _S.FLUSHING,
    # EOF_WRITTEN: the peer's FIN ends both directions. write_eof() is idempotent.
    (_S.EOF_WRITTEN, _E.PEER_EOF): _S.FLUSHING,
    (_S.EOF_WRITTEN, _E.EOF_WRITTEN): _S.EOF_WRITTEN,
    (_S.EOF_WRITTEN, _E.LINGER): _S.LINGERING,
    # LINGERING: the peer's FIN is the clean end; the timer is the forced one.
    (_S.LINGERING, _E.PEER_EOF): _S.FLUSHING,
    (_S.LINGERING, _E.EOF_WRITTEN): _S.LINGERING,
    (_S.LINGERING, _E.LINGER): _S.LINGERING,
    (_S.LINGERING, _E.TIMER): _S.CLOSING,
    # FLUSHING: the peer's acknowledgement of our last byte is the clean end;
    # a graceful close asked for now (or our FIN, on the linger's path)
    # changes nothing; the timer bounds a peer that stopped reading.
    (_S.FLUSHING, _E.FLUSHED): _S.CLOSING,
    (_S.FLUSHING, _E.EOF_WRITTEN): _S.FLUSHING,
    (_S.FLUSHING, _E.LINGER): _S.FLUSHING,
    (_S.FLUSHING, _E.PEER_EOF): _S.FLUSHING,
    (_S.FLUSHING, _E.TIMER): _S.CLOSING,
    # CLOSING: a late FIN, a reset, a second close or a forced abort change
    # nothing but how it ends; the timer still bounds a close() that is
    # flushing to a peer that does not read.
    (_S.CLOSING, _E.PEER_EOF): _S.CLOSING,
    (_S.CLOSING, _E.LINGER): _S.CLOSING,
    (_S.CLOSING, _E.TIMER): _S.CLOSING,
    (_S.CLOSING, _E.FLUSHED): _S.CLOSING,
    **{
        (state, event): target
        for state in _S
        if state is not _S.CLOSED
        for event, target in _FORCED.items()
    },
    # connection_lost ends every live state.
    **{(state, _E.LOST): _S.CLOSED for state in _S if state is not _S.CLOSED},
}


# The same table, keyed by state then event, for feed(): two dict lookups
# cost less than building and hashing a tuple key on every event.
_NEXT: Final[dict[HalfCloseState, dict[Event, HalfCloseState]]] = {state: {} for state in _S}
for (_state, _event), _target in _TRANSITIONS.items():
    _NEXT[_state][_event] = _target
del _state, _event, _target


# Enum members as module constants: Python 3.11's EnumType has a __getattr__, so
# `HalfCloseState.X` is a slow class attribute lookup (about 850 instructions,
# callgrind), about 20 of them per connection on the close's path. A global costs one
# cached dict lookup (and a C variable when compiled).
_OPEN: Final = HalfCloseState.OPEN
_CLOSING: Final = HalfCloseState.CLOSING
_CLOSED: Final = HalfCloseState.CLOSED
_ON_PEER_EOF: Final = Event.PEER_EOF
_ON_EOF_WRITTEN: Final = Event.EOF_WRITTEN


def next_state(state: HalfCloseState, event: Event) -> HalfCloseState:
    """Return the state ``event`` leads to from ``state``, or raise :class:`StateError`."""
    try:
        return _TRANSITIONS[state, event]
    except KeyError:
        raise StateError(f"event {event.name} is not allowed in state {state.name}") from None


class HalfCloseMachine:
    """The state of one connection, plus the two facts its history implies.

    ``peer_eof`` and ``eof_written`` cannot be read off ``state`` alone once the
    connection is ``CLOSING`` (a close may follow either side's FIN, or none),
    so the machine records them as it feeds the events that set them.
    """

    __slots__ = ("eof_written", "peer_eof", "state")

    def __init__(self) -> None:
        self.state = _OPEN
        self.peer_eof = False
        self.eof_written = False

    def feed(self, event: Event) -> HalfCloseState:
        """Apply ``event``; return the new state. Raises :class:`StateError` if not allowed."""
        # next_state(), inlined: this runs a few times per connection.
        try:
            self.state = _NEXT[self.state][event]
        except KeyError:
            raise StateError(
                f"event {event.name} is not allowed in state {self.state.name}"
            ) from None
        if event is _ON_PEER_EOF:
            self.peer_eof = True
        elif event is _ON_EOF_WRITTEN:
            self.eof_written = True
        return self.state

    @property
    def live(self) -> bool:
        """True until the transport has been told to close (state before ``CLOSING``)."""
        return self.state not in (_CLOSING, _CLOSED)

    def __repr__(self) -> str:
        return (
            f"<HalfCloseMachine {self.state.name} peer_eof={self.peer_eof} "
            f"eof_written={self.eof_written}>"
        )
