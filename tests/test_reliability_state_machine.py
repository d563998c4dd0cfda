"""Property tests: random interleavings of everything that can happen to a connection.

A hypothesis ``RuleBasedStateMachine`` owns one event loop (asyncio's or
uvloop's, through ``asyncio.Runner``) and one real TCP connection on
loopback. Our end is a :class:`GracefulProtocol`; the peer's end is a plain
non-blocking socket that the rules drive directly: it writes, reads,
half-closes, resets. The other rules write, ``write_eof()``,
``close_gracefully()`` with small random bounds, ``abort()``, cancel close
futures and ``wait_closed()`` waits, and let the loop run for a while so that
timers expire. Every rule ends by letting the loop turn.

Teardown makes the connection end (a graceful close if none started, the
peer cooperating), then checks the invariants:

* ``connection_lost`` ran exactly once;
* there is exactly one ``CloseResult``: every close future and every
  ``wait_closed()`` that was not cancelled got that same result;
* no timer is armed, the transport is closing;
* nothing reached the loop's exception handler;
* ``data_received`` got the peer's bytes in order, and none after the
  graceful close began; bytes delivered + discarded + kept never exceed what
  the peer sent, and account for all of it when the close was CLEAN;
* a CLEAN close delivered everything we wrote, then our FIN, to the peer;
  an abort, or a failed close with ``reset_on_failure``, reset the peer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
from typing import Any

import pytest
from _faults import LOOP_FACTORIES, ExceptionHandlerRecorder, reset_socket, tcp_pair
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from aiograceful import UNSET, CloseOutcome, CloseResult, GracefulProtocol, LingerOptions

# The peer's bytes follow this pattern, so that order and duplication show.
# (20 steps of at most 180 kB each stay well inside 8 MB.)
_PATTERN = bytes(range(251)) * 32_768
_OUR_PATTERN = bytes(range(250, -1, -1)) * 32_768

_SIZES = st.sampled_from([1, 700, 50_000, 180_000])
_FAILED = (CloseOutcome.TIMEOUT, CloseOutcome.IDLE_TIMEOUT, CloseOutcome.OVERFLOW)

# Examples per loop: each is one connection and up to 20 steps. Raise it with
# AIOGRACEFUL_PROPERTY_EXAMPLES for a longer hunt; the run stays derandomized.
EXAMPLES = int(os.environ.get("AIOGRACEFUL_PROPERTY_EXAMPLES", "150"))

# Figures over every example, printed by the test (-s).
FIGURES: collections.Counter[str] = collections.Counter()


class RecordingProtocol(GracefulProtocol):
    """Records what the base class lets through to the user's side."""

    # Small bounds, so that a close started by on_peer_eof ends quickly too.
    linger = LingerOptions(timeout=0.3, idle_timeout=0.1, max_discard=100_000)

    def __init__(self, close_on_peer_eof: bool) -> None:
        self.close_on_peer_eof = close_on_peer_eof
        self.received = bytearray()
        self.received_after_linger = 0
        self.lost_calls: list[Exception | None] = []
        self.peer_eof_hooks = 0

    def data_received(self, data: bytes) -> None:
        graceful = self._graceful
        if graceful is not None and graceful.lingering:
            self.received_after_linger += len(data)
        self.received += data

    def on_peer_eof(self) -> None:
        self.peer_eof_hooks += 1
        if self.close_on_peer_eof:
            super().on_peer_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_calls.append(exc)
        super().connection_lost(exc)


