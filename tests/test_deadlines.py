"""The per-loop deadline structure: one heap and one loop handle for every timer of a loop."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import random
import threading
import weakref
from collections.abc import Callable

import pytest
import uvloop
from _util import wait_until

from aiograceful._deadlines import _SLACK, DeadlineTimer, deadlines_of

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}


class _Owner:
    """Stands for a connection: the timer's callback is one of its methods."""

    def __init__(self) -> None:
        self.fired = 0

    def fire(self) -> None:
        self.fired += 1


async def test_deadline_timer_fires_in_deadline_order() -> None:
    """Timers armed in any order run in the order of their deadlines, none before its time."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    offsets = [0.05, 0.01, 0.04, 0.02, 0.03]
    seen: list[tuple[float, float]] = []
    timers = []
    for offset in offsets:
        when = now + offset

        def fire(when: float = when) -> None:
            seen.append((when, loop.time()))

        timer = DeadlineTimer(loop, fire)
        timer.at(when)
        timers.append(timer)
    assert all(t.armed for t in timers)
    await wait_until(lambda: len(seen) == len(offsets), 5.0)
    assert [w for w, _ in seen] == sorted(now + o for o in offsets)
    assert all(ran >= when - _SLACK for when, ran in seen)
    assert not any(t.armed for t in timers)
    assert deadlines_of(loop).live == 0


async def test_deadline_timer_cancel_never_runs() -> None:
    """A cancelled timer's callback never runs, and the structure holds nothing after it."""
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    cancelled = DeadlineTimer(loop, lambda: fired.append("cancelled"))
    kept = DeadlineTimer(loop, lambda: fired.append("kept"))
    cancelled.at(loop.time() + 0.01)
    kept.at(loop.time() + 0.02)
    cancelled.cancel()
    assert not cancelled.armed
    cancelled.cancel()  # idempotent
    await wait_until(lambda: fired == ["kept"], 5.0)
    await asyncio.sleep(0.02)
    assert fired == ["kept"]
    assert deadlines_of(loop).size == 0


async def test_deadline_timer_rearm_earlier_moves_it() -> None:
    """at() with an earlier deadline reschedules: the callback runs at the earlier one."""
    loop = asyncio.get_running_loop()
    owner = _Owner()
    timer = DeadlineTimer(loop, owner.fire)
    timer.at(loop.time() + 60)
    early = loop.time() + 0.01
    timer.at(early)
    assert timer.when == early
    await wait_until(lambda: owner.fired == 1, 5.0)
    assert not timer.armed
    assert deadlines_of(loop).live == 0


async def test_deadline_timer_later_deadline_is_lazy() -> None:
    """at() with a later deadline keeps the earlier one (the callback re-arms if it must)."""
    loop = asyncio.get_running_loop()
    owner = _Owner()
    timer = DeadlineTimer(loop, owner.fire)
    first = loop.time() + 0.01
    timer.at(first)
    timer.at(first + 60)
    assert timer.when == first
    assert deadlines_of(loop).size == 1
    await wait_until(lambda: owner.fired == 1, 5.0)


async def test_deadline_timer_many_cancelled_and_fired() -> None:
    """10,000 timers, half cancelled: the rest run in order; the heap stays bounded, then empty."""
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    now = loop.time()
    seen: list[float] = []
    timers = []
    for _ in range(10_000):
        when = now + 0.02 + rng.random() * 0.1
        timer = DeadlineTimer(loop, functools.partial(seen.append, when))
        timer.at(when)
        timers.append(timer)
    structure = deadlines_of(loop)
    rng.shuffle(timers)
    for timer in timers[:5000]:
        timer.cancel()
    assert structure.live == 5000
    # Dead entries never outnumber live ones by more than the compaction threshold.
    assert structure.size <= 2 * structure.live + 257
    await wait_until(lambda: len(seen) == 5000, 5.0)
    assert seen == sorted(seen)
    assert structure.live == 0
    assert structure.size == 0


