"""GracefulServer: asymmetric shutdown, grace then force, drained accept queue, rejection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import http.client
import logging
import math
import pathlib
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from _util import (
    assert_still_accepts,
    connect_outcome,
    http_post,
    linux_only,
    paced_read,
    port_of,
    silent_handshake,
    wait_until,
)

import aiograceful
from aiograceful import (
    CloseOutcome,
    GracefulProtocol,
    GracefulServer,
    ShutdownReport,
    create_server,
    start_server,
)

LOCALHOST = "127.0.0.1"


# -- the simultaneous-shutdown race -------------------------------------------------------


class RaceLineServer(GracefulProtocol):
    """``REQ n`` -> ``ANS n``; the shutdown notice is a ``BYE`` line."""

    def data_received(self, data: bytes) -> None:
        for line in data.splitlines():
            if line.startswith(b"REQ "):
                self.transport.write(b"ANS " + line[4:] + b"\n")

    def on_shutdown_notice(self) -> None:
        self.transport.write(b"BYE\n")


class NaiveRaceServer(asyncio.Protocol):
    """The same protocol, shut down symmetrically: the server half-closes at once."""

    def __init__(self, registry: set[NaiveRaceServer]) -> None:
        self.registry = registry
        self.eof_written = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.registry.add(self)

    def data_received(self, data: bytes) -> None:
        if self.eof_written:
            return  # the write side is closed: these requests cannot be answered
        for line in data.splitlines():
            if line.startswith(b"REQ "):
                self.transport.write(b"ANS " + line[4:] + b"\n")

    def eof_received(self) -> bool:
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)

    def shutdown(self) -> None:
        if not self.transport.is_closing():
            self.eof_written = True
            self.transport.write_eof()


async def race_client(port: int, *, rng: random.Random) -> tuple[int, int]:
    """Send requests on a random schedule; stop and half-close on BYE or EOF, or when done.

    Returns (requests sent, answers received).
    """
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    answers = 0
    ended = asyncio.Event()

    async def read_all() -> None:
        nonlocal answers
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                if line.startswith(b"ANS "):
                    answers += 1
                elif line == b"BYE\n":
                    ended.set()
        ended.set()

    read_task = asyncio.create_task(read_all())
    sent = 0
    try:
        for i in range(rng.randint(1, 8)):
            if ended.is_set() or writer.transport.is_closing():
                break
            writer.write(b"REQ %d\n" % i)
            sent += 1
            await asyncio.sleep(rng.uniform(0, 0.002))
        if not writer.transport.is_closing():
            writer.write_eof()
        await asyncio.wait_for(read_task, 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return sent, answers


#: A race client bound to its random schedule: port -> (requests sent, answers received).
RaceClient = Callable[[int], Awaitable[tuple[int, int]]]


def client_results(results: list[tuple[int, int] | None]) -> list[tuple[int, int]]:
    """The clients' (sent, answered) from a round's gather: stop()'s None first, then theirs."""
    stopped, *answers = results
    assert stopped is None
    counts = [a for a in answers if a is not None]
    assert len(counts) == len(answers)
    return counts


async def graceful_round(clients: list[RaceClient], delay: float) -> list[tuple[int, int]]:
    """One round against a GracefulServer: the notice, then the client's FIN, then ours."""
    server = await create_server(RaceLineServer, LOCALHOST, 0, grace=5.0)

    async def stop() -> None:
        await asyncio.sleep(delay)
        report = await server.shutdown()
        assert report.forced == 0

    return client_results(await asyncio.gather(stop(), *(c(port_of(server)) for c in clients)))


async def naive_round(clients: list[RaceClient], delay: float) -> list[tuple[int, int]]:
    """One round against a server that shuts down symmetrically (half-closes at once)."""
    registry: set[NaiveRaceServer] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: NaiveRaceServer(registry), LOCALHOST, 0)

    async def stop() -> None:
        await asyncio.sleep(delay)
        server.close()
        for proto in list(registry):
            proto.shutdown()
        await wait_until(lambda: not registry, 5.0)

    results = await asyncio.gather(stop(), *(c(port_of(server)) for c in clients))
    await server.wait_closed()
    return client_results(results)


async def run_race(rounds: int, seed: int, *, graceful: bool) -> tuple[int, int]:
    """Run the randomized race; return (requests sent, requests lost) over all rounds."""
    rng = random.Random(seed)
    sent_total = lost_total = 0
    play = graceful_round if graceful else naive_round
    for _ in range(rounds):
        n_clients = rng.randint(1, 4)
        delay = rng.uniform(0, 0.008)
        seeds = [rng.random() for _ in range(n_clients)]
        clients: list[RaceClient] = [
            functools.partial(race_client, rng=random.Random(s)) for s in seeds
        ]
        for sent, answered in await play(clients, delay):
            sent_total += sent
            lost_total += sent - answered
    return sent_total, lost_total


async def test_shutdown_race_loses_nothing_with_the_notice() -> None:
    """Seed 002: over 200 random rounds, every request sent before the client's FIN is answered."""
    sent, lost = await run_race(200, seed=2002, graceful=True)
    assert sent > 200
    assert lost == 0, f"{lost} of {sent} requests lost"


async def test_shutdown_race_symmetric_close_loses_requests() -> None:
    """The same schedule with a server that half-closes at once loses some requests."""
    sent, lost = await run_race(200, seed=2002, graceful=False)
    assert sent > 200
    assert lost > 0, "the naive symmetric shutdown lost nothing: the race was not reproduced"


# -- shutdown at scale --------------------------------------------------------------------


