"""Leaks: thousands of connection lifecycles through each path leave nothing behind.

Each test runs ``AIOGRACEFUL_LEAK_CONNECTIONS`` (default 10,000) connections
over loopback through one way of ending, ``CONCURRENCY`` at a time, after a
warm-up batch. Then, after ``gc.collect()``, the process must be back at its
baseline: the same open file descriptors, the same asyncio tasks, traced
memory within a small tolerance, no live ``Linger``/protocol objects, and no
``ResourceWarning`` (recorded over the whole run, not only at the end).

Both ends run in the test's loop: our end is a ``GracefulProtocol`` (or the
server's stream connections, for the shutdown path); the client is a plain
asyncio protocol that behaves as the path needs (reads and FINs, stays
silent, floods, resets).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import sys
import time
import tracemalloc
import warnings
from collections.abc import Iterator

import _faults
import pytest
from _faults import REPLY, LoadClient, open_fds, run_clients

from aiograceful import (
    CloseOutcome,
    CloseResult,
    GracefulProtocol,
    GracefulServer,
    ShutdownReport,
    graceful_close,
    start_server,
)
from aiograceful._linger import Discarder, Linger

N = int(os.environ.get("AIOGRACEFUL_LEAK_CONNECTIONS", "10000"))
# Connections in flight at once, per path (the timeout path waits out its timer).
CONCURRENCY = {"timeout": 500}
# Warm-up lifecycles before the baseline, at the same concurrency, so that
# caches and containers (the selector's map, the loop's timer heap, asyncio's
# task set, the weak dict of closes) reach their high-water mark first.
WARM_UP = 1000
# After N lifecycles, traced memory may hold this many more live allocations
# than at the baseline: a leak of one object per connection leaves N more.
# Bytes get a looser bound, since one container that grew (a dict's table,
# sized by the peak of connections in flight) is one allocation of many KiB.
BLOCKS_TOLERANCE = max(100, N // 10)
MEMORY_TOLERANCE = 512 * 1024

FIGURES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_figures() -> Iterator[None]:
    """Print what each path measured (visible with -s)."""
    yield
    print()
    for name, line in sorted(FIGURES.items()):
        print(f"leaks {name}: {line}")


# -- our end -----------------------------------------------------------------------


class Server(GracefulProtocol):
    """Our end: answers the request line, then ends the connection the path's way."""

    def __init__(self, path: str, tally: Tally) -> None:
        self.path = path
        self.tally = tally
        self.buffered = b""

    def data_received(self, data: bytes) -> None:
        self.buffered += data
        if not self.buffered.endswith(b"\n"):
            return
        path = self.path
        if path == "abort":
            self.abort()
            fut = self.close_gracefully()
        else:
            self.transport.write(REPLY)
            if path == "timeout":
                fut = self.close_gracefully(timeout=0.05, idle_timeout=None)
            elif path == "overflow":
                fut = self.close_gracefully(timeout=5.0, max_discard=1024)
            else:  # clean, reset
                fut = self.close_gracefully(timeout=5.0)
        fut.add_done_callback(self.tally.record)

    def on_peer_eof(self) -> None:
        # A peer that FINs before asking is not part of any path.
        self.close_gracefully().add_done_callback(self.tally.record)


class Tally:
    """Counts the close results on our side."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter[CloseOutcome] = collections.Counter()
        self.done = 0

    def record(self, fut: asyncio.Future[CloseResult]) -> None:
        self.done += 1
        if not fut.cancelled():
            self.outcomes[fut.result().outcome] += 1


# -- measuring -------------------------------------------------------------------------


def _live(*types: type) -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, types))


def _collect() -> None:
    """Collect until nothing more is freed: a weak dict's entry dies in one pass, its value's
    cycle in the next."""
    for _ in range(5):
        if not gc.collect():
            return


class Baseline:
    """The process's resources at one moment, after a full collection."""

    def __init__(self) -> None:
        _collect()
        self.fds = open_fds()
        self.tasks = len(asyncio.all_tasks())
        self.memory = tracemalloc.get_traced_memory()[0]
        self.snapshot = tracemalloc.take_snapshot()
        self.lingers = _live(Linger, Discarder, GracefulProtocol, LoadClient)


