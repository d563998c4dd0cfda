"""One deadline structure per event loop, behind a per-connection timer object.

The timer is a :class:`Timed`: a :class:`DeadlineTimer` (with a callback), or a
connection's close record itself (``_linger.Linger``), so that a lingering
connection carries no timer object of its own.

A loop timer handle per connection was the first design. On uvloop each
``loop.call_at`` is a libuv timer handle (a ``TimerHandle`` and a ``UVTimer``
around a ``uv_timer_t``: about 550 bytes), started on creation and
``uv_close``-d on cancel; asyncio's is a ``TimerHandle`` pushed on the loop's
heap, and a cancelled one stays there until it is due (or until the loop
cleans its heap). A lingering close arms a deadline and, on the fast path
(the peer's FIN within a round trip), cancels it again at once.

So each loop gets one :class:`_Deadlines`: a binary heap of ``[when, timer]``
entries and at most one armed loop handle, for the earliest live entry.
Arming pushes a two-item list; the loop handle is only rescheduled when the
new deadline is earlier than every other (rare: new deadlines are mostly the
latest ones). Cancelling is O(1): the entry is marked dead (its reference to
the timer dropped, so the connection behind it is freed at once) and left in
the heap; dead entries are skipped when they reach the top, the heap is
emptied when no live entry is left, and it is rebuilt when dead entries
outnumber live ones, so it stays within twice the armed count.

The structure lives as an attribute of its loop (asyncio's loops and
``uvloop.Loop`` both take attributes), so several loops in several threads
never share one, and a loop dropped with timers pending is freed with them by
the cyclic GC (loop -> structure -> loop handle -> loop). A loop that takes no
attributes gets one structure per timer, which is the old handle-per-timer
design.

Timing: a due entry's callback may run up to :data:`_SLACK` early, as a loop's
own timers may (uvloop's are in whole milliseconds); callers that find their
deadline still ahead re-arm, which :meth:`DeadlineTimer.at` makes cheap. A
callback that raises is logged on the ``aiograceful`` logger and the other due
callbacks still run.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable
from typing import Any, Final

__all__ = ["DeadlineTimer", "Timed", "deadlines_of"]

logger: Final = logging.getLogger("aiograceful")

# Due entries within this many seconds are run together: a loop may call its
# handle a little early (uvloop rounds to milliseconds), and one pass then
# runs everything due in the same millisecond.
_SLACK: Final = 0.001
# Rebuild the heap when dead entries outnumber live ones and there are more
# than this many of them.
_COMPACT_MIN: Final = 256
_ATTR: Final = "_aiograceful_deadlines"


class _Dead:
    """The marker a cancelled entry holds instead of its timer."""

    __slots__ = ()

    def __lt__(self, other: object) -> bool:
        # Compared only when two entries have the same deadline: any order will do.
        return False

    def __repr__(self) -> str:
        return "<dead>"


_DEAD: Final = _Dead()


class _Deadlines:
    """The deadlines of one loop: a heap of ``[when, timer]`` and one loop handle."""

    __slots__ = ("_dead", "_handle", "_handle_when", "_heap", "_live", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[list[Any]] = []
        self._live = 0
        self._dead = 0
        self._handle: asyncio.TimerHandle | None = None
        self._handle_when = math.inf

    @property
    def live(self) -> int:
        """Armed timers."""
        return self._live

    @property
    def size(self) -> int:
        """Entries in the heap, live and dead."""
        return len(self._heap)

    def push(self, entry: list[Any]) -> None:
        """Add a live ``[when, timer]`` entry."""
        heapq.heappush(self._heap, entry)
        self._live += 1
        if entry[0] < self._handle_when:
            self._arm(entry[0])

    def drop(self, entry: list[Any]) -> None:
        """Mark a live entry dead (its timer was cancelled or re-armed earlier)."""
        entry[1] = _DEAD
        live = self._live = self._live - 1
        if not live:
            # Nothing is armed: drop every entry. The loop handle, if any, is
            # left to fire once and find nothing (cancelling it would cost a
            # uv_close on uvloop, each time a quiet server goes idle).
            self._heap.clear()
            self._dead = 0
            return
        dead = self._dead = self._dead + 1
        if dead > _COMPACT_MIN and dead > live:
            self._heap = [e for e in self._heap if e[1] is not _DEAD]
            heapq.heapify(self._heap)
            self._dead = 0

    def _arm(self, when: float) -> None:
        handle = self._handle
        if handle is not None:
            handle.cancel()
        self._handle_when = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._handle_when = math.inf
        heap = self._heap
        end = self._loop.time() + _SLACK
        due: list[Timed] = []
        while heap:
            entry = heap[0]
            timer = entry[1]
            if timer is _DEAD:
                heapq.heappop(heap)
                self._dead -= 1
                continue
            if entry[0] > end:
                break
            heapq.heappop(heap)
            self._live -= 1
            timer._entry = None
            timer.when = math.inf
            due.append(timer)
        if not self._live:
            heap.clear()
            self._dead = 0
        # Callbacks run after the heap is settled; what they arm goes on the
        # heap and waits for the next pass, so a pass always ends.
        try:
            for index, timer in enumerate(due):
                try:
                    timer._on_deadline()
                except Exception:
                    logger.exception("deadline callback of %r raised", timer)
                except BaseException:
                    # KeyboardInterrupt, SystemExit: re-arm the ones not run, then let it go.
                    for rest in due[index + 1 :]:
                        if rest._entry is None:
                            rest.at(self._loop.time())
                    raise
        finally:
            self._rearm()

    def _rearm(self) -> None:
        heap = self._heap
        while heap and heap[0][1] is _DEAD:
            heapq.heappop(heap)
            self._dead -= 1
        if heap and heap[0][0] < self._handle_when:
            self._arm(heap[0][0])

    def __repr__(self) -> str:
        when = "unarmed" if self._handle is None else f"next={self._handle_when:.3f}"
        return f"<_Deadlines live={self._live} dead={self._dead} {when}>"


def deadlines_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    """The deadline structure of ``loop``, made on first use."""
    try:
        found: _Deadlines = getattr(loop, _ATTR)
    except AttributeError:
        pass
    else:
        return found
    made = _Deadlines(loop)
    try:
        setattr(loop, _ATTR, made)
    except (AttributeError, TypeError):
        # A loop without a __dict__: this timer gets a structure of its own.
        pass
    return made


def structure_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    """:func:`deadlines_of`, its common case (made already) first."""
    try:
        found: _Deadlines = getattr(loop, _ATTR)
    except AttributeError:
        return deadlines_of(loop)
    return found


class Timed:
    """A base class: one deadline on the loop's shared structure, re-armed lazily.

    ``at(when)`` makes sure :meth:`_on_deadline` runs no later than ``when``
    (loop time): it only reschedules when ``when`` is *earlier* than the
    armed deadline. A later deadline (an idle timer pushed back by a read) is
    left to the callback, which finds the real deadline still ahead and calls
    :meth:`at` again. So a busy connection costs a float store per read.
    Arming costs a two-item list on the loop's heap, not a loop handle.

    A subclass sets ``_deadlines`` (:func:`structure_of`), ``_entry = None``
    and ``when = math.inf`` in its ``__init__``, and implements
    :meth:`_on_deadline`. A connection's close record is one itself, so a
    lingering connection needs no timer object (nor a bound method) of its own.
    """

    __slots__ = ("_deadlines", "_entry", "when")

    _deadlines: _Deadlines
    _entry: list[Any] | None
    when: float

    def _on_deadline(self) -> None:
        """The deadline is due (called by the loop's structure)."""
        raise NotImplementedError

    @property
    def armed(self) -> bool:
        """True while a deadline is set."""
        return self._entry is not None

    def at(self, when: float) -> None:
        """Make sure :meth:`_on_deadline` runs no later than ``when`` (loop time)."""
        entry = self._entry
        if entry is not None:
            if when >= self.when:
                return
            self._deadlines.drop(entry)
        self.when = when
        entry = self._entry = [when, self]
        # _Deadlines.push(), inlined: this runs on every close.
        deadlines = self._deadlines
        heapq.heappush(deadlines._heap, entry)
        deadlines._live += 1
        if when < deadlines._handle_when:
            deadlines._arm(when)

    def disarm(self) -> None:
        """Forget the deadline, if any."""
        entry = self._entry
        if entry is not None:
            self._entry = None
            self.when = math.inf
            self._deadlines.drop(entry)

    def __lt__(self, other: object) -> bool:
        # Compared only when two entries have the same deadline: any order will do.
        return False

    def __hash__(self) -> int:
        # By identity, as any object's (a server's registry keys its records): said
        # out loud because a compiled class that defines __lt__ does not inherit it.
        return object.__hash__(self)


class DeadlineTimer(Timed):
    """A deadline on its loop's shared structure that calls ``callback`` (see :class:`Timed`)."""

    __slots__ = ("_callback",)

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._deadlines = structure_of(loop)
        self._callback = callback
        self._entry = None
        self.when = math.inf

    def _on_deadline(self) -> None:
        self._callback()

    def cancel(self) -> None:
        """Forget the deadline, if any."""
        self.disarm()

    def __repr__(self) -> str:
        if self._entry is None:
            return "<DeadlineTimer unarmed>"
        return f"<DeadlineTimer when={self.when:.3f}>"
