"""The shutdown order, written once: the core server and every drop-in drive it.

Theory of operation
-------------------
TCP's own close is symmetric, and a symmetric shutdown loses requests: if the
server half-closes while a client's last request is in flight, the server can
no longer answer it. So the shutdown is asymmetric: it first *tells* every
peer in protocol terms (the notice: a ``Connection: close``, a GOAWAY, a BYE
line) and keeps both directions open; the client finishes and half-closes;
the server answers what it received before that FIN and closes.

:func:`run_shutdown` is that order over a :class:`Shutdownable`, the small
interface a server adapts itself to (the core's :class:`GracefulServer`,
uvicorn's ``Server``, aiohttp's runner, hypercorn's worker):

1. ``DRAIN_DELAY``: the notice is set (a readiness probe fails from now on)
   and every connection is told, while the listeners keep accepting for
   ``drain_delay`` seconds, so that a load balancer stops sending first. A
   handoff to a successor ends the phase at once.
2. ``STOPPING``: the listeners stop accepting without losing their accept
   queue (the queued connections are served and told; or, after a handoff,
   the queue is the successor's).
3. ``GRACE``: up to ``grace`` seconds for the connections to close themselves.
4. ``FORCE``: what is still open closes with a linger of ``force_timeout``.
5. ``LETTING_GO``: what is left is let go the way a plain ``close()`` does
   (a FIN, the unsent bytes left to the kernel): never less than a stock
   server's exit delivers.
6. ``DONE``.

Every wait is bounded: the whole takes at most ``drain_delay + grace +
force_timeout`` and two short waits for the loop's callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

__all__ = [
    "LOST_WAIT",
    "ShutdownNotice",
    "ShutdownPhase",
    "Shutdownable",
    "run_shutdown",
    "wait_all",
]

#: Seconds the shutdown waits for ``connection_lost`` and the server's tasks
#: after it let go (both are scheduled at once by then).
LOST_WAIT: Final = 1.0


class ShutdownPhase(enum.Enum):
    """Where a server's shutdown stands (``server.stats.phase``, ``repr(server)``)."""

    #: Not shutting down.
    SERVING = "serving"
    #: The notice is out; the listeners still accept for ``drain_delay``.
    DRAIN_DELAY = "drain_delay"
    #: The listeners stop accepting; their accept queues are served.
    STOPPING = "stopping"
    #: The connections have ``grace`` seconds to close themselves.
    GRACE = "grace"
    #: Those still open close with a linger of ``force_timeout``.
    FORCE = "force"
    #: What is left is let go the plain way (a FIN; the kernel delivers the rest).
    LETTING_GO = "letting_go"
    #: The shutdown is over.
    DONE = "done"


class ShutdownNotice:
    """Set once a server's shutdown begins: what a readiness probe or a handler reads.

    ``is_set()`` is True from the first moment of the shutdown (before
    ``drain_delay``), so a health endpoint that answers 503 when it is set
    takes the server out of a load balancer's rotation while it still
    accepts. ``await wait()`` waits for it.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def is_set(self) -> bool:
        """True once the shutdown has begun."""
        return self._event.is_set()

    async def wait(self) -> None:
        """Wait until the shutdown begins."""
        await self._event.wait()

    def set(self) -> None:
        """Begin the notice (the shutdown does this; idempotent)."""
        self._event.set()

    def __repr__(self) -> str:
        return f"<ShutdownNotice {'set' if self.is_set() else 'unset'}>"


class Shutdownable(Protocol):
    """What :func:`run_shutdown` drives: one server's listeners and connections."""

    def accepting(self) -> bool:
        """True while a listener accepts connections."""
        ...

    def handed_off(self) -> asyncio.Event | None:
        """Set when a successor took the listeners (``handoff=``); None where there is none."""
        ...

    def tell(self) -> None:
        """Tell every connection not yet told (once each, only while it may write)."""
        ...

    async def stop_accepting(self, deadline: float) -> None:
        """Close the listeners without resetting their queues; serve what was queued.

        ``deadline`` (loop time) bounds any wait in it (a successor's ack).
        """
        ...

    def pending(self) -> Iterable[asyncio.Future[Any]]:
        """What the grace waits for: the open connections' ends and the server's tasks."""
        ...

    async def force(self, timeout: float) -> None:
        """The grace is over: close every open connection within ``timeout``.

        A coroutine, so that a server may first let its cancelled tasks
        write what they write when cancelled (uvicorn's 500).
        """
        ...

    def let_go(self) -> None:
        """Let go of what is still open, the plain way (a FIN; nothing more is awaited)."""
        ...

    async def finish(self) -> None:
        """Cancel and collect what is left of the server's tasks (bounded by the callee)."""
        ...


async def wait_all(
    loop: asyncio.AbstractEventLoop,
    pending: Callable[[], Iterable[asyncio.Future[Any]]],
    deadline: float,
) -> None:
    """Wait until nothing ``pending()`` names is left undone, or until ``deadline``.

    ``pending()`` is asked again after each wake-up: connections that attach
    meanwhile (drained from the queue) join the wait.
    """
    for _ in range(10_000):  # each pass waits; the bound is the deadline
        waiting = [fut for fut in pending() if not fut.done()]
        timeout = deadline - loop.time()
        if not waiting or timeout <= 0:
            return
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)


async def run_shutdown(
    target: Shutdownable,
    *,
    grace: float,
    force_timeout: float,
    drain_delay: float = 0.0,
    on_phase: Callable[[ShutdownPhase], None] | None = None,
) -> None:
    """The shutdown order over ``target`` (see the module's notes). Bounded; never raises.

    ``on_phase`` is called as each phase begins (the caller keeps the phase
    for its ``stats`` and ``repr``, and the moment grace ended for its report).
    """
    loop = asyncio.get_running_loop()

    def enter(phase: ShutdownPhase) -> None:
        if on_phase is not None:
            on_phase(phase)

    enter(ShutdownPhase.DRAIN_DELAY)
    target.tell()
    handed_off = target.handed_off()
    if drain_delay > 0 and target.accepting() and not (handed_off and handed_off.is_set()):
        if handed_off is None:
            await asyncio.sleep(drain_delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handed_off.wait(), drain_delay)
    grace_end = loop.time() + grace
    enter(ShutdownPhase.STOPPING)
    target.tell()  # those accepted during drain_delay were told as they attached; again, cheaply
    await target.stop_accepting(grace_end)
    target.tell()  # those that attached meanwhile
    enter(ShutdownPhase.GRACE)
    await wait_all(loop, target.pending, grace_end)
    enter(ShutdownPhase.FORCE)
    await target.force(force_timeout)
    await wait_all(loop, target.pending, loop.time() + force_timeout + 0.1)
    enter(ShutdownPhase.LETTING_GO)
    target.let_go()
    await wait_all(loop, target.pending, loop.time() + LOST_WAIT)
    await target.finish()
    enter(ShutdownPhase.DONE)