def _check_back_at(base: Baseline, label: str, seconds: float, extra: str) -> None:
    after = Baseline()
    grown = after.memory - base.memory
    lingers = after.lingers - base.lingers
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    diff = after.snapshot.compare_to(base.snapshot, "lineno")
    blocks = sum(stat.count_diff for stat in diff)
    FIGURES[f"{label} [{loop_name}]"] = (
        f"{N} connections in {seconds:.1f} s; fds {base.fds}->{after.fds}, "
        f"tasks {base.tasks}->{after.tasks}, traced memory {grown:+d} B "
        f"in {blocks:+d} blocks, live closers {lingers}; {extra}"
    )
    detail = "\n".join(str(stat) for stat in diff[:5])
    assert after.fds == base.fds, f"file descriptors leaked: {base.fds} -> {after.fds}"
    assert after.tasks == base.tasks, f"tasks leaked: {base.tasks} -> {after.tasks}"
    assert lingers == 0, f"{lingers} closers or protocols are still alive"
    assert blocks < BLOCKS_TOLERANCE, f"{blocks} more live allocations:\n{detail}"
    assert grown < MEMORY_TOLERANCE, f"traced memory grew by {grown} B:\n{detail}"


@pytest.fixture
def traced() -> Iterator[list[warnings.WarningMessage]]:
    """Trace allocations and record every warning raised while the test runs."""
    tracemalloc.start(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
            _collect()
    finally:
        tracemalloc.stop()
    resource = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not resource, f"ResourceWarning: {[str(w.message) for w in resource]}"
    assert not caught, f"warnings: {[str(w.message) for w in caught]}"


# -- the paths ---------------------------------------------------------------------------

EXPECTED = {
    "clean": CloseOutcome.CLEAN,
    "timeout": CloseOutcome.TIMEOUT,
    "overflow": CloseOutcome.OVERFLOW,
    "reset": CloseOutcome.PEER_RESET,
    "abort": CloseOutcome.ABORTED,
}


async def _clients_in_subprocess(
    path: str, port: int, count: int, concurrency: int
) -> dict[str, int]:
    """Run ``count`` clients of ``path`` in a child process (the other CPU); their replies."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        _faults.__file__,
        path,
        "127.0.0.1",
        str(port),
        str(count),
        str(concurrency),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120.0)
    assert proc.returncode == 0, f"the client process failed ({proc.returncode})"
    replies: dict[str, int] = json.loads(out)
    return replies


async def _serve_path(
    path: str, count: int, tally: Tally, *, streams: bool = False
) -> dict[str, int]:
    """Serve ``count`` connections ending the ``path`` way; return the replies clients read."""
    loop = asyncio.get_running_loop()
    if streams:

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(REPLY)
            result = await graceful_close(writer, timeout=5.0)
            tally.done += 1
            tally.outcomes[result.outcome] += 1

        server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=1024)
    else:
        server = await loop.create_server(lambda: Server(path, tally), "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    expected = tally.done + count
    try:
        replies = await _clients_in_subprocess(path, port, count, CONCURRENCY.get(path, 200))
        # Our side ends a little after the client's (a FIN or RST in flight).
        end = loop.time() + 10.0
        while tally.done < expected and loop.time() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        assert tally.done == expected
    finally:
        server.close()
        await server.wait_closed()
    return replies


@pytest.mark.parametrize("path", list(EXPECTED))
async def test_protocol_lifecycles_leave_no_leak(
    path: str, traced: list[warnings.WarningMessage]
) -> None:
    """N lifecycles ending one way leave fds, tasks, memory and closers at baseline."""
    tally = Tally()
    await _serve_path(path, WARM_UP, tally)  # warm-up: caches, free lists
    base = Baseline()
    started = time.monotonic()
    replies = await _serve_path(path, N, tally)
    seconds = time.monotonic() - started

    if path == "overflow":
        # max_discard is enforced once our reply is acknowledged: a flood that
        # lands while the reply is still unacknowledged is discarded, and a FIN
        # that follows it ends the close CLEAN (seen once in 11,000 on uvloop).
        assert set(tally.outcomes) <= {CloseOutcome.OVERFLOW, CloseOutcome.CLEAN}, tally.outcomes
        assert tally.outcomes[CloseOutcome.OVERFLOW] >= (WARM_UP + N) // 2, tally.outcomes
    else:
        assert tally.outcomes == {EXPECTED[path]: WARM_UP + N}, tally.outcomes
    if path != "abort":
        # Every client read the whole reply before the connection ended.
        assert replies == {REPLY.decode(): N}, replies
    outcomes = {k.name: v for k, v in tally.outcomes.items()}
    _check_back_at(base, path, seconds, f"outcomes {outcomes}")


async def test_graceful_close_stream_lifecycles_leave_no_leak(
    traced: list[warnings.WarningMessage],
) -> None:
    """N asyncio stream connections closed by graceful_close() leave nothing behind."""
    tally = Tally()
    await _serve_path("clean", WARM_UP, tally, streams=True)
    base = Baseline()
    started = time.monotonic()
    replies = await _serve_path("clean", N, tally, streams=True)
    seconds = time.monotonic() - started

    assert tally.outcomes == {CloseOutcome.CLEAN: WARM_UP + N}, tally.outcomes
    assert replies == {REPLY.decode(): N}, replies
    _check_back_at(base, "streams graceful_close", seconds, f"outcomes CLEAN: {WARM_UP + N}")


# -- the server's shutdown -------------------------------------------------------------

ROUND = 500  # connections open at each shutdown


async def _shutdown_round(count: int, reports: list[ShutdownReport]) -> dict[str, int]:
    """Start a server, open ``count`` connections that got their reply, shut it down."""
    replied = 0
    all_replied = asyncio.Event()
    server: GracefulServer | None = None

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal replied
        await reader.readline()
        writer.write(REPLY)
        await writer.drain()
        replied += 1
        if replied == count:
            all_replied.set()
        assert server is not None
        await server.notice.wait()
        # Returning: the server closes the writer gracefully.

    server = await start_server(handler, "127.0.0.1", 0, grace=10.0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    clients = asyncio.ensure_future(run_clients("shutdown", "127.0.0.1", port, count, count))
    try:
        await asyncio.wait_for(all_replied.wait(), 30.0)
        reports.append(await asyncio.wait_for(server.shutdown(), 30.0))
        return await asyncio.wait_for(clients, 30.0)
    finally:
        if not clients.done():
            clients.cancel()
        await server.shutdown()


async def test_server_shutdown_lifecycles_leave_no_leak(
    traced: list[warnings.WarningMessage],
) -> None:
    """N connections ended by server shutdowns leave fds, tasks, memory and closers at baseline."""
    reports: list[ShutdownReport] = []
    await _shutdown_round(ROUND, reports)
    await _shutdown_round(ROUND, reports)
    base = Baseline()
    started = time.monotonic()
    replies: collections.Counter[str] = collections.Counter()
    for start in range(0, N, ROUND):
        replies.update(await _shutdown_round(min(ROUND, N - start), reports))
    seconds = time.monotonic() - started
    reports = reports[2:]  # the warm-up's

    assert replies == {REPLY.decode(): N}, replies
    assert sum(r.connections for r in reports) == N
    assert sum(r.closed_clean for r in reports) == N
    assert sum(r.forced for r in reports) == 0
    outcomes: collections.Counter[CloseOutcome] = collections.Counter()
    for report in reports:
        outcomes.update(report.outcomes)
    assert outcomes == {CloseOutcome.CLEAN: N}, outcomes
    names = {k.name: v for k, v in outcomes.items()}
    _check_back_at(base, "server shutdown", seconds, f"{len(reports)} shutdowns, outcomes {names}")
