"""The half-close state table alone: no sockets, no loop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiograceful._state import (
    _TRANSITIONS,
    Event,
    HalfCloseMachine,
    HalfCloseState,
    StateError,
    next_state,
)

S = HalfCloseState
E = Event

#: How far a state is along the close; a connection never moves to a lower rank.
RANK = {
    S.OPEN: 0,
    S.PEER_EOF: 0,
    S.EOF_WRITTEN: 0,
    S.LINGERING: 1,
    S.FLUSHING: 2,
    S.CLOSING: 3,
    S.CLOSED: 4,
}

#: The table as the design describes it, written out by hand so that a change
#: to _TRANSITIONS has to be made twice.
EXPECTED = {
    (S.OPEN, E.PEER_EOF): S.PEER_EOF,
    (S.OPEN, E.EOF_WRITTEN): S.EOF_WRITTEN,
    (S.OPEN, E.LINGER): S.LINGERING,
    (S.OPEN, E.CLOSE): S.CLOSING,
    (S.OPEN, E.PEER_RESET): S.CLOSING,
    (S.OPEN, E.ABORT): S.CLOSING,
    (S.OPEN, E.LOST): S.CLOSED,
    (S.PEER_EOF, E.EOF_WRITTEN): S.FLUSHING,
    (S.PEER_EOF, E.LINGER): S.FLUSHING,
    (S.PEER_EOF, E.CLOSE): S.CLOSING,
    (S.PEER_EOF, E.PEER_RESET): S.CLOSING,
    (S.PEER_EOF, E.ABORT): S.CLOSING,
    (S.PEER_EOF, E.LOST): S.CLOSED,
    (S.EOF_WRITTEN, E.PEER_EOF): S.FLUSHING,
    (S.EOF_WRITTEN, E.EOF_WRITTEN): S.EOF_WRITTEN,
    (S.EOF_WRITTEN, E.LINGER): S.LINGERING,
    (S.EOF_WRITTEN, E.CLOSE): S.CLOSING,
    (S.EOF_WRITTEN, E.PEER_RESET): S.CLOSING,
    (S.EOF_WRITTEN, E.ABORT): S.CLOSING,
    (S.EOF_WRITTEN, E.LOST): S.CLOSED,
    (S.LINGERING, E.PEER_EOF): S.FLUSHING,
    (S.LINGERING, E.EOF_WRITTEN): S.LINGERING,
    (S.LINGERING, E.LINGER): S.LINGERING,
    (S.LINGERING, E.TIMER): S.CLOSING,
    (S.LINGERING, E.CLOSE): S.CLOSING,
    (S.LINGERING, E.PEER_RESET): S.CLOSING,
    (S.LINGERING, E.ABORT): S.CLOSING,
    (S.LINGERING, E.LOST): S.CLOSED,
    (S.FLUSHING, E.FLUSHED): S.CLOSING,
    (S.FLUSHING, E.EOF_WRITTEN): S.FLUSHING,
    (S.FLUSHING, E.LINGER): S.FLUSHING,
    (S.FLUSHING, E.PEER_EOF): S.FLUSHING,
    (S.FLUSHING, E.TIMER): S.CLOSING,
    (S.FLUSHING, E.CLOSE): S.CLOSING,
    (S.FLUSHING, E.PEER_RESET): S.CLOSING,
    (S.FLUSHING, E.ABORT): S.CLOSING,
    (S.FLUSHING, E.LOST): S.CLOSED,
    (S.CLOSING, E.PEER_EOF): S.CLOSING,
    (S.CLOSING, E.LINGER): S.CLOSING,
    (S.CLOSING, E.TIMER): S.CLOSING,
    (S.CLOSING, E.FLUSHED): S.CLOSING,
    (S.CLOSING, E.CLOSE): S.CLOSING,
    (S.CLOSING, E.PEER_RESET): S.CLOSING,
    (S.CLOSING, E.ABORT): S.CLOSING,
    (S.CLOSING, E.LOST): S.CLOSED,
}

DISALLOWED = [(s, e) for s in S for e in E if (s, e) not in EXPECTED]


def run(*events: Event) -> HalfCloseMachine:
    machine = HalfCloseMachine()
    for event in events:
        machine.feed(event)
    return machine


def test_state_table_is_exactly_the_documented_one() -> None:
    """_TRANSITIONS lists exactly the documented transitions, no more, no fewer."""
    assert dict(_TRANSITIONS) == EXPECTED


@pytest.mark.parametrize(
    ("state", "event", "target"),
    [(s, e, t) for (s, e), t in EXPECTED.items()],
    ids=[f"{s.name}-{e.name}" for (s, e) in EXPECTED],
)
def test_state_allowed_transition(state: S, event: E, target: S) -> None:
    """Every allowed (state, event) pair leads to its documented state."""
    assert next_state(state, event) is target


@pytest.mark.parametrize(
    ("state", "event"), DISALLOWED, ids=[f"{s.name}-{e.name}" for s, e in DISALLOWED]
)
def test_state_disallowed_event_raises(state: S, event: E) -> None:
    """An event the table does not list raises StateError naming state and event."""
    with pytest.raises(StateError, match=f"{event.name}.*{state.name}"):
        next_state(state, event)


def test_state_disallowed_feed_leaves_machine_unchanged() -> None:
    """A refused event changes neither the state nor the flags."""
    machine = run(E.PEER_EOF)
    with pytest.raises(StateError):
        machine.feed(E.PEER_EOF)
    assert (machine.state, machine.peer_eof, machine.eof_written) == (S.PEER_EOF, True, False)


def test_state_error_is_a_runtime_error() -> None:
    """StateError is the one internal error, a RuntimeError."""
    assert issubclass(StateError, RuntimeError)


def test_state_peer_half_closes_first_then_we_do() -> None:
    """Peer FIN, our FIN: FLUSHING until the peer acknowledges, then CLOSING, CLOSED."""
    machine = HalfCloseMachine()
    # (state, live) in one tuple: mypy would keep `machine.live` narrowed across feed().
    assert (machine.feed(E.PEER_EOF), machine.live) == (S.PEER_EOF, True)
    # The socket stays open until our bytes are acknowledged.
    assert (machine.feed(E.EOF_WRITTEN), machine.live) == (S.FLUSHING, True)
    assert (machine.feed(E.FLUSHED), machine.live) == (S.CLOSING, False)
    assert machine.feed(E.LOST) is S.CLOSED
    assert machine.peer_eof
    assert machine.eof_written


def test_state_we_half_close_first_then_peer() -> None:
    """Our FIN, a repeated write_eof, then the peer's FIN: FLUSHING, then CLOSING."""
    machine = run(E.EOF_WRITTEN, E.EOF_WRITTEN)
    assert machine.state is S.EOF_WRITTEN
    assert machine.feed(E.PEER_EOF) is S.FLUSHING
    assert machine.feed(E.FLUSHED) is S.CLOSING


