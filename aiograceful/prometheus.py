"""Export ``server.stats`` to Prometheus: why connections ended, as prometheus_client metrics.

Use it as::

    import aiograceful.prometheus
    aiograceful.prometheus.register(server, labels={"server": "api"})

``server`` is anything with a ``stats`` property giving a
:class:`~aiograceful.ServerStats`: the core server and every drop-in. The
values are read from ``server.stats`` at each scrape (a custom collector,
prometheus_client's documented way to export values kept elsewhere), so
counting costs the server nothing more.

The metrics (every outcome and every phase is a label value, 0 included):

* ``aiograceful_connections_active`` (gauge)
* ``aiograceful_connections_closed_total{outcome=...}`` (counter; their sum is
  ``stats.closed``, so it has no series of its own)
* ``aiograceful_connections_rejected_total``, ``..._drained_total``,
  ``..._forced_total``, ``..._unacked_unknown_total`` (counters)
* ``aiograceful_discarded_bytes_total``, ``aiograceful_unacked_bytes_total``
* ``aiograceful_shutdown_phase{phase=...}`` (gauge: 1 for the phase now, 0
  for the others)
* ``aiograceful_shutdown_duration_seconds`` (gauge; only once a shutdown began)

prometheus_client's registry refuses two collectors with the same metric
names, so one registry has one :class:`StatsCollector`, which reads every
server registered on it: several servers in one process export side by
side, told apart by their labels (each its own values, the same names).

The scrape runs in prometheus_client's thread (``start_http_server``) or in
the web framework's handler: ``server.stats`` is read there. The core
server's and the uvicorn drop-in's are safe to read from another thread than
their loop's (a snapshot of plain integers; the shutdown's clock is the
loop's, kept); a drop-in's ``stats`` must be too.

Needs ``prometheus_client`` (``pip install 'aiograceful[prometheus]'``);
tested with 0.26.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Final

try:
    import prometheus_client
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
    )
    from prometheus_client.registry import CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "aiograceful.prometheus needs prometheus_client: pip install 'aiograceful[prometheus]'"
    ) from exc

from ._exports import HasStats, Sources, check_version
from ._options import CloseOutcome
from ._shutdown import ShutdownPhase
from ._stats import ServerStats

__all__ = ["PREFIX", "StatsCollector", "register", "unregister"]

check_version(__name__, "prometheus_client", (0, 20), "prometheus")

#: Every metric's name starts with this.
PREFIX: Final = "aiograceful"

# The label names the metrics use themselves: a server's labels cannot take them.
_OWN_LABELS: Final = frozenset({"outcome", "phase"})
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

_HELP_ACTIVE: Final = "Connections open now."
_HELP_CLOSED: Final = (
    "Connections that ended, by how their close ended (clean: the peer's FIN after ours, "
    "everything delivered; peer-reset and aborted are worth an alert). Rejected ones included."
)
_HELP_REJECTED: Final = "Connections turned away at max_connections."
_HELP_DRAINED: Final = "Connections taken from the accept queue at shutdown."
_HELP_FORCED: Final = "Connections still open when a shutdown's grace ran out."
_HELP_UNACKED_UNKNOWN: Final = (
    "Closes for which the platform could not tell the unacknowledged bytes (counted as 0 there)."
)
_HELP_DISCARDED: Final = "Bytes the peers sent that nobody read, discarded by lingering closes."
_HELP_UNACKED: Final = (
    "Bytes written that the peers had not acknowledged when the sockets were closed."
)
_HELP_PHASE: Final = "Where the shutdown stands: 1 for the phase now, 0 for the others."
_HELP_DURATION: Final = "Seconds the shutdown took (so far, while it runs); absent before one."


def _check_labels(labels: Mapping[str, str]) -> None:
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ValueError(f"{name!r} is not a Prometheus label name")
        if name in _OWN_LABELS:
            raise ValueError(f"the label {name!r} is the metrics' own: choose another name")
        if not isinstance(value, str):
            raise TypeError(f"label {name!r}: a value is a str, not {type(value).__name__}")


class StatsCollector:
    """A prometheus_client collector over the ``stats`` of one or more servers.

    :func:`register` makes and finds the one collector of a registry; make
    one yourself only to register it on something else.
    """

    __slots__ = ("__weakref__", "_sources")

    def __init__(self) -> None:
        self._sources: Sources[str] = Sources()

    def add(self, server: HasStats, labels: Mapping[str, str] | None = None) -> None:
        """Export ``server.stats`` with ``labels`` (the same label names for every server)."""
        labels = {} if labels is None else labels
        _check_labels(labels)
        self._sources.add(server, labels)

    def remove(self, server: HasStats) -> None:
        """Stop exporting ``server`` (ValueError if it was not exported here)."""
        self._sources.remove(server)

    def __len__(self) -> int:
        return len(self._sources)

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (the registry checks names with them)."""
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        """The metric families, one sample set per server, read from ``server.stats`` now."""
        return self._families(self._sources.read())

    def _families(self, read: list[tuple[ServerStats, Mapping[str, str]]]) -> Iterator[Metric]:
        names = list(read[0][1]) if read else []

        def counter(name: str, help_text: str, unit: str = "") -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=names, unit=unit)

        def gauge(
            name: str, help_text: str, unit: str = "", extra: tuple[str, ...] = ()
        ) -> GaugeMetricFamily:
            return GaugeMetricFamily(
                f"{PREFIX}_{name}", help_text, labels=[*names, *extra], unit=unit
            )

        active = gauge("connections_active", _HELP_ACTIVE)
        closed = CounterMetricFamily(
            f"{PREFIX}_connections_closed", _HELP_CLOSED, labels=[*names, "outcome"]
        )
        plain = {
            "rejected": counter("connections_rejected", _HELP_REJECTED),
            "drained": counter("connections_drained", _HELP_DRAINED),
            "forced": counter("connections_forced", _HELP_FORCED),
            "unacked_unknown": counter("connections_unacked_unknown", _HELP_UNACKED_UNKNOWN),
            "discarded": counter("discarded", _HELP_DISCARDED, unit="bytes"),
            "unacked": counter("unacked", _HELP_UNACKED, unit="bytes"),
        }
        phase = gauge("shutdown_phase", _HELP_PHASE, extra=("phase",))
        duration = gauge("shutdown_duration", _HELP_DURATION, unit="seconds")
        for stats, labels in read:
            values = [labels[name] for name in names]
            active.add_metric(values, stats.active)
            for outcome in CloseOutcome:
                closed.add_metric([*values, outcome.value], stats.outcomes.get(outcome, 0))
            for field, family in plain.items():
                family.add_metric(values, getattr(stats, field))
            for each in ShutdownPhase:
                phase.add_metric([*values, each.value], 1.0 if stats.phase is each else 0.0)
            if stats.shutdown_duration is not None:
                duration.add_metric(values, stats.shutdown_duration)
        yield active
        yield closed
        yield from plain.values()
        yield phase
        yield duration

    def __repr__(self) -> str:
        return f"<StatsCollector {self._sources!r}>"


# One collector per registry (prometheus_client refuses a second with the same names).
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, StatsCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register(
    server: HasStats,
    *,
    registry: CollectorRegistry = prometheus_client.REGISTRY,
    labels: Mapping[str, str] | None = None,
) -> StatsCollector:
    """Export ``server.stats`` on ``registry`` (prometheus_client's default one if not given).

    ``labels`` are constant labels for this server's series (``{"server":
    "api"}``): each server registered on one registry needs its own values,
    with the same label names. Returns the registry's collector.
    """
    with _collectors_lock:
        collector = _collectors.get(registry)
        fresh = collector is None
        if collector is None:
            collector = StatsCollector()
        collector.add(server, labels)
        if fresh:
            registry.register(collector)
            _collectors[registry] = collector
    return collector


def unregister(
    server: HasStats, *, registry: CollectorRegistry = prometheus_client.REGISTRY
) -> None:
    """Stop exporting ``server.stats`` on ``registry`` (ValueError if it was not)."""
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            raise ValueError(f"{server!r} is not exported on {registry!r}")
        collector.remove(server)
        if not len(collector):
            registry.unregister(collector)
            del _collectors[registry]