async def test_deadline_timer_callback_raising_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A callback that raises is logged on the aiograceful logger; the others due still run."""
    loop = asyncio.get_running_loop()
    owner = _Owner()

    def boom() -> None:
        raise ValueError("boom")

    when = loop.time() + 0.01
    DeadlineTimer(loop, boom).at(when)
    DeadlineTimer(loop, owner.fire).at(when)
    with caplog.at_level(logging.ERROR, logger="aiograceful"):
        await wait_until(lambda: owner.fired == 1, 5.0)
    assert any(
        r.name == "aiograceful" and r.exc_info and isinstance(r.exc_info[1], ValueError)
        for r in caplog.records
    )


async def test_deadline_timer_callback_rearming_in_the_past_ends_its_pass() -> None:
    """A callback that re-arms at a past deadline runs again on a later pass, not in a loop."""
    loop = asyncio.get_running_loop()
    runs: list[int] = []
    timer: DeadlineTimer

    def again() -> None:
        runs.append(1)
        if len(runs) < 3:
            timer.at(loop.time() - 1.0)

    timer = DeadlineTimer(loop, again)
    timer.at(loop.time())
    await wait_until(lambda: len(runs) == 3, 5.0)
    await asyncio.sleep(0.01)
    assert len(runs) == 3
    assert not timer.armed


async def test_deadline_timer_cancel_frees_the_owner_at_once() -> None:
    """Cancelling drops the structure's reference: the owner is freed without the cyclic GC."""
    loop = asyncio.get_running_loop()
    owner = _Owner()
    alive = weakref.ref(owner)
    timer = DeadlineTimer(loop, owner.fire)
    timer.at(loop.time() + 60)
    DeadlineTimer(loop, _Owner().fire).at(loop.time() + 60)  # keeps the heap non-empty
    timer.cancel()
    del owner, timer
    assert alive() is None


async def test_deadline_timer_one_structure_per_loop() -> None:
    """Every timer of a loop shares its structure; its repr shows the state."""
    loop = asyncio.get_running_loop()
    a = DeadlineTimer(loop, _Owner().fire)
    b = DeadlineTimer(loop, _Owner().fire)
    assert a._deadlines is b._deadlines is deadlines_of(loop)
    assert repr(a) == "<DeadlineTimer unarmed>"
    a.at(loop.time() + 60)
    assert repr(a).startswith("<DeadlineTimer when=")
    assert "live=1" in repr(deadlines_of(loop))
    a.cancel()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_deadline_timer_loops_in_threads_keep_their_own(loop_name: str) -> None:
    """Loops in several threads get a structure each; a timer runs on its own loop's thread."""
    ran: dict[int, list[int]] = {}
    structures: list[object] = []

    def worker(index: int) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            got: list[int] = []
            for k in range(50):

                def fire(k: int = k) -> None:
                    got.append(threading.get_ident())
                    if len(got) == 50:
                        done.set_result(None)

                DeadlineTimer(loop, fire).at(loop.time() + 0.001 * (k % 10))
            structures.append(deadlines_of(loop))
            await asyncio.wait_for(done, 5)
            ran[index] = got

        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            runner.run(main())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(ran) == 3
    assert len({id(s) for s in structures}) == 3
    idents = {i: set(got) for i, got in ran.items()}
    assert all(len(s) == 1 for s in idents.values())
    assert len(set().union(*idents.values())) == 3


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_deadline_timer_loop_closed_with_timers_pending(loop_name: str) -> None:
    """A loop closed and dropped with timers armed raises nothing and frees loop and owners."""
    loop = LOOPS[loop_name]()
    owners = [_Owner() for _ in range(100)]
    for owner in owners:
        DeadlineTimer(loop, owner.fire).at(loop.time() + 60)
    loop.run_until_complete(asyncio.sleep(0))
    refs = [weakref.ref(o) for o in owners]
    loop_ref = weakref.ref(loop)
    loop.close()
    del loop, owners, owner
    gc.collect()
    assert loop_ref() is None
    assert all(r() is None for r in refs)