def test_state_linger_ends_clean_on_peer_fin() -> None:
    """OPEN -> LINGERING (our FIN queued) -> peer FIN -> FLUSHING -> acked -> CLOSING -> CLOSED."""
    machine = run(E.LINGER, E.EOF_WRITTEN)
    assert machine.state is S.LINGERING
    assert machine.eof_written
    assert machine.feed(E.PEER_EOF) is S.FLUSHING
    assert machine.feed(E.FLUSHED) is S.CLOSING
    assert machine.feed(E.LOST) is S.CLOSED


def test_state_flushing_forced_by_timer() -> None:
    """A peer that stops reading after its FIN: the send-side timer forces CLOSING."""
    assert run(E.LINGER, E.PEER_EOF, E.TIMER).state is S.CLOSING


def test_state_linger_forced_by_timer() -> None:
    """A timer while lingering forces CLOSING; a second timer in CLOSING is harmless."""
    machine = run(E.LINGER, E.TIMER, E.TIMER)
    assert machine.state is S.CLOSING
    assert not machine.peer_eof


def test_state_linger_after_peer_eof_has_nothing_to_read() -> None:
    """A graceful close after the peer's FIN has nothing to read: FLUSHING at once."""
    assert run(E.PEER_EOF, E.LINGER).state is S.FLUSHING


def test_state_flushed_needs_both_directions_done() -> None:
    """FLUSHED is only an event of FLUSHING (and of CLOSING, where it changes nothing)."""
    for state in (S.OPEN, S.PEER_EOF, S.EOF_WRITTEN, S.LINGERING):
        with pytest.raises(StateError):
            next_state(state, E.FLUSHED)


def test_state_timer_needs_a_linger() -> None:
    """The linger timer cannot fire before a linger started."""
    for state in (S.OPEN, S.PEER_EOF, S.EOF_WRITTEN):
        with pytest.raises(StateError):
            next_state(state, E.TIMER)


def test_state_reset_and_abort_from_every_live_state() -> None:
    """A reset, an abort or a close take every live state to CLOSING."""
    for state in S:
        if state is S.CLOSED:
            continue
        for event in (E.PEER_RESET, E.ABORT, E.CLOSE):
            assert next_state(state, event) is S.CLOSING


def test_state_nothing_leaves_closed() -> None:
    """Every event in CLOSED raises StateError."""
    machine = run(E.LOST)
    for event in E:
        with pytest.raises(StateError):
            machine.feed(event)
        assert machine.state is S.CLOSED


def test_state_machine_repr_shows_state_and_flags() -> None:
    """The machine's repr names its state and flags."""
    text = repr(run(E.EOF_WRITTEN))
    assert "EOF_WRITTEN" in text
    assert "eof_written=True" in text
    assert "peer_eof=False" in text


@given(st.lists(st.sampled_from(list(E)), max_size=30))
def test_state_random_sequences_keep_invariants(events: list[Event]) -> None:
    """Random events: rank never falls, CLOSED is final and entered once, flags match history."""
    machine = HalfCloseMachine()
    accepted: list[Event] = []
    closed_entries = 0
    for event in events:
        before = machine.state
        try:
            after = machine.feed(event)
        except StateError:
            assert machine.state is before
            assert (before, event) not in EXPECTED
            continue
        assert (before, event) in EXPECTED
        accepted.append(event)
        assert before is not S.CLOSED
        assert RANK[after] >= RANK[before]
        if RANK[after] == 0 and before is not S.OPEN:
            # Within the first rank the only move is to stay (a repeated write_eof).
            assert after is before
        if after is S.CLOSED:
            closed_entries += 1
        assert machine.peer_eof == (E.PEER_EOF in accepted)
        assert machine.eof_written == (E.EOF_WRITTEN in accepted)
        assert machine.live == (after not in (S.CLOSING, S.CLOSED))
    if E.LOST in events:
        assert machine.state is S.CLOSED
        assert closed_entries == 1
        assert accepted.count(E.LOST) == 1
        assert accepted[-1] is E.LOST
    else:
        assert machine.state is not S.CLOSED
        assert closed_entries == 0
