"""aiograceful.otel: what the SDK's in-memory reader collects is server.stats.

Real loopback connections end with different outcomes (``_exported``); an
SDK MeterProvider with an ``InMemoryMetricReader`` (the test's only use of
the SDK) collects, and every data point is checked against the names,
attributes and values written out here, from ``server.stats``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Mapping

import pytest
from _exported import LONG_GRACE, server_with_outcomes, shut_down, uvicorn_with_a_request
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader, Sum
from opentelemetry.util.types import AttributeValue

import aiograceful
import aiograceful.otel as graceful_otel
from aiograceful import CloseOutcome, ServerStats, ShutdownPhase

Points = dict[tuple[str, frozenset[tuple[str, AttributeValue]]], float]
#: name -> (unit, monotonic Sum or not: None for a Gauge)
KINDS = {
    "aiograceful.active_connections": ("{connection}", False),
    "aiograceful.closed_connections": ("{connection}", True),
    "aiograceful.rejected_connections": ("{connection}", True),
    "aiograceful.drained_connections": ("{connection}", True),
    "aiograceful.forced_connections": ("{connection}", True),
    "aiograceful.unacked_unknown_connections": ("{connection}", True),
    "aiograceful.connection.discarded": ("By", True),
    "aiograceful.connection.unacked": ("By", True),
    "aiograceful.shutdown.status": ("1", None),
    "aiograceful.shutdown.duration": ("s", None),
}


def expected(stats: ServerStats, attributes: Mapping[str, AttributeValue]) -> Points:
    """The data points ``stats`` must give, by name and attributes."""

    def key(
        name: str, extra: Mapping[str, AttributeValue] | None = None
    ) -> tuple[str, frozenset[tuple[str, AttributeValue]]]:
        return name, frozenset({**attributes, **(extra or {})}.items())

    points: Points = {
        key("aiograceful.active_connections"): stats.active,
        key("aiograceful.rejected_connections"): stats.rejected,
        key("aiograceful.drained_connections"): stats.drained,
        key("aiograceful.forced_connections"): stats.forced,
        key("aiograceful.unacked_unknown_connections"): stats.unacked_unknown,
        key("aiograceful.connection.discarded"): stats.discarded,
        key("aiograceful.connection.unacked"): stats.unacked,
    }
    for outcome in CloseOutcome:
        extra = {"aiograceful.close.outcome": outcome.value}
        points[key("aiograceful.closed_connections", extra)] = stats.outcomes[outcome]
    for phase in ShutdownPhase:
        extra = {"aiograceful.shutdown.phase": phase.value}
        points[key("aiograceful.shutdown.status", extra)] = int(stats.phase is phase)
    if stats.shutdown_duration is not None:
        points[key("aiograceful.shutdown.duration")] = stats.shutdown_duration
    return points


def collected(reader: InMemoryMetricReader) -> Points:
    """Every data point the reader collects now; each instrument's kind and unit checked."""
    points: Points = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == graceful_otel.METER_NAME
            for metric in scope.metrics:
                unit, monotonic = KINDS[metric.name]
                assert metric.unit == unit, metric
                if monotonic is None:
                    assert isinstance(metric.data, Gauge), metric
                else:
                    assert isinstance(metric.data, Sum), metric
                    assert metric.data.is_monotonic is monotonic, metric
                for point in metric.data.data_points:
                    attributes = frozenset((point.attributes or {}).items())
                    points[(metric.name, attributes)] = point.value
    return points


def _provider() -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return MeterProvider(metric_readers=[reader]), reader


async def test_otel_collected_points_are_server_stats() -> None:
    """A clean close, a peer reset, a rejection and a shutdown collect as server.stats."""
    provider, reader = _provider()
    attributes: dict[str, AttributeValue] = {"server.address": "127.0.0.1", "server.port": 0}
    try:
        async with server_with_outcomes() as server:
            attributes["server.port"] = server.sockets[0].getsockname()[1]
            graceful_otel.observe(server, meter_provider=provider, attributes=attributes)
            stats = server.stats
            assert stats.outcomes[CloseOutcome.PEER_RESET] == 1, stats
            assert stats.rejected == 1, stats
            assert collected(reader) == expected(stats, attributes)
            await shut_down(server)
            assert collected(reader) == expected(server.stats, attributes)
    finally:
        provider.shutdown()


async def test_otel_collect_in_another_thread_during_shutdown() -> None:
    """Collected from another thread while grace runs: status grace is 1, the duration is there."""
    provider, reader = _provider()
    try:
        async with server_with_outcomes(LONG_GRACE) as server:
            graceful_otel.observe(server, meter_provider=provider)
            shutdown = asyncio.ensure_future(server.shutdown())
            await asyncio.sleep(0.1)
            stats = server.stats
            assert stats.phase is ShutdownPhase.GRACE
            points = await asyncio.to_thread(collected, reader)
            duration = points.pop(("aiograceful.shutdown.duration", frozenset()))
            want = expected(stats, {})
            assert duration >= want.pop(("aiograceful.shutdown.duration", frozenset()))
            assert points == want
            await asyncio.wait_for(shutdown, 10)
    finally:
        provider.shutdown()


async def test_otel_two_servers_share_one_set_of_instruments() -> None:
    """Two servers on one provider: one instrument of each name, a point set per server."""
    provider, reader = _provider()
    try:
        async with server_with_outcomes() as busy:
            quiet = await aiograceful.start_server(lambda r, w: asyncio.sleep(0), "127.0.0.1", 0)
            async with quiet:
                graceful_otel.observe(busy, meter_provider=provider, attributes={"server": "a"})
                graceful_otel.observe(quiet, meter_provider=provider, attributes={"server": "b"})
                with pytest.raises(ValueError, match="same labels"):
                    graceful_otel.observe(
                        quiet, meter_provider=provider, attributes={"server": "a"}
                    )
                with pytest.raises(ValueError, match="own"):
                    graceful_otel.observe(
                        quiet,
                        meter_provider=provider,
                        attributes={"aiograceful.close.outcome": "x"},
                    )
                assert collected(reader) == {
                    **expected(busy.stats, {"server": "a"}),
                    **expected(quiet.stats, {"server": "b"}),
                }
                graceful_otel.unobserve(busy, meter_provider=provider)
                assert collected(reader) == expected(quiet.stats, {"server": "b"})
                with pytest.raises(ValueError, match="not exported"):
                    graceful_otel.unobserve(busy, meter_provider=provider)
    finally:
        provider.shutdown()


async def test_otel_uvicorn_server_is_observed() -> None:
    """The uvicorn drop-in's Server collects as the core server does, during and after shutdown."""
    provider, reader = _provider()
    try:
        async with uvicorn_with_a_request() as (server, _kept):
            graceful_otel.observe(server, meter_provider=provider)
            assert collected(reader) == expected(server.stats, {})
            shutdown = asyncio.ensure_future(server.shutdown())
            await asyncio.sleep(0.2)  # the kept connection holds grace for its quiet window
            points = await asyncio.to_thread(collected, reader)
            grace = frozenset({"aiograceful.shutdown.phase": "grace"}.items())
            assert points[("aiograceful.shutdown.status", grace)] == 1
            await asyncio.wait_for(shutdown, 10)
            stats = server.stats
            assert stats.closed == 2, stats
            assert collected(reader) == expected(stats, {})
    finally:
        provider.shutdown()


def test_otel_missing_library_names_the_extra() -> None:
    """Without opentelemetry-api, importing the module says which extra to install."""
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import aiograceful\n"
        "try:\n"
        "    import aiograceful.otel\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'aiograceful[otel]'" in out.stdout, out
