"""Restarts under load: real server processes, client threads making new connections back to back.

A plain restart (SIGTERM, then a new process binds the port) fails requests:
nobody listens in between. A handoff restart (the new process takes the old
one's listening sockets) fails none, and the old process exits 0. The same
holds for a rolling restart of two SO_REUSEPORT workers.
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from aiograceful._tools.restart import Load, ServerProcess, restart_under_load

LOOPS = ["asyncio", "uvloop"]
#: Seconds the new process of a restart takes before it listens.
STARTUP = 1.0


@pytest.mark.parametrize("loop", LOOPS)
def test_restart_plain_fails_requests_handoff_fails_none(loop: str) -> None:
    """Under the same load, a plain restart fails requests; a handoff restart fails none.

    The new process takes 1 s to listen, longer than a client's first SYN
    retransmission: the old one's shutdown drops the SYNs that come while
    its drain settles (close_and_drain), and with a successor quicker than that,
    those clients would be answered by it, not refused.
    """
    plain = restart_under_load("plain", loop=loop, startup_delay=STARTUP)
    assert plain.old_exit == 0
    assert plain.new_exit == 0
    assert plain.load.ok > 0
    # Nobody listens while the new process starts: connects are refused.
    assert plain.load.failed["ConnectionRefusedError"] > 0, plain
    assert len(plain.load.pids) == 2

    handoff = restart_under_load("handoff", loop=loop, startup_delay=STARTUP)
    assert handoff.load.failures == 0, handoff.load.failed
    assert handoff.load.ok > 0
    assert len(handoff.load.pids) == 2  # both processes answered
    assert handoff.old_exit == 0
    assert handoff.new_exit == 0
    assert handoff.old_done.startswith("DONE handed_off=True"), handoff.old_done


@pytest.mark.parametrize("loop", LOOPS)
def test_restart_rolling_two_reuseport_workers_by_handoff_fails_none(loop: str) -> None:
    """Two SO_REUSEPORT workers on one port, each restarted in turn by handoff: 0 failures.

    Each worker's successor takes that worker's own socket, a member of the
    group, so the group never loses a member and no queue is ever closed.
    """
    with tempfile.TemporaryDirectory(prefix="aiog-rolling-") as workdir:
        paths = [os.path.join(workdir, f"w{i}.sock") for i in range(2)]
        procs: list[ServerProcess] = []
        try:
            first = ServerProcess(0, handoff=paths[0], loop=loop, reuse_port=True)
            procs.append(first)
            port = first.ready()
            second = ServerProcess(port, handoff=paths[1], loop=loop, reuse_port=True)
            procs.append(second)
            second.ready()
            load = Load(port, threads=4).start()
            time.sleep(0.3)
            exits = []
            for i, old in enumerate([first, second]):
                new = ServerProcess(
                    port, handoff=paths[i], loop=loop, reuse_port=True, startup_delay=0.1
                )
                procs.append(new)
                new.ready()
                exits.append(old.wait())
            time.sleep(0.3)
            result = load.stop()
            exits += [procs[2].stop(), procs[3].stop()]
        finally:
            for proc in procs:
                proc.close()
    print(f"rolling restart ({loop}): {result.ok} answered, failed {dict(result.failed)}")
    assert result.failures == 0, result.failed
    assert result.ok > 0
    assert exits == [0, 0, 0, 0]
    for old in procs[:2]:
        assert any(line.startswith("DONE handed_off=True") for line in old.lines), old.lines
    assert len(result.pids) >= 3
