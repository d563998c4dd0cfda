"""What a server counts and reports: the lifetime counters, ``ServerStats``, ``ShutdownReport``.

The core server and every drop-in keep one :class:`Counters` each and feed
it every :class:`~aiograceful.CloseResult` as its connection ends: plain
integers, nothing kept per connection. Envoy's ``downstream_cx_destroy_*``
and HAProxy's termination states are the model: an operator graphs why
connections ended, not only how many did.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ._options import CloseOutcome, CloseResult
from ._shutdown import ShutdownPhase

__all__ = ["Counters", "ServerStats", "ShutdownReport"]


@dataclasses.dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What a shutdown did.

    * ``connections``: open when the shutdown began, plus those drained from
      the accept queue (and any accepted while it ran).
    * ``closed_clean``: of those, closed within ``grace`` with outcome CLEAN.
    * ``forced``: still open when ``grace`` ran out (closed with a short
      linger, then let go).
    * ``duration``: seconds from the start of the shutdown to this report.
    * ``outcomes``: how many connections ended with each :class:`CloseOutcome`.
    * ``drained``: connections taken from the accept queue.
    * ``rejected``: connections turned away at the limit during the server's life.
    """

    connections: int
    closed_clean: int
    forced: int
    duration: float
    outcomes: Mapping[CloseOutcome, int]
    drained: int = 0
    rejected: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ServerStats:
    """Counts since the server started: what an operator graphs (``server.stats``).

    * ``active``: connections open now.
    * ``closed``: connections that have ended, rejected ones included.
    * ``outcomes``: of those, how many ended with each :class:`CloseOutcome`
      (every outcome is a key): ``CLEAN`` is the good case; ``PEER_RESET``
      and ``ABORTED`` are the ones worth an alert.
    * ``rejected``: connections turned away at ``max_connections``.
    * ``drained``: connections taken from the accept queue at shutdown.
    * ``discarded``: bytes the peers sent that nobody read (lingering closes).
    * ``unacked``: bytes written that the peers had not acknowledged when the
      sockets were closed (left to the kernel, or lost in a reset).
    * ``unacked_unknown``: closes for which the platform could not tell
      ``unacked`` (counted as 0 bytes there).
    * ``forced``: connections still open when a shutdown's grace ran out.
    * ``phase``: where the shutdown stands (``SERVING`` before one).
    * ``shutdown_duration``: seconds the shutdown took (so far, while it
      runs); None before one.
    """

    active: int
    closed: int
    outcomes: Mapping[CloseOutcome, int]
    rejected: int
    drained: int
    discarded: int
    unacked: int
    unacked_unknown: int
    forced: int = 0
    phase: ShutdownPhase = ShutdownPhase.SERVING
    shutdown_duration: float | None = None


class Counters:
    """A server's lifetime counters (see :class:`ServerStats`)."""

    __slots__ = (
        "closed",
        "discarded",
        "drained",
        "forced",
        "outcomes",
        "rejected",
        "unacked",
        "unacked_unknown",
    )

    def __init__(self) -> None:
        self.outcomes: dict[CloseOutcome, int] = dict.fromkeys(CloseOutcome, 0)
        self.closed = 0
        self.discarded = 0
        self.unacked = 0
        self.unacked_unknown = 0
        self.rejected = 0
        self.drained = 0
        self.forced = 0

    def count(self, result: CloseResult | None) -> None:
        """One connection ended with ``result`` (None: it never had one; not counted)."""
        if result is None:
            return
        self.closed += 1
        self.outcomes[result.outcome] += 1
        self.discarded += result.discarded
        unacked = result.unacked
        if unacked is None:
            self.unacked_unknown += 1
        else:
            self.unacked += unacked

    def snapshot(
        self,
        active: int,
        phase: ShutdownPhase,
        shutdown: tuple[float | None, float | None, float],
    ) -> ServerStats:
        """The counts now, as a :class:`ServerStats`.

        ``shutdown`` is when the shutdown began and ended (None: not yet) and
        the loop's time now, from which its duration so far is taken.
        """
        began, ended, now = shutdown
        shutdown_duration = None if began is None else (now if ended is None else ended) - began
        return ServerStats(
            active=active,
            closed=self.closed,
            outcomes=dict(self.outcomes),
            rejected=self.rejected,
            drained=self.drained,
            discarded=self.discarded,
            unacked=self.unacked,
            unacked_unknown=self.unacked_unknown,
            forced=self.forced,
            phase=phase,
            shutdown_duration=shutdown_duration,
        )

    def __repr__(self) -> str:
        return f"<Counters closed={self.closed} rejected={self.rejected} forced={self.forced}>"