async def test_shutdown_1000_connections_counts_are_exact() -> None:
    """A burst of 1000: idle and mid-request ones end CLEAN, ignorers are forced after grace."""
    n_idle, n_busy, n_ignore = 600, 250, 150
    grace, force = 1.5, 0.5

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if line == b"SLOW\n":
                await asyncio.sleep(0.5)  # mid-request when the shutdown starts
            writer.write(b"DONE " + line)
            await writer.drain()

    def on_notice(writer: asyncio.StreamWriter) -> None:
        writer.write(b"BYE\n")

    server = await start_server(
        handler, LOCALHOST, 0, grace=grace, force_timeout=force, on_notice=on_notice
    )
    port = port_of(server)
    outcome: dict[str, list[bytes | str]] = {"idle": [], "busy": [], "ignore": []}
    requested = asyncio.Event()
    release = asyncio.Event()
    busy_sent = 0

    async def client(kind: str) -> None:
        nonlocal busy_sent
        reader, writer = await asyncio.open_connection(LOCALHOST, port)
        try:
            if kind == "busy":
                writer.write(b"SLOW\n")
                busy_sent += 1
                if busy_sent == n_busy:
                    requested.set()
            got = b""
            with contextlib.suppress(ConnectionError):
                bye = await reader.readline()
                if kind == "ignore":
                    # Never half-closes, never closes, even after the
                    # server's FIN: it waits to be forced.
                    got = bye + await reader.read()
                    await release.wait()
                else:
                    writer.write_eof()
                    got = bye + await reader.read()
            outcome[kind].append(got)
        except ConnectionResetError:
            outcome[kind].append("RST")
        finally:
            writer.close()

    clients = [asyncio.create_task(client("idle")) for _ in range(n_idle)]
    clients += [asyncio.create_task(client("busy")) for _ in range(n_busy)]
    clients += [asyncio.create_task(client("ignore")) for _ in range(n_ignore)]
    await asyncio.wait_for(requested.wait(), 20)
    await wait_until(lambda: server.connections == n_idle + n_busy + n_ignore, 20)
    await asyncio.sleep(0.05)  # the SLOW lines reach their handlers

    started = time.monotonic()
    report = await server.shutdown()
    elapsed = time.monotonic() - started
    release.set()
    await asyncio.wait_for(asyncio.gather(*clients), 20)

    assert report.connections == 1000
    assert report.closed_clean == n_idle + n_busy
    assert report.forced == n_ignore
    assert report.outcomes.get(CloseOutcome.CLEAN, 0) == n_idle + n_busy
    # The ignorers' short linger ran out: the peer never sent its FIN.
    forced_outcomes = {CloseOutcome.TIMEOUT, CloseOutcome.IDLE_TIMEOUT}
    assert set(report.outcomes) - {CloseOutcome.CLEAN} <= forced_outcomes
    assert sum(report.outcomes.values()) == 1000
    assert server.connections == 0
    assert elapsed <= grace + force + 3.0
    assert set(outcome["idle"]) == {b"BYE\n"}
    # The busy ones got the notice, then their answer, then EOF.
    assert set(outcome["busy"]) == {b"BYE\nDONE SLOW\n"}
    # They read the notice, then our FIN (the forced close lingers first).
    assert outcome["ignore"] == [b"BYE\n"] * n_ignore


# -- the accept queue ---------------------------------------------------------------------


def queued_client(port: int, results: list[object]) -> None:
    """Connect (the handshake completes into the accept queue), then read until EOF or error."""
    with socket.create_connection((LOCALHOST, port), timeout=10) as sock:
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
                if data.endswith(b"BYE\n"):
                    sock.shutdown(socket.SHUT_WR)
            results.append(data)
        except ConnectionResetError:
            results.append("RST")


class ByeProtocol(GracefulProtocol):
    def on_shutdown_notice(self) -> None:
        self.transport.write(b"BYE\n")


async def fill_accept_queue(port: int, n: int, results: list[object]) -> list[threading.Thread]:
    """Start ``n`` blocking clients while the loop is blocked, so none is accepted yet."""
    threads = [threading.Thread(target=queued_client, args=(port, results)) for _ in range(n)]
    for t in threads:
        t.start()
    # Block the loop: the clients' handshakes complete into the kernel's
    # accept queue, and nobody calls accept().
    time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is the point
    return threads


async def join(threads: list[threading.Thread]) -> None:
    for t in threads:
        await asyncio.to_thread(t.join, 15)
        assert not t.is_alive()


