"""Micro-benchmark: a deadline per connection as a loop handle, or on the per-loop heap.

``python -m benchmarks.deadlines``: for each loop, the memory of 10,000 armed
timers (tracemalloc: Python allocations, which for uvloop include its
``UVTimer`` objects but not libuv's C structures inside them) and the CPU time
of the fast path of a lingering close: arm a deadline 5 s ahead, cancel it
(the peer's FIN came within a round trip), and of arm + fire. Not a test and
not part of ``python -m benchmarks``; it prints its figures.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from aiograceful._deadlines import DeadlineTimer as HeapTimer

from ._harness import loop_factory, median

N = 10_000
ROUNDS = 5


def _noop() -> None:
    pass


class HandleTimer:
    """The alternative measured: one ``loop.call_at`` handle per connection.

    The same interface and laziness as the heap's timer (an earlier deadline
    re-arms, a later one is left to the callback), so only the structure
    behind it differs. aiograceful used it before the per-loop heap.
    """

    __slots__ = ("_callback", "_handle", "_loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self.when = math.inf

    def at(self, when: float) -> None:
        """Run the callback no later than ``when`` (loop time)."""
        if self._handle is not None:
            if when >= self.when:
                return
            self._handle.cancel()
        self.when = when
        # The timer is the handle's callback (__call__): no bound method per arming.
        self._handle = self._loop.call_at(when, self)

    def cancel(self) -> None:
        """Drop the armed handle, if any."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self.when = math.inf

    def __call__(self) -> None:
        self._handle = None
        self.when = math.inf
        self._callback()


async def _measure(cls: Callable[..., Any]) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    # Warm up: the structure and the loop's own lists exist before measuring.
    warm = [cls(loop, _noop) for _ in range(100)]
    for t in warm:
        t.at(loop.time() + 5)
    for t in warm:
        t.cancel()
    await asyncio.sleep(0)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    timers = [cls(loop, _noop) for _ in range(N)]
    made = tracemalloc.get_traced_memory()[0]
    now = loop.time()
    for i, t in enumerate(timers):
        t.at(now + 5 + i * 1e-6)
    armed = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    for t in timers:
        t.cancel()
    await asyncio.sleep(0)
    del timers
    gc.collect()
    arm_cancel = []
    arm_fire = []
    for _ in range(ROUNDS):
        timers = [cls(loop, _noop) for _ in range(N)]
        c0 = time.process_time()
        for t in timers:
            t.at(loop.time() + 5)
            t.cancel()
        await asyncio.sleep(0)  # asyncio/uvloop finish cancelled handles on the next iteration
        arm_cancel.append((time.process_time() - c0) / N)
        fired = [0]

        def hit(fired: list[int] = fired) -> None:
            fired[0] += 1

        timers = [cls(loop, hit) for _ in range(N)]
        c0 = time.process_time()
        when = loop.time() + 0.001
        for i, t in enumerate(timers):
            t.at(when + i * 1e-9)  # distinct deadlines, as connections' are
        for _ in range(2000):
            if fired[0] == N:
                break
            await asyncio.sleep(0.001)
        arm_fire.append((time.process_time() - c0) / N)
    return {
        "bytes_per_timer_object": (made - before) / N,
        "bytes_per_armed": (armed - made) / N,
        "arm_cancel_us": median(arm_cancel) * 1e6,
        "arm_fire_us": median(arm_fire) * 1e6,
    }


def main() -> None:
    print(
        "| loop | timer | object (B) | armed, beyond the object (B) "
        "| arm+cancel (us) | arm+fire (us) |"
    )
    print("|---|---|---|---|---|---|")
    for loop_name in ("uvloop", "asyncio"):
        for label, cls in (
            ("loop.call_at handle", HandleTimer),
            ("per-loop heap", HeapTimer),
        ):
            with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
                r = runner.run(_measure(cls))
            print(
                f"| {loop_name} | {label} | {r['bytes_per_timer_object']:.0f} | "
                f"{r['bytes_per_armed']:.0f} | {r['arm_cancel_us']:.2f} | {r['arm_fire_us']:.2f} |"
            )


if __name__ == "__main__":
    main()
