"""A worker leaving its SO_REUSEPORT group: the kernel resets its queue unless it migrates.

And under load, with steering: the group sends new connections to a
sibling while the worker drains (``leaving``; tcp_migrate_req off).

Measured in a network namespace this test makes (``net.ipv4.tcp_migrate_req``
is per namespace), with tcp_migrate_req off and on; see _reuseport_probe.py
for what each figure is. The naive close (a listener closed with its queue
full) resets every queued connection when migration is off; aiograceful's
shutdown drains its own queue first, so it loses none either way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROBE = Path(__file__).resolve().parent / "_reuseport_probe.py"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def _probe_in_namespace(*args: str, timeout: float) -> dict[str, Any]:
    """Run the probe with ``args`` in a network namespace of our own (deleted afterwards)."""
    if shutil.which("ip") is None:
        pytest.skip("ip (iproute2) is not installed: cannot make a network namespace")
    name = f"aiog-reuseport-{os.getpid()}"
    made = _ip("netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"ip netns add is not permitted here: {made.stderr.strip()}")
    try:
        up = _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        assert up.returncode == 0, up.stderr
        if not Path("/proc/sys/net/ipv4/tcp_migrate_req").exists():
            pytest.skip("this kernel has no net.ipv4.tcp_migrate_req (Linux < 5.14)")
        out = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, str(PROBE), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        figures: dict[str, Any] = json.loads(out.stdout)
    finally:
        _ip("netns", "delete", name)
    print(json.dumps(figures, indent=1))
    if out.stderr:
        print("the probe's stderr:", out.stderr[-4000:])
    return figures


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    """The probe's figures, from a namespace of our own."""
    return _probe_in_namespace("1", timeout=60)


@pytest.fixture(scope="module")
def leaving() -> list[dict[str, Any]]:
    """Three rounds each way of a worker leaving its group of three under load (a few s each)."""
    figures: list[dict[str, Any]] = _probe_in_namespace("leave", "3", timeout=120)["leave"]
    return figures


def test_reuseport_naive_close_resets_the_queue_without_migration(
    measured: dict[str, Any],
) -> None:
    """tcp_migrate_req=0: every connection queued on the closed listener is reset."""
    off = measured["raw"][0]
    assert off["migrate"] == 0
    assert off["queued_on_closed"] > 0
    assert off["reset"] == off["queued_on_closed"]
    assert off["accepted_by_other_after"] == 0


def test_reuseport_migration_moves_the_queue_to_the_group(measured: dict[str, Any]) -> None:
    """tcp_migrate_req=1: the queue moves to the other listener; none is reset."""
    on = measured["raw"][1]
    assert on["migrate"] == 1
    assert on["queued_on_closed"] > 0
    assert on["reset"] == 0
    assert on["accepted_by_other_after"] == on["queued_on_closed"]
    # Whether a worker asleep in epoll_wait is woken for them depends on the
    # kernel ("tcp: call sk_data_ready() after listener migration"): reported,
    # not asserted. -1.0 means it slept through.
    assert on["other_woke_after_s"] is not None


@pytest.mark.parametrize("migrate", [0, 1])
def test_reuseport_graceful_shutdown_drains_its_own_queue(
    measured: dict[str, Any], migrate: int
) -> None:
    """aiograceful's shutdown accepts its queue dry before closing: nothing reset, either way."""
    runs = [f for f in measured["graceful"] if f["migrate"] == migrate]
    assert {f["loop"] for f in runs} >= {"asyncio"}
    for figures in runs:
        assert figures["queued_on_closed"] > 0
        assert figures["drained"] == figures["queued_on_closed"]
        assert figures["reset"] == 0
        # Those queued on B (the other worker) were accepted there and left unanswered.
        assert figures["answered"] == figures["drained"]


@pytest.mark.parametrize("migrate", [0, 1])
def test_reuseport_worker_leaving_under_load(measured: dict[str, Any], migrate: int) -> None:
    """One of two workers shuts down under load: nothing refused, nothing lost, either way.

    Once drained it has the group steer new connections to the other worker
    and drops the SYNs that still reach it, then waits for the handshakes
    under way to be done as the kernel reports them (close_and_drain), so no
    connection is made on its socket between its last accept() and the
    close (it was reset there, with migration off).
    """
    runs = [f for f in measured["load"] if f["migrate"] == migrate]
    assert runs
    for figures in runs:
        assert figures["ok"] > 0
        assert figures["failed"] == {}, figures


def test_reuseport_leaving_worker_steers_new_connections_to_a_sibling(
    leaving: list[dict[str, Any]],
) -> None:
    """A worker leaving its group of three under load: nothing fails, and no client waits out a
    dropped SYN once the group steers new connections away from it.

    The fallback (its SYN filter alone: steer 0) drops the SYNs the kernel's
    hash still gives it while it settles; their clients retransmit a second
    later. Steered (steer 1), the group sends them to a sibling instead, and
    the filter drops only what comes between the program's detach and the
    close: on a busy machine a few may, so the steered count is held below
    the fallback's, measured in the same run, or at 0. The leaving worker
    takes each place in the group in turn (its index: 0, 1, 2).
    """
    steered = [f for f in leaving if f["steer"] == 1]
    fallback = [f for f in leaving if f["steer"] == 0]
    assert len(steered) == len(fallback) == 3
    for figures in leaving:
        assert figures["exit"] == 0
        assert figures["ok"] > 0
        assert figures["failed"] == {}, figures
    delayed = sum(f["delayed"] for f in steered)
    delayed_fallback = sum(f["delayed"] for f in fallback)
    print(f"delayed > 0.9 s: steered {delayed}, fallback {delayed_fallback}")
    assert delayed == 0 or delayed < delayed_fallback