async def test_shutdown_naive_close_resets_the_accept_queue() -> None:
    """asyncio's Server.close() with connections in the accept queue resets them."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, LOCALHOST, 0, backlog=64)
    results: list[object] = []
    threads = await fill_accept_queue(port_of(server), 20, results)
    server.close()  # same loop iteration: nothing was accepted
    await join(threads)
    await server.wait_closed()
    assert results.count("RST") == 20


@pytest.mark.parametrize("loop_turn_first", [False, True], ids=["at-once", "after-a-loop-turn"])
async def test_shutdown_drains_the_accept_queue(loop_turn_first: bool) -> None:
    """Connections still in the accept queue at shutdown get the notice, then EOF, not RST.

    "after-a-loop-turn": the shutdown starts in the iteration in which the loop's
    own accept callback has taken the queue but not yet made the transports.
    """
    server = await create_server(ByeProtocol, LOCALHOST, 0, backlog=64, grace=3)
    results: list[object] = []
    threads = await fill_accept_queue(port_of(server), 20, results)
    stats = server.accept_queue()
    assert stats is not None
    assert stats.depth == 20
    assert stats.backlog == 64
    if loop_turn_first:
        await asyncio.sleep(0)
    report = await server.shutdown()
    await join(threads)
    assert results == [b"BYE\n"] * 20
    assert report.connections == 20
    if not loop_turn_first:
        assert report.drained > 0  # the loop itself may have accepted a few first
    assert report.closed_clean == 20
    assert report.outcomes == {CloseOutcome.CLEAN: 20}


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="a Linux socket filter")
async def test_shutdown_refuses_handshakes_while_it_drains(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client connecting while the queue is drained gets no handshake: nothing sent or reset.

    The window between the drain's last accept() and the close is widened:
    a handshake under way that never completes (a client that vanished
    after its SYN) holds the settle to its bound, 2 s here, so that a
    client lands in it; the stock case (a connection made there is reset
    after its request) is
    test_socket_refuse_new_handshakes_closes_the_window_after_a_drain.
    """
    monkeypatch.setattr(aiograceful._accept, "HANDSHAKE_SETTLE_LIMIT", 2.0)
    # (The queue is served once the settle is over: grace outlasts it.)
    server = await create_server(ByeProtocol, LOCALHOST, 0, backlog=64, grace=10)
    port = port_of(server)
    results: list[object] = []
    threads = await fill_accept_queue(port, 5, results)
    with silent_handshake(LOCALHOST, port):
        await asyncio.sleep(0.05)  # its SYN is in
        shutdown = asyncio.ensure_future(server.shutdown())
        await asyncio.sleep(0.2)  # the filter is on, the settle not over
        late = await asyncio.to_thread(connect_outcome, LOCALHOST, port, 0.3)
        assert late == "TimeoutError"
        report = await shutdown
    await join(threads)
    assert results == [b"BYE\n"] * 5
    assert report.outcomes == {CloseOutcome.CLEAN: 5}
    after = await asyncio.to_thread(connect_outcome, LOCALHOST, port, 0.3)
    assert after == "ConnectionRefusedError"


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="Linux sock_diag")
async def test_shutdown_settles_as_the_kernel_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait for handshakes under way follows the kernel, bounded; not a fixed sleep.

    With none under way the shutdown does not wait the (widened) fixed
    settle; with one that never completes it waits until the bound.
    """
    monkeypatch.setattr(aiograceful._accept, "HANDSHAKE_SETTLE", 2.0)
    monkeypatch.setattr(aiograceful._accept, "HANDSHAKE_SETTLE_LIMIT", 0.5)
    loop = asyncio.get_running_loop()
    server = await create_server(ByeProtocol, LOCALHOST, 0, grace=5)
    started = loop.time()
    await server.shutdown()
    assert loop.time() - started < 0.4
    server = await create_server(ByeProtocol, LOCALHOST, 0, grace=5)
    with silent_handshake(LOCALHOST, port_of(server)):
        await asyncio.sleep(0.05)
        started = loop.time()
        await server.shutdown()
        took = loop.time() - started
    assert 0.5 <= took < 1.5


async def test_shutdown_leaves_a_passed_in_listener_unfiltered() -> None:
    """``sock=``: the kernel socket may have other holders (a supervisor, pre-fork workers).

    The shutdown drains it without the SYN filter, so another holder still
    takes connections afterwards; with the filter, this connect would go
    unanswered for good.
    """
    listener = socket.create_server((LOCALHOST, 0), backlog=16)
    keeper = listener.dup()  # the other holder
    with keeper:
        server = await create_server(ByeProtocol, sock=listener, grace=1)
        port = port_of(server)
        await server.shutdown()
        await assert_still_accepts(keeper, LOCALHOST, port)


# -- rejection at a connection limit ------------------------------------------------------

REJECTION = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BODY = b"x" * (4 * 1024 * 1024)


def post_big_body(port: int) -> int | str:
    """POST 4 MiB with stdlib http.client; the status, or the error's name."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=15)
    try:
        conn.request("POST", "/upload", body=BODY)
        return conn.getresponse().status
    except OSError as exc:
        return type(exc).__name__
    finally:
        conn.close()


async def hold_one_connection(port: int) -> asyncio.StreamWriter:
    _reader, writer = await asyncio.open_connection(LOCALHOST, port)
    return writer


async def test_reject_naive_close_loses_the_503() -> None:
    """A server that writes 503 at its limit and closes resets the client still sending."""
    live = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal live
        if live >= 1:
            writer.write(REJECTION)
            writer.close()
            return
        live += 1
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handler, LOCALHOST, 0)
    holder = await hold_one_connection(port_of(server))
    await wait_until(lambda: live == 1, 5.0)
    statuses = [await asyncio.to_thread(post_big_body, port_of(server)) for _ in range(5)]
    holder.close()
    server.close()
    await server.wait_closed()
    assert any(s in ("ConnectionResetError", "BrokenPipeError") for s in statuses), statuses


async def test_reject_over_the_limit_delivers_the_503() -> None:
    """Over max_connections, http.client posting 4 MiB reads the 503 every time."""
    rejected: list[asyncio.Transport] = []

    def on_reject(transport: asyncio.Transport) -> None:
        rejected.append(transport)
        transport.write(REJECTION)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await start_server(handler, LOCALHOST, 0, max_connections=1, on_reject=on_reject)
    holder = await hold_one_connection(port_of(server))
    await wait_until(lambda: server.connections == 1, 5.0)
    statuses = [await asyncio.to_thread(post_big_body, port_of(server)) for _ in range(5)]
    assert statuses == [503] * 5
    assert len(rejected) == 5
    assert server.connections == 1
    holder.close()
    report = await server.shutdown()
    assert report.rejected == 5


async def test_reject_default_closes_gracefully_without_writing() -> None:
    """With no on_reject, an extra connection sees EOF (no bytes), not a reset."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with await start_server(handler, LOCALHOST, 0, max_connections=1) as server:
        holder = await hold_one_connection(port_of(server))
        await wait_until(lambda: server.connections == 1, 5.0)
        reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        holder.close()


async def test_reject_max_connections_holds_under_a_burst_of_accepts() -> None:
    """Connections arriving together are counted before connection_made: 1 served, 4 rejected."""
    served = 0
    rejected: list[asyncio.Transport] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        await reader.read()

    server = await start_server(
        handler, LOCALHOST, 0, max_connections=1, on_reject=rejected.append, grace=0.5
    )
    socks = [socket.create_connection((LOCALHOST, port_of(server))) for _ in range(5)]
    try:
        await wait_until(lambda: served + len(rejected) == 5, 5.0)
        assert (served, len(rejected)) == (1, 4)
    finally:
        for sock in socks:
            sock.close()
        await server.shutdown()


async def test_reject_max_connections_holds_during_drain_delay() -> None:
    """During drain_delay the server still accepts, and still rejects over max_connections."""
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()

    def reject(transport: asyncio.Transport) -> None:
        transport.write(b"BUSY\n")

    server = await start_server(
        hold, LOCALHOST, 0, max_connections=1, on_reject=reject, drain_delay=1.0, grace=0.5
    )
    first = await asyncio.open_connection(LOCALHOST, port_of(server))
    await wait_until(lambda: server.connections == 1, 5.0, every=0.01)
    shutting = asyncio.ensure_future(server.shutdown())
    await wait_until(server.notice.is_set, 5.0, every=0.01)
    reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    answer = await asyncio.wait_for(reader.read(), 5)
    release.set()
    report = await asyncio.wait_for(shutting, 10)
    writer.close()
    first[1].close()
    assert answer == b"BUSY\n"  # rejected at the limit, during the notice phase
    assert report.rejected == 1, report


# -- hooks, handlers, lifecycle -----------------------------------------------------------


async def test_notice_hook_that_raises_is_logged_and_shutdown_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A raising notice hook is logged on 'aiograceful'; the connection still closes."""

    class Broken(GracefulProtocol):
        def on_shutdown_notice(self) -> None:
            raise RuntimeError("hook failed")

    server = await create_server(Broken, LOCALHOST, 0, grace=2)
    reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    await wait_until(lambda: server.connections == 1, 5.0)
    with caplog.at_level(logging.ERROR, logger="aiograceful"):
        report = await server.shutdown()
    assert "hook failed" in caplog.text
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert report.connections == 1
    assert sum(report.outcomes.values()) == 1
    assert server.connections == 0


