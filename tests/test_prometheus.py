"""aiograceful.prometheus: the exposition, read with prometheus_client's parser, is server.stats.

Real loopback connections end with different outcomes (``_exported``); the
registry is scraped over HTTP (``start_http_server``, in its own thread) or
rendered with ``generate_latest``, and every sample is checked against the
names and values written out here, from ``server.stats``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping

import prometheus_client
import pytest
from _exported import LONG_GRACE, server_with_outcomes, shut_down, uvicorn_with_a_request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

import aiograceful
import aiograceful.prometheus as graceful_prometheus
from aiograceful import CloseOutcome, ServerStats, ShutdownPhase
from aiograceful._exports import check_version

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def expected(stats: ServerStats, labels: Mapping[str, str]) -> Samples:
    """The samples ``stats`` must give, by name and labels."""

    def key(name: str, **extra: str) -> tuple[str, frozenset[tuple[str, str]]]:
        return name, frozenset({**labels, **extra}.items())

    samples: Samples = {
        key("aiograceful_connections_active"): stats.active,
        key("aiograceful_connections_rejected_total"): stats.rejected,
        key("aiograceful_connections_drained_total"): stats.drained,
        key("aiograceful_connections_forced_total"): stats.forced,
        key("aiograceful_connections_unacked_unknown_total"): stats.unacked_unknown,
        key("aiograceful_discarded_bytes_total"): stats.discarded,
        key("aiograceful_unacked_bytes_total"): stats.unacked,
    }
    for outcome in CloseOutcome:
        samples[key("aiograceful_connections_closed_total", outcome=outcome.value)] = (
            stats.outcomes[outcome]
        )
    for phase in ShutdownPhase:
        samples[key("aiograceful_shutdown_phase", phase=phase.value)] = float(stats.phase is phase)
    if stats.shutdown_duration is not None:
        samples[key("aiograceful_shutdown_duration_seconds")] = stats.shutdown_duration
    return samples


def parsed(text: str) -> Samples:
    """Every sample of a text exposition, parsed by prometheus_client's parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def rendered(registry: CollectorRegistry) -> Samples:
    return parsed(generate_latest(registry).decode())


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


@pytest.fixture
def http_registry() -> Iterator[tuple[CollectorRegistry, int]]:
    """A registry of its own, served by prometheus_client's HTTP server on 127.0.0.1."""
    registry = CollectorRegistry()
    httpd, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield registry, httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


async def test_prometheus_scrape_over_http_is_server_stats(
    http_registry: tuple[CollectorRegistry, int],
) -> None:
    """Scraped over HTTP, a clean close, a peer reset, a rejection and a shutdown read as stats."""
    registry, port = http_registry
    labels = {"server": "api"}
    async with server_with_outcomes() as server:
        graceful_prometheus.register(server, registry=registry, labels=labels)
        stats = server.stats
        assert stats.outcomes[CloseOutcome.CLEAN] >= 1, stats
        assert stats.outcomes[CloseOutcome.PEER_RESET] == 1, stats
        assert stats.rejected == 1, stats
        assert stats.active == 1, stats
        assert parsed(await asyncio.to_thread(scrape, port)) == expected(stats, labels)

        await shut_down(server)
        stats = server.stats
        samples = parsed(await asyncio.to_thread(scrape, port))
        assert samples == expected(stats, labels)
        assert samples[("aiograceful_shutdown_duration_seconds", frozenset(labels.items()))] > 0
        graceful_prometheus.unregister(server, registry=registry)


async def test_prometheus_scrape_during_shutdown_shows_the_phase() -> None:
    """Scraped from another thread while grace runs: phase grace is 1, the duration is there."""
    registry = CollectorRegistry()
    async with server_with_outcomes(LONG_GRACE) as server:
        graceful_prometheus.register(server, registry=registry)
        shutdown = asyncio.ensure_future(server.shutdown())
        await asyncio.sleep(0.1)
        stats = server.stats
        assert stats.phase is ShutdownPhase.GRACE
        samples = await asyncio.to_thread(rendered, registry)
        duration = samples.pop(("aiograceful_shutdown_duration_seconds", frozenset()))
        want = expected(stats, {})
        assert duration >= want.pop(("aiograceful_shutdown_duration_seconds", frozenset()))
        assert samples == want
        await asyncio.wait_for(shutdown, 10)