class ConnectionMachine(RuleBasedStateMachine):
    """One GracefulProtocol over loopback TCP, driven by random rules."""

    loop_name = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner(loop_factory=LOOP_FACTORIES[self.loop_name])
        self.loop = self.runner.get_loop()
        self.handler = ExceptionHandlerRecorder()
        self.loop.set_exception_handler(self.handler)
        self.proto: RecordingProtocol | None = None
        self.peer: socket.socket | None = None
        self.peer_sent = 0  # bytes the peer's kernel accepted
        self.peer_shut = False
        self.peer_was_reset = False  # the peer reset the connection (its RST)
        self.peer_received = bytearray()
        self.peer_saw_eof = False
        self.peer_saw_reset = False
        self.local_sent = bytearray()  # what we wrote, final included
        self.close_futures: list[asyncio.Future[CloseResult]] = []
        self.wait_tasks: list[asyncio.Task[CloseResult]] = []
        self.forced_before_end = False  # abort() or a cancelled close before the result
        self.aborted = False  # abort() itself (a cancelled close may hand over instead)
        self.options: LingerOptions | None = None  # the options of the close that started
        self.tasks_cancelled = 0
        # The model: what the rules asked for, whatever the connection did.
        # Only these may feed a precondition (see applies()).
        self.asked: collections.Counter[str] = collections.Counter()

    # -- plumbing ----------------------------------------------------------

    def run(self, action: Any = None) -> None:
        """Run ``action()`` in the loop, then let the loop turn a few times."""

        async def step() -> None:
            if action is not None:
                action()
            for _ in range(3):
                await asyncio.sleep(0)

        self.runner.run(step())

    def connected(self) -> RecordingProtocol:
        assert self.proto is not None
        return self.proto

    def peer_drain(self) -> None:
        """Read what the peer has received, without blocking."""
        peer = self.peer
        if peer is None or self.peer_saw_eof or self.peer_saw_reset:
            return
        while True:
            try:
                data = peer.recv(262_144)
            except BlockingIOError:
                return
            except OSError:
                self.peer_saw_reset = True
                return
            if not data:
                self.peer_saw_eof = True
                return
            self.peer_received += data

    def applies(self, condition: bool) -> bool:
        """Whether a rule applies to the connection's real state now.

        Preconditions see only what the rules did (the model), never the real
        connection: its state depends on timing, and Hypothesis must draw the
        same rules when it replays a case. A rule that does not apply to the
        real state is a counted no-op instead.
        """
        if not condition:
            FIGURES["steps that did not apply"] += 1
        return condition

    def may_be_live(self) -> bool:
        """The model's view: nothing has aborted the connection yet."""
        return not self.asked["abort"]

    # -- setup ---------------------------------------------------------------

    @initialize(close_on_peer_eof=st.booleans())
    def connect(self, close_on_peer_eof: bool) -> None:
        ours, peer = tcp_pair()
        self.peer = peer
        proto = RecordingProtocol(close_on_peer_eof)

        async def attach() -> None:
            await self.loop.connect_accepted_socket(lambda: proto, sock=ours)

        self.runner.run(attach())
        self.proto = proto
        FIGURES["connections"] += 1

    # -- the peer ------------------------------------------------------------

    def peer_alive(self) -> bool:
        return self.peer is not None and not self.peer_was_reset

    @precondition(lambda self: self.peer_alive() and not self.peer_shut)
    @rule(size=_SIZES)
    def peer_write(self, size: int) -> None:
        assert self.peer is not None
        data = _PATTERN[self.peer_sent % 251 :][:size]
        try:
            self.peer_sent += self.peer.send(data)
        except BlockingIOError:
            pass
        except OSError:
            # Our side reset the connection; send() consumed the error.
            self.peer_saw_reset = True
        FIGURES["peer writes"] += 1
        self.run()

    @precondition(lambda self: self.peer_alive())
    @rule()
    def peer_read(self) -> None:
        self.peer_drain()
        FIGURES["peer reads"] += 1
        self.run()

    @precondition(lambda self: self.peer_alive() and not self.peer_shut)
    @rule()
    def peer_half_close(self) -> None:
        assert self.peer is not None
        with contextlib.suppress(OSError):
            self.peer.shutdown(socket.SHUT_WR)
        self.peer_shut = True
        FIGURES["peer half-closes"] += 1
        self.run()

    @precondition(lambda self: self.peer_alive())
    @rule()
    def peer_reset(self) -> None:
        assert self.peer is not None
        reset_socket(self.peer)
        self.peer_was_reset = True
        FIGURES["peer resets"] += 1
        self.run()

    # -- our side ------------------------------------------------------------

    def live(self) -> bool:
        """Connected, and connection_lost has not run yet."""
        return self.proto is not None and self.proto.close_result is None

    def may_write(self) -> bool:
        proto = self.proto
        return (
            proto is not None
            and not proto.transport.is_closing()
            and not proto.eof_written
            and proto._graceful is not None
            and not proto._graceful.lingering
        )

    @precondition(lambda self: self.may_be_live())
    @rule(size=_SIZES)
    def local_write(self, size: int) -> None:
        if not self.applies(self.may_write()):
            return
        proto = self.connected()
        data = _OUR_PATTERN[len(self.local_sent) % 251 :][:size]
        self.local_sent += data
        self.run(lambda: proto.transport.write(data))
        FIGURES["local writes"] += 1

    @precondition(lambda self: self.may_be_live())
    @rule()
    def local_write_eof(self) -> None:
        self.asked["local_write_eof"] += 1
        if not self.applies(self.live()):
            return
        self.run(self.connected().write_eof)
        FIGURES["write_eof calls"] += 1

    @precondition(lambda self: self.may_be_live())
    @rule(
        timeout=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
        idle_timeout=st.sampled_from([None, 0.0, 0.02, 0.1]),
        max_discard=st.sampled_from([None, 0, 100, 100_000]),
        final=st.sampled_from([b"", b"FINAL-WORDS"]),
        keep_trailing=st.booleans(),
        reset_on_failure=st.sampled_from([UNSET, True, False]),
    )
    def close_gracefully(
        self,
        timeout: float,
        idle_timeout: float | None,
        max_discard: int | None,
        final: bytes,
        keep_trailing: bool,
        reset_on_failure: Any,
    ) -> None:
        self.asked["close_gracefully"] += 1
        if not self.applies(self.live()):
            return
        proto = self.connected()
        graceful = proto._graceful
        assert graceful is not None

        def act() -> None:
            started_before = graceful.lingering
            closing_before = proto.transport.is_closing()
            if final and not started_before and graceful.machine.live and proto.eof_written:
                # Misuse: our FIN is out, so ``final`` cannot be sent. It must
                # raise before anything changes.
                state = proto.state
                with pytest.raises(RuntimeError, match="write_eof"):
                    proto.close_gracefully(final=final, timeout=timeout)
                assert proto.state is state
                assert not graceful.lingering
                assert not graceful.timer_armed
                FIGURES["final after write_eof refused"] += 1
                return
            fut = proto.close_gracefully(
                timeout=timeout,
                idle_timeout=idle_timeout,
                max_discard=max_discard,
                final=final,
                keep_trailing=keep_trailing,
                reset_on_failure=reset_on_failure,
            )
            self.close_futures.append(fut)
            if not started_before and graceful.lingering:
                self.options = graceful._options
                if not closing_before:
                    self.local_sent += final

        self.run(act)
        FIGURES["close_gracefully calls"] += 1

    @precondition(lambda self: self.may_be_live())
    @rule()
    def close_gracefully_with_defaults(self) -> None:
        self.asked["close_gracefully_with_defaults"] += 1
        """The common call: the class's linger options, no final message."""
        if not self.applies(self.live()):
            return
        proto = self.connected()
        graceful = proto._graceful
        assert graceful is not None

        def act() -> None:
            started_before = graceful.lingering
            self.close_futures.append(proto.close_gracefully())
            if not started_before and graceful.lingering:
                self.options = graceful._options

        self.run(act)
        FIGURES["close_gracefully calls"] += 1

    @precondition(
        lambda self: self.asked["close_gracefully"] or self.asked["close_gracefully_with_defaults"]
    )
    @rule(which=st.integers(0, 10))
    def cancel_close(self, which: int) -> None:
        pending = [f for f in self.close_futures if not f.done()]
        if not self.applies(bool(pending)):
            return
        fut = pending[which % len(pending)]
        if self.connected().close_result is None:
            self.forced_before_end = True
        self.run(fut.cancel)
        FIGURES["close futures cancelled"] += 1

    @precondition(lambda self: self.may_be_live())
    @rule()
    def wait_closed(self) -> None:
        self.asked["wait_closed"] += 1
        if not self.applies(self.live()):
            return
        proto = self.connected()
        self.run(lambda: self.wait_tasks.append(self.loop.create_task(proto.wait_closed())))
        FIGURES["wait_closed waits"] += 1

    @precondition(lambda self: self.asked["wait_closed"])
    @rule(which=st.integers(0, 10))
    def cancel_wait_closed(self, which: int) -> None:
        pending = [t for t in self.wait_tasks if not t.done()]
        if not self.applies(bool(pending)):
            return
        self.run(pending[which % len(pending)].cancel)
        self.tasks_cancelled += 1
        FIGURES["wait_closed waits cancelled"] += 1

    @precondition(lambda self: self.may_be_live())
    @rule()
    def abort(self) -> None:
        self.asked["abort"] += 1
        if not self.applies(self.live()):
            return
        self.forced_before_end = True
        self.aborted = True
        self.run(self.connected().abort)
        FIGURES["aborts"] += 1

    @precondition(lambda self: sum(self.asked.values()) > 0 or self.peer_was_reset)
    @rule()
    def calls_after_the_end(self) -> None:
        """Once connection_lost has run, every call is a harmless no-op."""
        if not self.applies(not self.live()):
            return
        proto = self.connected()
        result = proto.close_result

        def act() -> None:
            proto.write_eof()
            proto.abort()
            self.close_futures.append(proto.close_gracefully(timeout=0.0))
            self.wait_tasks.append(self.loop.create_task(proto.wait_closed()))

        self.run(act)
        assert proto.close_result is result
        assert self.close_futures[-1].result() is result
        FIGURES["calls after the end"] += 1

    @precondition(lambda self: self.may_be_live())
    @rule(seconds=st.sampled_from([0.0, 0.003, 0.025, 0.12]))
    def let_time_pass(self, seconds: float) -> None:
        if not self.applies(self.live()):
            return

        async def sleep() -> None:
            await asyncio.sleep(seconds)

        self.runner.run(sleep())
        FIGURES["sleeps"] += 1

    # -- invariants that hold after every step -----------------------------

    @invariant()
    def at_most_one_connection_lost(self) -> None:
        proto = self.proto
        if proto is not None:
            assert len(proto.lost_calls) <= 1, proto.lost_calls
            assert (proto.close_result is None) == (not proto.lost_calls)

    @invariant()
    def nothing_reached_the_exception_handler(self) -> None:
        assert not self.handler.contexts, self.handler.describe()

    # -- the end -------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.proto is not None:
                self.runner.run(self.finish())
                self.check_peer_view()
        finally:
            if self.peer is not None:
                self.peer.close()
            self.runner.close()
        assert not self.handler.contexts, self.handler.describe()

    async def finish(self) -> None:
        """End the connection (boundedly), then check the invariants."""
        proto = self.connected()
        graceful = proto._graceful
        assert graceful is not None
        loop = self.loop
        if proto.close_result is None and not graceful.lingering:
            self.close_futures.append(proto.close_gracefully(timeout=1.0, idle_timeout=None))
            self.options = graceful._options
        deadline = loop.time() + 5.0
        while proto.close_result is None and loop.time() < deadline:
            # The peer cooperates: it reads, and half-closes.
            self.peer_drain()
            if self.peer_alive() and not self.peer_shut:
                assert self.peer is not None
                with contextlib.suppress(OSError):
                    self.peer.shutdown(socket.SHUT_WR)
                self.peer_shut = True
            await asyncio.sleep(0.002)
        if proto.close_result is None:
            proto.abort()
            pytest.fail(f"the connection did not end within 5 s: {proto!r}")
        waiters: list[asyncio.Future[CloseResult]] = [*self.close_futures, *self.wait_tasks]
        if waiters:
            await asyncio.wait(waiters, timeout=1.0)
        for _ in range(3):
            await asyncio.sleep(0)

        result = proto.close_result
        FIGURES[f"outcome {result.outcome.name}"] += 1
        assert len(proto.lost_calls) == 1, proto.lost_calls
        for waiter in waiters:
            assert waiter.done(), f"a waiter is still pending after connection_lost: {waiter!r}"
            if not waiter.cancelled():
                assert waiter.result() == result
        assert not graceful.timer_armed, f"a timer is still armed after the close: {graceful!r}"
        assert proto.transport.is_closing()
        assert result.duration >= 0.0

        # The user's side got the peer's bytes in order, and none once lingering.
        assert proto.received_after_linger == 0
        assert bytes(proto.received) == _PATTERN[: len(proto.received)]
        accounted = len(proto.received) + result.discarded + len(result.trailing)
        assert accounted <= self.peer_sent, (accounted, self.peer_sent, result)
        if result.outcome is CloseOutcome.CLEAN and not self.peer_was_reset:
            assert accounted == self.peer_sent, (accounted, self.peer_sent, result)
        if self.forced_before_end:
            assert result.outcome is not CloseOutcome.CLEAN, result

    def check_peer_view(self) -> None:
        """What the peer saw must match the outcome: all our bytes and a FIN, or a RST."""
        if self.peer is None or self.peer_was_reset:
            return
        end = time.monotonic() + 2.0
        while not (self.peer_saw_eof or self.peer_saw_reset) and time.monotonic() < end:
            self.peer_drain()
            time.sleep(0.001)
        result = self.connected().close_result
        assert result is not None
        assert self.peer_saw_eof or self.peer_saw_reset, "the peer saw neither FIN nor RST"
        if result.outcome is CloseOutcome.CLEAN:
            assert self.peer_saw_eof, "a CLEAN close reset the peer"
            assert bytes(self.peer_received) == bytes(self.local_sent), (
                f"a CLEAN close lost data: peer got {len(self.peer_received)} of "
                f"{len(self.local_sent)} bytes"
            )
        elif (
            result.outcome is CloseOutcome.ABORTED
            and not self.aborted
            and not self.peer_saw_reset
            and self.peer_saw_eof
        ):
            # A cancelled close with nothing unread hands what is queued to the
            # kernel (a plain close), so that it still arrives: all of it.
            self.peer_drain()
            assert bytes(self.peer_received) == bytes(self.local_sent), (
                f"a cancelled close lost data: peer got {len(self.peer_received)} of "
                f"{len(self.local_sent)} bytes"
            )
        elif result.outcome is CloseOutcome.ABORTED or (
            result.outcome in _FAILED and self.options is not None and self.options.reset_on_failure
        ):
            if not self.peer_saw_reset and self.peer_shut:
                # Both FINs may have crossed before the abort: the exchange was
                # complete and the peer, in TIME_WAIT, ignores the RST.
                return
            if self.peer_saw_eof and not self.peer_saw_reset:
                # Our FIN came first: Linux then reports the RST as a pending
                # socket error (EPIPE in CLOSE_WAIT), never through recv().
                assert self.peer is not None
                error = self.peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                self.peer_saw_reset = error != 0
            assert self.peer_saw_reset, f"{result.outcome.name} did not reset the peer"


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=20,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.mark.parametrize("loop_name", sorted(LOOP_FACTORIES))
def test_graceful_protocol_random_interleavings_keep_invariants(loop_name: str) -> None:
    """Any interleaving of peer and local actions ends once, with one result, nothing leaked."""
    machine = type(f"ConnectionMachine_{loop_name}", (ConnectionMachine,), {"loop_name": loop_name})
    FIGURES.clear()
    run_state_machine_as_test(machine, settings=_settings(EXAMPLES))
    print(f"\n[{loop_name}] " + ", ".join(f"{k}: {v}" for k, v in sorted(FIGURES.items())))
    assert FIGURES["connections"] >= EXAMPLES


async def test_close_gracefully_final_after_write_eof_raises_before_touching() -> None:
    """close_gracefully(final=...) after write_eof() raises RuntimeError and changes nothing."""
    ours, peer = tcp_pair()
    proto = RecordingProtocol(close_on_peer_eof=False)
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: proto, sock=ours)
        proto.write_eof()
        with pytest.raises(RuntimeError, match="write_eof"):
            proto.close_gracefully(final=b"too late")
        assert proto.state.name == "EOF_WRITTEN"
        assert proto._graceful is not None
        assert not proto._graceful.lingering
        # The connection is intact: a close without ``final`` still ends CLEAN.
        fut = proto.close_gracefully(timeout=2.0)
        peer.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(fut, 5.0)
        assert result.outcome is CloseOutcome.CLEAN
    finally:
        peer.close()