async def test_stream_notice_hook_that_raises_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A raising on_notice(writer) is logged and its connection closed gracefully."""

    def on_notice(writer: asyncio.StreamWriter) -> None:
        raise ValueError("notice broke")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await start_server(handler, LOCALHOST, 0, on_notice=on_notice, grace=2)
    reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    await wait_until(lambda: server.connections == 1, 5.0)
    with caplog.at_level(logging.ERROR, logger="aiograceful"):
        shutdown = asyncio.create_task(server.shutdown())
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.write_eof()
        report = await shutdown
    assert "notice broke" in caplog.text
    assert report.closed_clean == 1
    writer.close()


async def test_async_notice_hook_is_awaited() -> None:
    """An on_notice that returns a coroutine runs to completion during the shutdown."""

    async def on_notice(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.01)
        writer.write(b"GOAWAY\n")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await start_server(handler, LOCALHOST, 0, on_notice=on_notice, grace=2)
    reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    await wait_until(lambda: server.connections == 1, 5.0)
    shutdown = asyncio.create_task(server.shutdown())
    assert await asyncio.wait_for(reader.readline(), 5) == b"GOAWAY\n"
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    report = await shutdown
    assert report.outcomes == {CloseOutcome.CLEAN: 1}
    writer.close()


async def test_handler_that_raises_is_logged_and_writer_closed_gracefully(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler's exception is logged; what it wrote still arrives, then EOF."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"partial answer\n")
        raise KeyError("handler bug")

    async with await start_server(handler, LOCALHOST, 0) as server:
        reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
        with caplog.at_level(logging.ERROR, logger="aiograceful"):
            writer.write(b"request\n" + b"y" * 100_000)  # unread bytes behind the request
            assert await asyncio.wait_for(reader.read(), 5) == b"partial answer\n"
            writer.close()
            await wait_until(lambda: server.connections == 0, 5.0)
        assert "handler bug" in caplog.text


async def test_handler_return_closes_writer_gracefully_with_unread_data() -> None:
    """A handler that returns with the client still sending: the reply is delivered, FIN follows."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")

    async with await start_server(handler, LOCALHOST, 0) as server:
        statuses = [await asyncio.to_thread(post_big_body, port_of(server)) for _ in range(3)]
    assert statuses == [413] * 3


async def test_shutdown_is_idempotent_and_shared() -> None:
    """Concurrent and later shutdown() calls share one shutdown and one report."""
    server = await create_server(ByeProtocol, LOCALHOST, 0, grace=0.5)
    _reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    await wait_until(lambda: server.connections == 1, 5.0)
    first, second = await asyncio.gather(server.shutdown(), server.shutdown())
    third = await server.shutdown()
    assert first is second is third
    assert isinstance(first, ShutdownReport)
    writer.close()
    assert not server.is_serving()


async def test_shutdown_with_no_connections_is_quick() -> None:
    """An idle server shuts down without waiting for grace."""
    server = await create_server(ByeProtocol, LOCALHOST, 0, grace=30)
    started = time.monotonic()
    report = await server.shutdown()
    assert time.monotonic() - started < 5
    assert report.connections == report.closed_clean == report.forced == 0


async def test_shutdown_forces_ignorers_within_bounds() -> None:
    """A peer that ignores the notice and never closes is forced; the report says so."""
    server = await create_server(ByeProtocol, LOCALHOST, 0, grace=0.3, force_timeout=0.2)
    _reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    await wait_until(lambda: server.connections == 1, 5.0)
    started = time.monotonic()
    report = await server.shutdown()
    elapsed = time.monotonic() - started
    assert report.forced == 1
    assert report.closed_clean == 0
    assert elapsed < 0.3 + 0.2 + 2.0
    assert report.outcomes.get(CloseOutcome.CLEAN, 0) == 0
    writer.close()


CHUNK = 64 * 1024