async def test_prometheus_new_server_has_every_label_at_zero() -> None:
    """Before any connection: every outcome at 0, phase serving at 1, no duration sample."""
    registry = CollectorRegistry()
    server = await aiograceful.start_server(lambda r, w: asyncio.sleep(0), "127.0.0.1", 0)
    async with server:
        graceful_prometheus.register(server, registry=registry)
        samples = rendered(registry)
    outcomes = {
        dict(labels)["outcome"]: value
        for (name, labels), value in samples.items()
        if name == "aiograceful_connections_closed_total"
    }
    assert outcomes == {outcome.value: 0 for outcome in CloseOutcome}
    phases = {
        dict(labels)["phase"]: value
        for (name, labels), value in samples.items()
        if name == "aiograceful_shutdown_phase"
    }
    assert phases == {phase.value: float(phase is ShutdownPhase.SERVING) for phase in ShutdownPhase}
    assert not any(name == "aiograceful_shutdown_duration_seconds" for name, _ in samples)


async def test_prometheus_two_servers_export_side_by_side() -> None:
    """Two servers on one registry: one family each, a series per server told apart by label."""
    registry = CollectorRegistry()
    async with server_with_outcomes() as busy:
        quiet = await aiograceful.start_server(lambda r, w: asyncio.sleep(0), "127.0.0.1", 0)
        async with quiet:
            first = graceful_prometheus.register(busy, registry=registry, labels={"server": "a"})
            second = graceful_prometheus.register(quiet, registry=registry, labels={"server": "b"})
            assert first is second
            text = generate_latest(registry).decode()
            assert text.count("# TYPE aiograceful_connections_active gauge") == 1
            assert parsed(text) == {
                **expected(busy.stats, {"server": "a"}),
                **expected(quiet.stats, {"server": "b"}),
            }


async def test_prometheus_register_refuses_ambiguous_labels() -> None:
    """Same labels twice, other label names, the metrics' own label, a server twice: refused."""
    registry = CollectorRegistry()
    servers = [
        await aiograceful.start_server(lambda r, w: asyncio.sleep(0), "127.0.0.1", 0)
        for _ in range(3)
    ]
    try:
        graceful_prometheus.register(servers[0], registry=registry, labels={"server": "a"})
        with pytest.raises(ValueError, match="same labels"):
            graceful_prometheus.register(servers[1], registry=registry, labels={"server": "a"})
        with pytest.raises(ValueError, match="same label names"):
            graceful_prometheus.register(servers[1], registry=registry, labels={"port": "1"})
        with pytest.raises(ValueError, match="own"):
            graceful_prometheus.register(servers[2], registry=registry, labels={"outcome": "x"})
        with pytest.raises(ValueError, match="label name"):
            graceful_prometheus.register(servers[2], registry=registry, labels={"a-b": "x"})
        with pytest.raises(ValueError, match="exported already"):
            graceful_prometheus.register(servers[0], registry=registry, labels={"server": "z"})
        with pytest.raises(TypeError, match="stats"):
            graceful_prometheus.register(object(), registry=registry)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="not exported"):
            graceful_prometheus.unregister(servers[1], registry=registry)
        # Nothing refused was added: only the first server's series are there.
        assert rendered(registry) == expected(servers[0].stats, {"server": "a"})
    finally:
        for server in servers:
            await server.shutdown()


async def test_prometheus_unregister_removes_the_collector() -> None:
    """Once its last server is unregistered the registry exports nothing, and can take one again."""
    registry = CollectorRegistry()
    server = await aiograceful.start_server(lambda r, w: asyncio.sleep(0), "127.0.0.1", 0)
    async with server:
        graceful_prometheus.register(server, registry=registry)
        graceful_prometheus.unregister(server, registry=registry)
        assert rendered(registry) == {}
        graceful_prometheus.register(server, registry=registry)
        assert rendered(registry) == expected(server.stats, {})


