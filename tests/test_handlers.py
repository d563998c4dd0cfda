"""The stream server's handler tasks: none is left pending when the shutdown returns."""

from __future__ import annotations

import asyncio
import socket

from _faults import reset_socket
from _util import paced_read

from aiograceful import CloseOutcome, CloseResult, graceful_close, start_server

HOST = "127.0.0.1"


async def test_shutdown_cancels_a_handler_that_outlives_its_connection() -> None:
    """A handler still working after its peer reset the connection is cancelled by the shutdown.

    Its connection already has its result, so neither the grace period nor
    the force waits for it; yet the task is the server's, and leaving it
    pending would leave work running after ``shutdown()`` returned (and a
    "Task was destroyed but it is pending" at the loop's close).
    """
    got_reset = asyncio.Event()
    cancelled = asyncio.Event()
    handler_tasks: list[asyncio.Task[object]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handler_tasks.append(task)
        try:
            await reader.read()
        except ConnectionResetError:
            pass
        got_reset.set()
        try:
            await asyncio.sleep(30)  # "background work" after the connection is gone
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await start_server(handler, HOST, 0, grace=0.2, force_timeout=0.2)
    port = server.sockets[0].getsockname()[1]
    peer = await asyncio.to_thread(socket.create_connection, (HOST, port), 5)
    peer.sendall(b"hello")
    await asyncio.sleep(0.05)
    reset_socket(peer)
    await asyncio.wait_for(got_reset.wait(), 5)

    report = await asyncio.wait_for(server.shutdown(), 10)

    assert cancelled.is_set(), "the handler was left running after shutdown() returned"
    assert handler_tasks
    assert handler_tasks[0].done()
    # The connection had ended before the shutdown began: it is not in the report.
    assert report.connections == 0
    assert server.stats.outcomes.get(CloseOutcome.PEER_RESET) == 1


async def test_force_lets_a_handlers_own_close_finish_its_download() -> None:
    """At the end of grace, a handler awaiting its own graceful_close is not cancelled.

    The force bounds that close by ``force_timeout`` instead. Cancelling the
    handler would end its close as ABORTED (the kernel still sends what it
    holds, but the report and the handler are told the close failed, and the
    shutdown stops waiting for it). A client reading 6 MiB at 4 MiB/s gets
    every byte, and the handler's close is CLEAN.
    """
    size = 6 * 1024 * 1024
    results: list[CloseResult] = []
    closing = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(bytes(size))
        closing.set()
        results.append(await graceful_close(writer))

    server = await start_server(handler, HOST, 0, grace=0.3, force_timeout=10.0)
    port = server.sockets[0].getsockname()[1]
    client = asyncio.ensure_future(asyncio.to_thread(paced_read, port, b"GET\n", 4 * 1024 * 1024))
    await asyncio.wait_for(closing.wait(), 5)
    report = await asyncio.wait_for(server.shutdown(), 15)
    got, end = await asyncio.wait_for(client, 15)

    assert (got, end) == (size, "FIN")
    assert [r.outcome for r in results] == [CloseOutcome.CLEAN]
    assert results[0].unacked == 0
    assert report.connections == 1
    assert report.forced == 1  # still open when the grace period ran out
    assert report.outcomes == {CloseOutcome.CLEAN: 1}