def streaming_handler(
    how: str, sent: dict[str, int], tasks: dict[str, tuple[asyncio.Task[Any], asyncio.StreamWriter]]
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Stream an answer (at most 64 MiB) until cancelled or closed; count it in ``sent[how]``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks[how] = (task, writer)
        await reader.readline()
        sent[how] = 0
        while sent[how] < 64 * 1024 * 1024 and not writer.is_closing():
            writer.write(b"s" * CHUNK)
            sent[how] += CHUNK
            await writer.drain()

    return handler


async def test_shutdown_force_lets_go_to_the_kernel() -> None:
    """After the force, a stalled client still gets all the kernel held (RST: next to nothing)."""
    sent: dict[str, int] = {}
    tasks: dict[str, tuple[asyncio.Task[Any], asyncio.StreamWriter]] = {}
    letgo = await start_server(
        streaming_handler("letgo", sent, tasks), LOCALHOST, 0, grace=1, force_timeout=0.5
    )
    reset = await start_server(
        streaming_handler("reset", sent, tasks),
        *(LOCALHOST, 0),
        grace=1,
        force_timeout=0.5,
        reset_on_failure=True,
    )
    plain = await asyncio.start_server(streaming_handler("plain", sent, tasks), LOCALHOST, 0)
    resume = threading.Event()
    # Each client stops reading once its 4 KiB buffer is full (a zero window).
    reads = asyncio.gather(
        *(
            asyncio.to_thread(
                paced_read, port_of(server), b"GET\n", math.inf, rcvbuf=4096, resume=resume
            )
            for server in (plain, reset, letgo)
        )
    )
    try:
        await wait_until(lambda: len(sent) == 3, 5.0)
        await asyncio.sleep(0.3)  # the answers fill the kernels' send queues; the handlers wait
        # Nothing moves from now on (the clients read nothing): what was
        # handed to the kernel is what was written less what is still buffered.
        handed = {
            how: sent[how] - w.transport.get_write_buffer_size() for how, (_, w) in tasks.items()
        }
        reports = await asyncio.gather(letgo.shutdown(), reset.shutdown())
        # The stock server's end, in the same test: a plain close() of its connection.
        plain.close()
        tasks["plain"][1].close()
        await plain.wait_closed()
    finally:
        resume.set()
    got = dict(zip(("plain", "reset", "letgo"), await reads, strict=True))
    await asyncio.wait_for(tasks["plain"][0], 5)
    for report in reports:
        assert report.forced == 1
        assert report.outcomes == {CloseOutcome.TIMEOUT: 1}
    # Letting go: every byte handed to the kernel, then a FIN. What was still
    # in the transport's own buffer is lost, as with a stock server's exit.
    assert got["letgo"] == (handed["letgo"], "FIN")
    assert handed["letgo"] > 1024 * 1024
    # A plain close() keeps flushing in the process: its buffer too.
    assert got["plain"] == (sent["plain"], "FIN")
    assert got["reset"][1] == "ConnectionResetError"
    assert got["reset"][0] < 64 * 1024


SHUTDOWN_SIZE = 6 * 1024 * 1024
SHUTDOWN_RATE = 3 * 1024 * 1024  # ~2 s: still in flight when grace (0.5 s) runs out


@linux_only
async def test_shutdown_force_cancelling_a_unix_close_delivers_everything(
    sock_dir: pathlib.Path,
) -> None:
    """A handler's graceful_close cancelled by the forced end of grace on a Unix socket: all 6 MiB.

    shutdown(grace=0.5, force_timeout=10): at the end of grace the server
    cancels the handler (and so its close) with 6 MiB still going out;
    force_timeout is long enough for the rest, which the cancelled close
    must hand over, not abort. The naive reference: plain asyncio,
    writer.close() and server.close() mid-download.
    """

    async def naive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"x" * SHUTDOWN_SIZE)
        writer.close()

    async def awaiting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"x" * SHUTDOWN_SIZE)
        await aiograceful.graceful_close(writer)

    async def download(path: str, started: threading.Event) -> tuple[int, str]:
        return await asyncio.to_thread(
            paced_read, path, b"GET\n", SHUTDOWN_RATE, timeout=10.0, started=started
        )

    path = str(sock_dir / "naive")
    plain = await asyncio.start_unix_server(naive, path)
    started = threading.Event()
    client = asyncio.ensure_future(download(path, started))
    assert await asyncio.to_thread(started.wait, 10)
    plain.close()
    await plain.wait_closed()
    assert await client == (SHUTDOWN_SIZE, "FIN")

    path = str(sock_dir / "graceful")
    server = await aiograceful.start_unix_server(awaiting, path, grace=0.5, force_timeout=10.0)
    started = threading.Event()
    client = asyncio.ensure_future(download(path, started))
    assert await asyncio.to_thread(started.wait, 10)
    report = await server.shutdown()
    got = await client
    assert report.forced == 1  # grace ran out with the download in flight
    assert got == (SHUTDOWN_SIZE, "FIN")


async def test_async_with_and_serve_forever_on_shutdown() -> None:
    """serve_forever() returns once shutdown() has run; async with shuts down on exit."""
    async with await create_server(ByeProtocol, LOCALHOST, 0, grace=0.5) as server:
        serving = asyncio.create_task(server.serve_forever())
        await asyncio.sleep(0.05)
        assert server.is_serving()
        await server.shutdown()
        await asyncio.wait_for(serving, 5)
    assert not server.is_serving()


async def test_server_with_sock_and_start_serving_false() -> None:
    """A server given sock= and start_serving=False serves after start_serving() and shuts down."""
    sock = socket.socket()
    sock.bind((LOCALHOST, 0))
    server = await create_server(ByeProtocol, sock=sock, start_serving=False, grace=1)
    assert not server.is_serving()
    await server.start_serving()
    reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    await wait_until(lambda: server.connections == 1, 5.0)
    shutdown = asyncio.create_task(server.shutdown())
    assert await asyncio.wait_for(reader.readline(), 5) == b"BYE\n"
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    report = await shutdown
    assert report.outcomes == {CloseOutcome.CLEAN: 1}
    writer.close()


async def test_registry_never_leaks() -> None:
    """Connections leave the registry as they close, whichever side closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)

    async with await start_server(handler, LOCALHOST, 0) as server:
        writers = []
        for _ in range(20):
            _r, w = await asyncio.open_connection(LOCALHOST, port_of(server))
            writers.append(w)
        await wait_until(lambda: server.connections == 20, 5.0)
        try:
            for i, w in enumerate(writers):
                if i % 2:
                    w.write(b"x")  # the handler returns; the server closes
                    w.write_eof()
                else:
                    w.close()  # the client goes away first
            await wait_until(lambda: server.connections == 0, 5.0)
        finally:
            for w in writers:
                w.close()


async def test_shutdown_force_timeout_lets_a_lingering_stream_end_clean() -> None:
    """A connection lingering after its handler returned gets force_timeout to end CLEAN."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")  # return at once: the server lingers for the peer's FIN

    server = await start_server(
        handler, LOCALHOST, 0, grace=0.2, force_timeout=3.0, linger_idle_timeout=None
    )
    reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    assert await reader.readline() == b"hello\n"

    async def finish_late() -> None:
        await asyncio.sleep(0.6)  # grace is over, the force linger runs
        writer.write_eof()

    finishing = asyncio.create_task(finish_late())
    report = await server.shutdown()
    await finishing
    assert await reader.read() == b""
    assert report.forced == 1
    assert report.outcomes == {CloseOutcome.CLEAN: 1}
    writer.close()