async def test_prometheus_default_registry_is_prometheus_clients() -> None:
    """Without registry=, the server is exported on prometheus_client.REGISTRY."""
    server = await aiograceful.start_server(lambda r, w: asyncio.sleep(0), "127.0.0.1", 0)
    async with server:
        collector = graceful_prometheus.register(server, labels={"server": "default"})
        try:
            samples = parsed(generate_latest().decode())
            want = expected(server.stats, {"server": "default"})
            assert {key: samples.get(key) for key in want} == want
        finally:
            graceful_prometheus.unregister(server)
        assert "aiograceful_" not in generate_latest().decode()
        assert len(collector) == 0


async def test_prometheus_openmetrics_exposition_parses_strictly() -> None:
    """The OpenMetrics exposition passes its stricter parser, with the units declared."""
    registry = CollectorRegistry()
    async with server_with_outcomes() as server:
        graceful_prometheus.register(server, registry=registry, labels={"server": "api"})
        await shut_down(server)
        text = openmetrics_exposition.generate_latest(registry).decode()  # type: ignore[no-untyped-call]
        families = {
            family.name: family
            for family in openmetrics_parser.text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
        }
    assert families["aiograceful_discarded_bytes"].unit == "bytes"
    assert families["aiograceful_shutdown_duration_seconds"].unit == "seconds"
    assert families["aiograceful_connections_closed"].type == "counter"
    closed = sum(
        sample.value
        for sample in families["aiograceful_connections_closed"].samples
        if sample.name == "aiograceful_connections_closed_total"
    )
    assert closed == server.stats.closed


async def test_prometheus_uvicorn_server_is_exported() -> None:
    """The uvicorn drop-in's Server exports as the core server does, during and after shutdown."""
    registry = CollectorRegistry()
    async with uvicorn_with_a_request() as (server, _kept):
        graceful_prometheus.register(server, registry=registry, labels={"server": "uvicorn"})
        assert rendered(registry) == expected(server.stats, {"server": "uvicorn"})
        shutdown = asyncio.ensure_future(server.shutdown())
        # The kept keep-alive connection holds the shutdown in grace for its quiet window.
        await asyncio.sleep(0.2)
        assert server.stats.phase is ShutdownPhase.GRACE
        # A scrape from another thread, as start_http_server's, while the shutdown runs.
        samples = await asyncio.to_thread(rendered, registry)
        grace = {"server": "uvicorn", "phase": "grace"}
        key = ("aiograceful_shutdown_phase", frozenset(grace.items()))
        assert samples[key] == 1
        await asyncio.wait_for(shutdown, 10)
        stats = server.stats
        assert stats.closed == 2, stats
        assert rendered(registry) == expected(stats, {"server": "uvicorn"})


def test_prometheus_missing_library_names_the_extra() -> None:
    """Without prometheus_client, importing the module says which extra to install."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import aiograceful\n"
        "try:\n"
        "    import aiograceful.prometheus\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'aiograceful[prometheus]'" in out.stdout, out


def test_prometheus_not_imported_by_aiograceful() -> None:
    """``import aiograceful`` (a drop-in too) imports neither prometheus_client nor otel."""
    code = (
        "import sys, aiograceful, aiograceful.uvicorn\n"
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus', 'opentelemetry'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out


def test_prometheus_too_old_a_library_names_the_extra() -> None:
    """A library older than the exporter's floor is an ImportError naming the extra to install."""
    with pytest.raises(ImportError, match=r"prometheus_client >= 99\.0.*aiograceful\[prometheus\]"):
        check_version("aiograceful.prometheus", "prometheus_client", (99, 0), "prometheus")
    check_version("aiograceful.prometheus", "prometheus_client", (0, 20), "prometheus")
