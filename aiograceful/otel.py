"""Export ``server.stats`` as OpenTelemetry metrics (the metrics API only; no SDK needed).

Use it as::

    import aiograceful.otel
    aiograceful.otel.observe(server, attributes={"server.port": 8080})

``server`` is anything with a ``stats`` property giving a
:class:`~aiograceful.ServerStats`: the core server and every drop-in. Each
instrument is an observable one whose callback reads ``server.stats`` when
the SDK collects, so counting costs the server nothing more.

The names follow Kestrel's connection metrics (``kestrel.active_connections``,
``kestrel.rejected_connections``, ``kestrel.queued_connections``), the
OpenTelemetry semantic conventions' model for a server's connections: a
count of connections is ``aiograceful.<state>_connections`` in
``{connection}``, a quantity summed over connections is
``aiograceful.connection.<quantity>`` in its UCUM unit (``By``), and no
name carries its unit or a ``.total``:

* ``aiograceful.active_connections`` (UpDownCounter)
* ``aiograceful.closed_connections`` (Counter), with the attribute
  ``aiograceful.close.outcome`` = ``clean``, ``timeout``, ``idle-timeout``,
  ``overflow``, ``peer-reset``, ``aborted`` (:class:`~aiograceful.CloseOutcome`'s
  values). Kestrel puts why a connection ended in ``error.type`` on its
  duration histogram, set only on errors; the server keeps counts, not
  durations, and ``clean`` is not an error, so the outcome is its own
  attribute, on every close.
* ``aiograceful.rejected_connections``, ``aiograceful.drained_connections``,
  ``aiograceful.forced_connections``, ``aiograceful.unacked_unknown_connections``
  (Counters)
* ``aiograceful.connection.discarded``, ``aiograceful.connection.unacked``
  (Counters, ``By``)
* ``aiograceful.shutdown.status`` (Gauge): 1 for the phase now, 0 for the
  others, with the attribute ``aiograceful.shutdown.phase``, as the semantic
  conventions' ``hw.status`` does with ``hw.state``.
* ``aiograceful.shutdown.duration`` (Gauge, ``s``): only once a shutdown began.

An SDK hands back the first instrument of a name and drops a second one's
callbacks, so one meter provider has one set of instruments, which read
every server observed on it: several servers in one process export side by
side, told apart by their ``attributes`` (Kestrel's are ``server.address``
and ``server.port``).

A periodic reader collects in its own thread: ``server.stats`` is read
there. The core server's and the uvicorn drop-in's are safe to read from
another thread than their loop's; a drop-in's ``stats`` must be too.

Needs ``opentelemetry-api`` (``pip install 'aiograceful[otel]'``); tested with 1.45.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Final

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "aiograceful.otel needs opentelemetry-api: pip install 'aiograceful[otel]'"
    ) from exc

from . import __version__
from ._exports import HasStats, Sources, check_version
from ._options import CloseOutcome
from ._shutdown import ShutdownPhase
from ._stats import ServerStats

__all__ = ["METER_NAME", "observe", "unobserve"]

check_version(__name__, "opentelemetry-api", (1, 20), "otel")

#: The meter (instrumentation scope) every instrument belongs to.
METER_NAME: Final = "aiograceful"
#: The attribute naming a close's outcome on ``aiograceful.closed_connections``.
OUTCOME: Final = "aiograceful.close.outcome"
#: The attribute naming a phase on ``aiograceful.shutdown.status``.
PHASE: Final = "aiograceful.shutdown.phase"

Attributes = Mapping[str, AttributeValue]
_Reader = Callable[[ServerStats, Attributes], Iterable[Observation]]


def _one(field: str) -> _Reader:
    def read(stats: ServerStats, attributes: Attributes) -> Iterable[Observation]:
        return [Observation(getattr(stats, field), attributes)]

    return read


def _outcomes(stats: ServerStats, attributes: Attributes) -> Iterable[Observation]:
    return [
        Observation(stats.outcomes.get(outcome, 0), {**attributes, OUTCOME: outcome.value})
        for outcome in CloseOutcome
    ]


def _phases(stats: ServerStats, attributes: Attributes) -> Iterable[Observation]:
    return [
        Observation(int(stats.phase is phase), {**attributes, PHASE: phase.value})
        for phase in ShutdownPhase
    ]


def _duration(stats: ServerStats, attributes: Attributes) -> Iterable[Observation]:
    if stats.shutdown_duration is None:
        return []
    return [Observation(stats.shutdown_duration, attributes)]


class _Instruments:
    """The instruments of one meter provider, over every server observed on it."""

    __slots__ = ("sources",)

    def __init__(self, provider: MeterProvider) -> None:
        self.sources: Sources[AttributeValue] = Sources()
        meter = metrics.get_meter(METER_NAME, __version__, meter_provider=provider)
        conn = "{connection}"
        meter.create_observable_up_down_counter(
            "aiograceful.active_connections",
            [self._callback(_one("active"))],
            unit=conn,
            description="Connections open now.",
        )
        counters = [
            (
                "aiograceful.closed_connections",
                _outcomes,
                conn,
                "Connections that ended, by how their close ended (rejected ones included).",
            ),
            (
                "aiograceful.rejected_connections",
                _one("rejected"),
                conn,
                "Connections turned away at max_connections.",
            ),
            (
                "aiograceful.drained_connections",
                _one("drained"),
                conn,
                "Connections taken from the accept queue at shutdown.",
            ),
            (
                "aiograceful.forced_connections",
                _one("forced"),
                conn,
                "Connections still open when a shutdown's grace ran out.",
            ),
            (
                "aiograceful.unacked_unknown_connections",
                _one("unacked_unknown"),
                conn,
                "Closes for which the platform could not tell the unacknowledged bytes.",
            ),
            (
                "aiograceful.connection.discarded",
                _one("discarded"),
                "By",
                "Bytes the peers sent that nobody read, discarded by lingering closes.",
            ),
            (
                "aiograceful.connection.unacked",
                _one("unacked"),
                "By",
                "Bytes written that the peers had not acknowledged when the sockets were closed.",
            ),
        ]
        for name, reader, unit, description in counters:
            meter.create_observable_counter(
                name, [self._callback(reader)], unit=unit, description=description
            )
        meter.create_observable_gauge(
            "aiograceful.shutdown.status",
            [self._callback(_phases)],
            unit="1",
            description="Where the shutdown stands: 1 for the phase now, 0 for the others.",
        )
        meter.create_observable_gauge(
            "aiograceful.shutdown.duration",
            [self._callback(_duration)],
            unit="s",
            description="Seconds the shutdown took (so far, while it runs).",
        )

    def _callback(self, reader: _Reader) -> Callable[[CallbackOptions], Iterable[Observation]]:
        sources = self.sources

        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [
                observation
                for stats, attributes in sources.read()
                for observation in reader(stats, attributes)
            ]

        return callback


# One set of instruments per meter provider (an SDK keeps the first of a name).
_instruments: weakref.WeakKeyDictionary[MeterProvider, _Instruments] = weakref.WeakKeyDictionary()
_instruments_lock = threading.Lock()


def observe(
    server: HasStats,
    *,
    meter_provider: MeterProvider | None = None,
    attributes: Attributes | None = None,
) -> None:
    """Export ``server.stats`` through ``meter_provider`` (the global one if not given).

    ``attributes`` go on every observation of this server (``{"server.port":
    8080}``): each server observed on one provider needs its own values, with
    the same attribute names. Set the global provider before calling this.
    """
    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    attributes = {} if attributes is None else attributes
    for name in attributes:
        if name in (OUTCOME, PHASE):
            raise ValueError(f"the attribute {name!r} is the instruments' own")
    with _instruments_lock:
        instruments = _instruments.get(provider)
        if instruments is None:
            instruments = _instruments[provider] = _Instruments(provider)
        instruments.sources.add(server, attributes)


def unobserve(server: HasStats, *, meter_provider: MeterProvider | None = None) -> None:
    """Stop exporting ``server.stats`` (ValueError if it was not observed on the provider).

    The instruments stay (the metrics API cannot remove one); they observe
    the servers left, or nothing.
    """
    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    with _instruments_lock:
        instruments = _instruments.get(provider)
        if instruments is None:
            raise ValueError(f"{server!r} is not observed on {provider!r}")
        instruments.sources.remove(server)