async def test_shutdown_bounds_a_connection_attaching_after_grace(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A TLS client whose handshake ends after grace is notified and closed, not left open."""
    server_ctx, client_ctx = tls_contexts

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await start_server(handler, LOCALHOST, 0, ssl=server_ctx, grace=0.2, force_timeout=0.3)
    raw = socket.create_connection((LOCALHOST, port_of(server)))
    raw.setblocking(False)
    await asyncio.sleep(0.1)  # accepted; the TLS handshake has not begun
    await server.shutdown()
    reader, writer = await asyncio.open_connection(
        sock=raw, ssl=client_ctx, server_hostname=LOCALHOST
    )
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    await wait_until(lambda: server.connections == 0, 5.0)
    writer.transport.abort()


async def test_notice_skipped_after_the_handlers_write_eof(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the handler's writer.write_eof(), no notice hook: it could not write."""
    notified: list[asyncio.StreamWriter] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"all sent\n")
        writer.write_eof()
        await reader.read()

    def on_notice(writer: asyncio.StreamWriter) -> None:
        notified.append(writer)
        writer.write(b"BYE\n")

    server = await start_server(handler, LOCALHOST, 0, on_notice=on_notice, grace=2)
    reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    assert await reader.read() == b"all sent\n"
    with caplog.at_level(logging.ERROR, logger="aiograceful"):
        shutdown = asyncio.create_task(server.shutdown())
        await asyncio.sleep(0.05)
        writer.write_eof()  # the peer finishes: both directions closed
        report = await shutdown
    assert notified == []
    assert "raised" not in caplog.text
    assert report.outcomes == {CloseOutcome.CLEAN: 1}
    writer.close()


_REPLY_413 = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def test_handler_own_writer_close_lingers() -> None:
    """A handler's own ``writer.close(); await writer.wait_closed()`` lingers: the 413 is read."""
    results: list[aiograceful.CloseResult] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(_REPLY_413)  # the 4 MiB body is still arriving, unread
        writer.close()
        await writer.wait_closed()
        results.append(await aiograceful.graceful_close(writer))

    naive = await asyncio.start_server(handler, LOCALHOST, 0)
    try:
        naive_got = [await asyncio.to_thread(http_post, port_of(naive), 4 << 20) for _ in range(3)]
    finally:
        naive.close()
    results.clear()
    async with await start_server(handler, LOCALHOST, 0) as server:
        got = [await asyncio.to_thread(http_post, port_of(server), 4 << 20) for _ in range(3)]
        await wait_until(lambda: len(results) == 3, 5.0, every=0.01)
    assert naive_got.count(413) < 3, naive_got  # asyncio's close() resets the uploading client
    assert got == [413] * 3, got
    assert all(r.outcome is CloseOutcome.CLEAN and r.discarded > 0 for r in results), results


async def test_registry_frees_closed_connections_without_the_cycle_collector() -> None:
    """A closed stream connection's record is freed by reference counting alone."""
    from aiograceful._linger import Linger

    def live() -> int:
        return sum(1 for obj in gc.get_objects() if type(obj) is Linger)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await start_server(handler, LOCALHOST, 0)
    gc.collect()
    gc.disable()
    try:
        before = live()
        for _ in range(10):
            reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        await wait_until(lambda: server.connections == 0, 5.0)
        await asyncio.sleep(0.05)
        del reader, writer
        assert live() - before == 0
    finally:
        gc.enable()
        await server.shutdown()


async def test_server_phase_and_report_after_serve_forever() -> None:
    """The phase goes SERVING -> DONE, shows in repr, and the report is kept after the shutdown."""
    server = await aiograceful.start_server(_line_keepalive, LOCALHOST, 0, grace=1)
    assert server.phase is aiograceful.ShutdownPhase.SERVING
    assert server.report is None
    assert "serving" in repr(server)
    assert isinstance(server.notice, aiograceful.ShutdownNotice)
    serving = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0.05)
    report = await server.shutdown()
    await asyncio.wait_for(serving, 5)
    assert _phase(server) is aiograceful.ShutdownPhase.DONE
    assert "done" in repr(server)
    assert _report(server) is report
    stats = server.stats
    assert stats.phase is aiograceful.ShutdownPhase.DONE
    assert stats.shutdown_duration is not None
    assert stats.shutdown_duration >= report.duration - 0.01


def _phase(server: GracefulServer) -> aiograceful.ShutdownPhase:
    return server.phase


def _report(server: GracefulServer) -> ShutdownReport | None:
    return server.report


# -- idle timeout -------------------------------------------------------------------------


async def test_idle_timeout_closes_with_fin_not_rst() -> None:
    """An idle connection is closed after idle_timeout: the client reads EOF, not a reset."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line)

    async with await start_server(handler, LOCALHOST, 0, idle_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - started >= 0.25
        writer.close()
        await wait_until(lambda: server.connections == 0, 5.0)


async def test_idle_timeout_waits_for_an_unfinished_request() -> None:
    """Bytes of an unfinished request keep a connection from the idle close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.8)  # the handler is slow to read what is buffered
        line = await reader.readline()
        writer.write(b"got " + line)

    async with await start_server(handler, LOCALHOST, 0, idle_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
        writer.write(b"request\n")
        data = await asyncio.wait_for(reader.read(), 5)
        assert data == b"got request\n"
        writer.close()


async def test_idle_timeout_closes_a_request_that_stopped_halfway() -> None:
    """A request that stops arriving halfway (slowloris) is closed after idle_timeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # never completes: the line has no end

    async with await start_server(handler, LOCALHOST, 0, idle_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
        writer.write(b"GET /slowlo")
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # our FIN
        assert asyncio.get_running_loop().time() - started >= 0.3 - 0.05
        writer.close()


async def test_idle_timeout_spares_a_busy_handler() -> None:
    """A handler working on a request longer than idle_timeout is not cut off."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            await asyncio.sleep(0.6)  # no traffic either way while it works
            writer.write(b"done " + line)

    async with await start_server(handler, LOCALHOST, 0, idle_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
        writer.write(b"slow\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"done slow\n"
        # Then idle for real: closed with a FIN.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_idle_watch_releases_closed_connections() -> None:
    """With idle_timeout set, a closed stream connection leaves no record or writer alive."""
    from aiograceful._linger import Linger

    def live_lingers() -> int:
        for _ in range(3):
            gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, Linger))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    before = live_lingers()
    async with await start_server(handler, LOCALHOST, 0, idle_timeout=5) as server:
        for _ in range(10):
            _reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
            writer.write_eof()
            await _reader.read()
            writer.close()
        await wait_until(lambda: server.connections == 0, 5.0)
    assert live_lingers() == before


async def test_idle_timeout_protocol_uses_kernel_activity() -> None:
    """A protocol connection with traffic is not idle; once quiet, on_idle_timeout closes it."""

    class Echo(GracefulProtocol):
        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async with await create_server(Echo, LOCALHOST, 0, idle_timeout=0.4) as server:
        reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
        started = time.monotonic()
        for _ in range(8):  # 0.8 s of traffic, twice the idle timeout
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            await asyncio.sleep(0.1)
        assert time.monotonic() - started >= 0.8
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_idle_timeout_spares_a_busy_unix_protocol_connection(
    tmp_path: pathlib.Path,
) -> None:
    """A Unix socket has no TCP_INFO: idle_timeout never closes a busy protocol connection."""

    class Echo(GracefulProtocol):
        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    path = str(tmp_path / "echo.sock")
    server = await aiograceful.create_unix_server(Echo, path, idle_timeout=0.3)
    async with server:
        reader, writer = await asyncio.open_unix_connection(path)
        for i in range(10):  # 1 s of pings, 0.1 s apart: never 0.3 s without traffic
            writer.write(b"ping %d\n" % i)
            assert await asyncio.wait_for(reader.readline(), 2) == b"ping %d\n" % i
            await asyncio.sleep(0.1)
        writer.close()


# -- the quiet window after the notice ----------------------------------------------------


async def _line_keepalive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive line server: one answer per line, until the client closes."""
    while line := await reader.readline():
        writer.write(b"echo " + line)
        await writer.drain()


def _idle_after_one_answer(port: int, within: float) -> tuple[bytes, float | None]:
    """Send one line, read its answer, then idle: return the answer and when EOF came (or None)."""
    with socket.create_connection((LOCALHOST, port), timeout=within) as sock:
        sock.sendall(b"ping\n")
        answer = sock.recv(4096)
        began = time.monotonic()
        try:
            while sock.recv(4096):
                pass
        except TimeoutError:
            return answer, None
        return answer, time.monotonic() - began


@pytest.mark.parametrize("graceful", [False, True], ids=["asyncio", "aiograceful"])
async def test_shutdown_idle_keepalive_connection_gets_fin_after_quiet_window(
    graceful: bool,
) -> None:
    """At shutdown an idle keep-alive client gets its FIN within 2 s (asyncio's never gets one)."""
    writers: list[asyncio.StreamWriter] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await _line_keepalive(reader, writer)

    if not graceful:
        stock = await asyncio.start_server(handler, LOCALHOST, 0)
        client = asyncio.to_thread(_idle_after_one_answer, port_of(stock), 3.0)
        waiting = asyncio.ensure_future(client)
        await wait_until(lambda: bool(writers), 5.0)
        await asyncio.sleep(0.2)  # the answer is read; the client idles
        stock.close()  # the stock close leaves the idle connection to its handler
        answer, fin_after = await waiting
        for writer in writers:
            writer.close()
            await writer.wait_closed()
        assert answer == b"echo ping\n"
        assert fin_after is None, "asyncio's Server.close() ended an idle connection"
        return
    server = await aiograceful.start_server(handler, LOCALHOST, 0, grace=10)
    waiting = asyncio.ensure_future(asyncio.to_thread(_idle_after_one_answer, port_of(server), 3.0))
    await wait_until(lambda: bool(writers), 5.0)
    await asyncio.sleep(0.2)
    shutdown = asyncio.ensure_future(server.shutdown())
    answer, fin_after = await waiting
    report = await asyncio.wait_for(shutdown, 10)
    assert answer == b"echo ping\n"
    assert fin_after is not None
    assert fin_after < 2.0, f"FIN {fin_after:.2f} s after the answer"
    assert report.duration < 3.0, report
    assert report.outcomes == {CloseOutcome.CLEAN: 1}, report
    assert server.stats.phase is aiograceful.ShutdownPhase.DONE


async def test_shutdown_request_in_quiet_window_is_answered() -> None:
    """A request that arrives in the quiet window after the notice is answered before the close."""
    server = await aiograceful.start_server(_line_keepalive, LOCALHOST, 0, grace=10)
    reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    writer.write(b"one\n")
    assert await reader.readline() == b"echo one\n"
    shutdown = asyncio.ensure_future(server.shutdown())
    await asyncio.sleep(0.3)  # inside the quiet window
    writer.write(b"two\n")
    assert await reader.readline() == b"echo two\n"
    assert await reader.read() == b""  # then the server's FIN
    writer.close()
    await writer.wait_closed()
    report = await asyncio.wait_for(shutdown, 10)
    assert report.outcomes == {CloseOutcome.CLEAN: 1}, report
    assert report.forced == 0


# -- SIGTERM ------------------------------------------------------------------------------

SERVER_SCRIPT = r"""
import asyncio, sys
import aiograceful

class Bye(aiograceful.GracefulProtocol):
    def on_shutdown_notice(self):
        self.transport.write(b"BYE\n")

async def main():
    server = await aiograceful.create_server(Bye, "127.0.0.1", 0, grace=5)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
    print("exited", flush=True)

asyncio.run(main())
"""


async def test_sigterm_notifies_clients_and_exits() -> None:
    """SIGTERM to a server process: connected clients get the notice, and the process exits 0."""
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER_SCRIPT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        reader, writer = await asyncio.open_connection(LOCALHOST, port)
        writer.write(b"hello")
        await writer.drain()
        await asyncio.sleep(0.1)
        proc.terminate()
        assert await asyncio.wait_for(reader.readline(), 10) == b"BYE\n"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert (await proc.stdout.read()).strip() == b"exited"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- bad arguments ------------------------------------------------------------------------


async def _noop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    return None


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"grace": -1}, ValueError, "grace"),
        ({"grace": math.nan}, ValueError, "grace"),
        ({"grace": "10"}, TypeError, "grace"),
        ({"force_timeout": -0.5}, ValueError, "force_timeout"),
        ({"linger_timeout": math.inf}, ValueError, "linger_timeout"),
        ({"linger_idle_timeout": -1}, ValueError, "linger_idle_timeout"),
        ({"max_discard": -1}, ValueError, "max_discard"),
        ({"max_connections": 0}, ValueError, "max_connections"),
        ({"max_connections": 1.5}, TypeError, "max_connections"),
        ({"on_reject": 3}, TypeError, "on_reject"),
        ({"on_notice": "x"}, TypeError, "on_notice"),
        ({"idle_timeout": 0}, ValueError, "idle_timeout"),
        ({"backlog": -2}, ValueError, "backlog"),
    ],
)
async def test_start_server_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], name: str
) -> None:
    """Bad options raise TypeError/ValueError naming the argument, before binding anything."""
    with pytest.raises(error, match=name):
        await start_server(_noop, LOCALHOST, 0, **kwargs)  # type: ignore[arg-type]


async def test_create_server_rejects_non_graceful_factories() -> None:
    """create_server needs a callable; shutdown's grace is checked too."""
    with pytest.raises(TypeError, match="protocol_factory"):
        await create_server(42, LOCALHOST, 0)  # type: ignore[arg-type]
    server = await create_server(ByeProtocol, LOCALHOST, 0)
    with pytest.raises(ValueError, match="grace"):
        await server.shutdown(grace=-1)
    await server.shutdown()


def read_somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


async def test_default_backlog_is_bounded_by_somaxconn() -> None:
    """The listen backlog defaults to 2048, bounded by somaxconn (seen via TCP_INFO)."""
    somaxconn = read_somaxconn()
    async with await create_server(ByeProtocol, LOCALHOST, 0) as server:
        stats = server.accept_queue()
        assert stats is not None
        assert stats.backlog == min(aiograceful.DEFAULT_BACKLOG, somaxconn)
        assert stats.depth == 0
        assert stats.overflows is None or stats.overflows >= 0


def test_tcp_info_layout_matches_the_kernel() -> None:
    """The TCP_INFO offsets used for the accept queue read a listening socket's backlog."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        sock.listen(37)
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        unacked, sacked = struct.unpack_from("II", raw, 8 + 4 * 4)
    assert (unacked, sacked) == (0, 37)


# -- the quiet window never cuts what is still moving ----------------------------------


async def _echo_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(b"ANS " + line)
        await writer.drain()


async def _upload_count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads ``SIZE\\n`` then SIZE bytes in read(n) calls, answers ``GOT n``, then the next."""
    while head := await reader.readline():
        size, got = int(head), 0
        while got < size:
            chunk = await reader.read(65536)
            if not chunk:
                return
            got += len(chunk)
        writer.write(b"GOT %d\n" % got)
        await writer.drain()


def _trickle(port: int, payload: bytes, gap: float, start: float) -> bytes:
    """Send ``payload`` a byte every ``gap`` s, starting ``start`` s from now; read the answer."""
    with socket.create_connection((LOCALHOST, port), timeout=20) as sock:
        time.sleep(start)
        for i in range(len(payload)):
            sock.sendall(payload[i : i + 1])
            time.sleep(gap)
        return sock.recv(4096)


async def test_start_server_request_trickling_in_after_the_notice_is_answered() -> None:
    """A request arriving a byte every 0.3 s through several quiet windows (6 s) is answered."""
    server = await aiograceful.start_server(_echo_lines, LOCALHOST, 0, grace=20)
    client = asyncio.ensure_future(
        asyncio.to_thread(_trickle, port_of(server), b"a slow, slow request\n", 0.3, 0.2)
    )
    await asyncio.sleep(0.1)
    report = await asyncio.wait_for(server.shutdown(), 30)
    assert await client == b"ANS a slow, slow request\n"
    assert report.forced == 0, report


async def test_start_server_upload_mid_body_at_the_notice_is_answered() -> None:
    """A body read with read(n) while it arrives slowly, across quiet windows, is read whole."""
    server = await aiograceful.start_server(_upload_count, LOCALHOST, 0, grace=20)

    def upload() -> bytes:
        with socket.create_connection((LOCALHOST, port_of(server)), timeout=20) as sock:
            sock.sendall(b"6000\n")
            for _ in range(12):  # 500 B every 0.4 s: 4.8 s, past four quiet windows
                sock.sendall(b"u" * 500)
                time.sleep(0.4)
            return sock.recv(4096)

    client = asyncio.ensure_future(asyncio.to_thread(upload))
    await asyncio.sleep(0.3)
    report = await asyncio.wait_for(server.shutdown(), 30)
    assert await client == b"GOT 6000\n"
    assert report.forced == 0, report


async def test_start_server_connection_in_steady_use_loses_no_request() -> None:
    """A client sending a request every 0.25 s through the shutdown gets every answer, then a FIN
    once it stops."""
    server = await aiograceful.start_server(_echo_lines, LOCALHOST, 0, grace=20)

    def pingpong() -> tuple[int, int]:
        answered = lost = 0
        with socket.create_connection((LOCALHOST, port_of(server)), timeout=10) as sock:
            for i in range(20):  # 5 s: past several quiet windows
                sock.sendall(b"ping %d\n" % i)
                if sock.recv(4096).startswith(b"ANS"):
                    answered += 1
                else:
                    lost += 1
                    break
                time.sleep(0.25)
        return answered, lost

    client = asyncio.ensure_future(asyncio.to_thread(pingpong))
    await asyncio.sleep(0.3)
    shutdown = asyncio.ensure_future(server.shutdown())
    assert await client == (20, 0)
    report = await asyncio.wait_for(shutdown, 30)
    assert report.forced == 0, report


async def test_create_server_default_notice_answers_a_request_on_the_wire() -> None:
    """A GracefulProtocol with the default notice closes by the quiet window: a request sent
    0.3 s after the notice is answered, not met by a FIN."""

    class Echo(GracefulProtocol):
        def data_received(self, data: bytes) -> None:
            self.transport.write(b"ANS " + data)

    server = await create_server(Echo, LOCALHOST, 0, grace=20)
    reader, writer = await asyncio.open_connection(LOCALHOST, port_of(server))
    shutdown = asyncio.ensure_future(server.shutdown())
    await asyncio.sleep(0.3)
    writer.write(b"late\n")
    assert await asyncio.wait_for(reader.read(100), 5) == b"ANS late\n"
    assert await asyncio.wait_for(reader.read(100), 5) == b""  # then the quiet window's close
    writer.close()
    await writer.wait_closed()
    report = await asyncio.wait_for(shutdown, 30)
    assert report.forced == 0, report
    assert report.duration < 5.0, report
