"""``python -m aiograceful demo``: every hazard on loopback, closed naively, then gracefully.

Theory of operation: a *case* is one hazard (H1..H7 of the design), one event
loop and one way of closing ("naive": what real servers do, named in each row:
``writer.close()``, ``Server.close()``, ``transport.abort()``, a close timer as
sanic's, a plain restart; "aiograceful": the library). Each case starts its own
server on 127.0.0.1 on a fresh loop, runs ``rounds`` rounds of real clients
against it (stdlib ``http.client`` and raw sockets in threads, asyncio streams
on the loop), and counts what the clients saw, in the case's own unit (replies,
bytes, aborts, connections), and whether each connection ended with a FIN
(``recv`` returned ``b""``) or a RST (``ConnectionResetError`` /
``BrokenPipeError``). H7 runs real server processes instead, restarted under
load (``restart``). The drop-in rows run stock uvicorn, hypercorn and aiohttp
(the naive side) and aiograceful's drop-ins in subprocesses (:func:`serve_main`,
with a tiny app of this module's own) for the early 413 (H1) and the shutdown
race (H3). Nothing in the table is written in; every number comes from the run.

Every wait is bounded: each client socket operation by :data:`CLIENT_TIMEOUT`,
each case by :data:`CASE_BUDGET`. A case that runs out of time is reported as
such and counts as a failure of the close it was testing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import importlib.util
import os
import platform
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from .. import abort, graceful_close

__all__ = [
    "CASES",
    "LOOP_NAMES",
    "SERVERS",
    "Case",
    "Row",
    "ServerPool",
    "Tally",
    "available_loops",
    "installed_servers",
    "run_demo",
    "serve_main",
    "server_cases",
]

End = Literal["FIN", "RST", "open"]
Close = Literal["naive", "aiograceful"]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

NAIVE: Final = "naive"
GRACEFUL: Final = "aiograceful"
_CLOSES: Final[tuple[Close, Close]] = (NAIVE, GRACEFUL)
LOOP_NAMES: Final = ("asyncio", "uvloop")

#: Bound on every blocking client socket operation and every client read, in seconds.
CLIENT_TIMEOUT: Final = 5.0
#: Bound on one case (all its rounds), in seconds.
CASE_BUDGET: Final = 25.0
#: Linger options for aiograceful's closes in the demo: shorter than the
#: defaults, so that a misbehaving case ends quickly; no client here needs more.
LINGER: Final[dict[str, Any]] = {"timeout": 5.0, "idle_timeout": 2.0}

_HOST: Final = "127.0.0.1"


# -- what the clients saw ------------------------------------------------------


@dataclasses.dataclass
class Tally:
    """What the clients of one case saw."""

    #: Replies (or final messages, or aborts) that reached their reader.
    delivered: int = 0
    #: Replies that were sent, or were due, and never reached their reader.
    lost: int = 0
    #: Connections whose end the client saw as a FIN (``recv`` returned ``b""``).
    fin: int = 0
    #: Connections whose end the client saw as a reset.
    rst: int = 0
    #: Connections still open when the client's bound ran out.
    open: int = 0
    #: Of ``lost`` (in connections), the connects refused (H7: while no process listens).
    refused: int = 0
    #: What the losses were, where a case can tell (printed when aiograceful loses).
    detail: str = ""
    #: A measured fact the row prints after its verdict (H7: the successor's start delay).
    note: str = ""

    def count(self, delivered: bool, end: End | None = None) -> None:
        """Count one reply, and (if given) how its connection ended."""
        if delivered:
            self.delivered += 1
        else:
            self.lost += 1
        if end is not None:
            self.ended(end)

    def ended(self, end: End) -> None:
        """Count how one connection ended."""
        if end == "FIN":
            self.fin += 1
        elif end == "RST":
            self.rst += 1
        else:
            self.open += 1


@dataclasses.dataclass(frozen=True)
class Case:
    """One hazard, with a runner per close."""

    hazard: str
    title: str
    #: What counts as delivered, for the legend.
    delivered: str
    run: Callable[[Close, int], Awaitable[Tally]]
    #: What the row counts: "replies", "bytes", "aborts".
    unit: str = "replies"
    #: The naive side, as the output names it: what real servers do.
    naive: str = ""
    #: The aiograceful side, as the output names it.
    graceful: str = ""
    #: False where the naive side is not expected to lose (a reference row).
    hazard_shown: bool = True
    #: The stock server a drop-in row runs in a subprocess, or "" (in-process, each loop).
    server: str = ""

    #: The case as the summary names it, when its hazard alone does not (``H6 timed``).
    short: str = ""

    @property
    def label(self) -> str:
        """The case as the summary names it: ``H1``, ``H1 uvicorn``, ``H6 timed``."""
        if self.server:
            return f"{self.hazard} {self.server}"
        return f"{self.hazard} {self.short}" if self.short else self.hazard


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table."""

    case: Case
    loop: str
    close: Close
    tally: Tally
    seconds: float
    #: Why the case did not finish (a timeout, an error), or "".
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when nothing was lost and no connection was left open."""
        return not self.error and self.tally.lost == 0 and self.tally.open == 0


# -- client helpers (blocking sockets, run in threads) --------------------------


def _read_to_end(
    sock: socket.socket, *, deadline: float | None = None, stop_at: bytes | None = None
) -> tuple[bytes, End | Literal["more"]]:
    """Read until the peer's FIN, a reset, or silence until ``deadline``.

    ``deadline`` (``time.monotonic()``) defaults to :data:`CLIENT_TIMEOUT` from
    now. With ``stop_at``, return ``"more"`` as soon as those bytes have arrived.
    """
    if deadline is None:
        deadline = time.monotonic() + CLIENT_TIMEOUT
    data = bytearray()
    while stop_at is None or stop_at not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(data), "open"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), "RST"
        except TimeoutError:
            return bytes(data), "open"
        if not chunk:
            return bytes(data), "FIN"
        data += chunk
    return bytes(data), "more"


def _end(sock: socket.socket) -> tuple[bytes, End]:
    """Read to the connection's end (FIN, RST, or open after :data:`CLIENT_TIMEOUT`)."""
    data, end = _read_to_end(sock)
    assert end != "more"
    return data, end


def _paced(size: int, chunk: int, pause: float) -> Callable[[], Iterator[bytes]]:
    """A body of ``size`` bytes sent ``chunk`` bytes at a time, ``pause`` seconds apart."""

    def chunks() -> Iterator[bytes]:
        block = b"f" * chunk
        for start in range(0, size, chunk):
            if start:
                time.sleep(pause)
            yield block[: size - start]

    chunks.size = size  # type: ignore[attr-defined]
    return chunks


def _http_request(
    port: int,
    method: str,
    body: bytes | Callable[[], Iterator[bytes]],
    *,
    connection_close: bool = False,
) -> tuple[int | None, End]:
    """Send one request with stdlib ``http.client``; return (status or None, how it ended).

    ``http.client`` sends the head, then the body, and reads the response only
    after the whole body is sent: what most HTTP clients do.
    """
    conn = http.client.HTTPConnection(_HOST, port, timeout=CLIENT_TIMEOUT)
    try:
        conn.connect()
    except OSError:
        return None, "RST"
    assert conn.sock is not None
    # A second descriptor for the same socket: http.client closes its own once
    # the response is read, and this one stays to see how the server ended the
    # connection (the connection itself lives until both are closed).
    watch = conn.sock.dup()
    try:
        try:
            headers = {"Content-Type": "text/plain"}
            if connection_close:
                headers["Connection"] = "close"
            if callable(body):
                # An iterable body: http.client sends each chunk as it comes.
                headers["Content-Length"] = str(body.size)  # type: ignore[attr-defined]
                conn.request(method, "/upload", body=body(), headers=headers)
            else:
                conn.request(method, "/upload", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
        except http.client.RemoteDisconnected:
            # Closed without a reply; a subclass of ConnectionResetError, but a FIN.
            return None, "FIN"
        except (ConnectionResetError, BrokenPipeError):
            # EPIPE on Linux means a RST already came in: a FIN alone never stops our sends.
            return None, "RST"
        except TimeoutError:
            return None, "open"
        except (OSError, http.client.HTTPException):
            return None, "RST"
        _, end = _end(watch)
        return response.status, end
    finally:
        conn.close()
        watch.close()


def _connect_to(port: int) -> socket.socket:
    return socket.create_connection((_HOST, port), timeout=CLIENT_TIMEOUT)


# -- server helpers ---------------------------------------------------------------


class _Handlers:
    """Runs stream handlers for a naive ``asyncio.start_server`` and keeps their tasks.

    A case waits for every handler before it ends, so that every server-side
    close is finished (and counted) before the numbers are read. A client that
    resets the connection makes a handler's read or write fail: that is the
    client's business here, not an error of the demo, so ``OSError`` and
    ``IncompleteReadError`` end the handler quietly.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        #: The server they run under, once it is started.
        self.server: asyncio.Server | None = None

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.add(writer)
        try:
            await self.handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, RuntimeError):
            writer.close()
        finally:
            self.writers.discard(writer)
            self.tasks.discard(task)

    async def wait(self, timeout: float = CLIENT_TIMEOUT * 2) -> None:
        """Wait for every handler, at most ``timeout``; then reset what is left."""
        deadline = time.monotonic() + timeout
        while self.tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self.tasks), timeout=deadline - time.monotonic())
        for writer in list(self.writers):
            abort(writer)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1.0)


@contextlib.asynccontextmanager
async def _naive_server(handler: Handler, **kwargs: Any) -> AsyncIterator[tuple[int, _Handlers]]:
    """A plain ``asyncio.start_server`` on loopback; yields (port, handlers)."""
    handlers = _Handlers(handler)
    server = await asyncio.start_server(handlers, _HOST, 0, **kwargs)
    handlers.server = server
    try:
        yield server.sockets[0].getsockname()[1], handlers
    finally:
        server.close()
        await handlers.wait()
        await server.wait_closed()


async def _close(writer: asyncio.StreamWriter, close: Close) -> None:
    """End a server's side of a connection: ``writer.close()``, or ``graceful_close``."""
    if close == GRACEFUL:
        await graceful_close(writer, **LINGER)
        return
    # The close of a typical asyncio server. With the request's rest still
    # unread in the socket, Linux answers close() with a RST, not a FIN.
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


# -- H1: an early 413 while the client uploads -------------------------------------

_H1_LIMIT: Final = 64 * 1024
_H1_UPLOAD: Final = 4 * 1024 * 1024
_H1_REPLY: Final = (
    b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 25\r\nConnection: close\r\n\r\nthe body is over 64 KiB.\n"
)
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


async def _h1(close: Close, rounds: int) -> Tally:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        match = _CONTENT_LENGTH.search(head)
        if match is not None and int(match.group(1)) > _H1_LIMIT:
            # Answer before reading the body, as servers do: the body is
            # still arriving (and unread) when the connection is closed.
            writer.write(_H1_REPLY)
        else:  # pragma: no cover - the demo's client always sends too much
            writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await _close(writer, close)

    tally = Tally()
    body = b"u" * _H1_UPLOAD
    async with _naive_server(handler) as (port, _):
        for _ in range(rounds):
            status, end = await asyncio.to_thread(_http_request, port, "POST", body)
            tally.count(status == 413, end)
    return tally


# -- H2: a 503 at the connection limit ----------------------------------------------

_H2_LIMIT: Final = 1
_H2_CLIENTS: Final = 3
# The rejected clients upload a form: 256 KiB paced at 16 KiB per 2 ms, as
# over a link slower than loopback, so the upload is under way when the
# server's close lands (on loopback at full speed it is often already sent).
_H2_BODY: Final = 256 * 1024
_H2_PACE: Final = (16 * 1024, 0.002)
_H2_REPLY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\n"
    b"Content-Length: 29\r\nConnection: close\r\n\r\ntoo many connections, retry.\n"
)


async def _h2(close: Close, rounds: int) -> Tally:
    tally = Tally()

    async def occupy(port: int, count: Callable[[], int]) -> asyncio.StreamWriter:
        # One client holds the only slot for the whole case.
        _, writer = await asyncio.open_connection(_HOST, port)
        async with asyncio.timeout(CLIENT_TIMEOUT):
            while count() < _H2_LIMIT:  # noqa: ASYNC110 - polls a count, no event to wait on
                await asyncio.sleep(0.005)
        return writer

    async def rejected_clients(port: int) -> None:
        for _ in range(rounds):
            results = await asyncio.gather(
                *(
                    asyncio.to_thread(_http_request, port, "POST", _paced(_H2_BODY, *_H2_PACE))
                    for _ in range(_H2_CLIENTS)
                )
            )
            for status, end in results:
                tally.count(status == 503, end)

    if close == NAIVE:
        active = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal active
            if active >= _H2_LIMIT:
                # Rejected at once, before its request is read: a 503, then close().
                writer.write(_H2_REPLY)
                await _close(writer, NAIVE)
                return
            active += 1
            try:
                await reader.read()  # the occupant: hold the slot until its FIN
            finally:
                active -= 1
                writer.close()

        async with _naive_server(handler) as (port, _):
            holder = await occupy(port, lambda: active)
            await rejected_clients(port)
            holder.close()
        return tally

    from .. import start_server

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    def reject(transport: asyncio.BaseTransport) -> None:
        transport.write(_H2_REPLY)  # type: ignore[attr-defined]

    server = await start_server(
        hold, _HOST, 0, max_connections=_H2_LIMIT, on_reject=reject, grace=2.0, **_linger_kw()
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        holder = await occupy(port, lambda: server.connections)
        await rejected_clients(port)
        holder.close()
    return tally


def _linger_kw() -> dict[str, Any]:
    return {"linger_timeout": LINGER["timeout"], "linger_idle_timeout": LINGER["idle_timeout"]}


# -- H3: both sides end at once on a line protocol ------------------------------------

_H3_CLIENTS: Final = 4
_H3_WINDOW: Final = 8  # requests each client keeps outstanding (pipelined)
_H3_WARMUP: Final = 20  # answers each client gets before the server shuts down
_H3_MAX: Final = 100_000  # a bound on requests per connection
_BYE: Final = b"BYE\n"


async def _line_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The line server: answer ``REQ n`` with ``OK n`` until the peer's FIN."""
    while line := await reader.readline():
        if line.startswith(b"REQ "):
            writer.write(b"OK " + line[4:])
            await writer.drain()


@dataclasses.dataclass
class _LineClient:
    """An asyncio-streams client that keeps :data:`_H3_WINDOW` requests in flight.

    It stops sending when the server says BYE, or when the server's FIN
    arrives; after BYE it half-closes once every request it sent is answered,
    and reads until the server's FIN. Requests never answered are lost.
    """

    sent: int = 0
    answered: int = 0
    end: End = "open"
    warm: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def run(self, port: int) -> None:
        reader, writer = await asyncio.open_connection(_HOST, port)
        try:
            await self._talk(reader, writer)
        except (ConnectionResetError, BrokenPipeError):
            self.end = "RST"
        except TimeoutError:
            self.end = "open"
        finally:
            self.warm.set()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stopping = False
        eof_sent = False
        writer.write(b"".join(b"REQ %d\n" % i for i in range(_H3_WINDOW)))
        self.sent = _H3_WINDOW
        while True:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                line = await reader.readline()
            if not line:
                self.end = "FIN"
                return
            if line.startswith(b"OK "):
                self.answered += 1
                if self.answered >= _H3_WARMUP:
                    self.warm.set()
                if not stopping and self.sent < _H3_MAX and not writer.is_closing():
                    writer.write(b"REQ %d\n" % self.sent)
                    self.sent += 1
            elif line == _BYE:
                stopping = True
            if stopping and not eof_sent and self.answered == self.sent:
                writer.write_eof()
                eof_sent = True


async def _h3(close: Close, rounds: int) -> Tally:
    tally = Tally()
    for _ in range(rounds):
        clients = [_LineClient() for _ in range(_H3_CLIENTS)]
        if close == NAIVE:
            await _h3_naive_round(clients)
        else:
            await _h3_graceful_round(clients)
        for client in clients:
            tally.delivered += client.answered
            tally.lost += client.sent - client.answered
            tally.ended(client.end)
    return tally


async def _start_clients(port: int, clients: Sequence[_LineClient]) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(client.run(port)) for client in clients]
    async with asyncio.timeout(CLIENT_TIMEOUT):
        await asyncio.gather(*(client.warm.wait() for client in clients))
    return tasks


async def _answers_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """:func:`_line_answers`, until the server closes the connection under it."""
    while (line := await reader.readline()) and not writer.is_closing():
        if line.startswith(b"REQ "):
            writer.write(b"OK " + line[4:])
            await writer.drain()


async def _h3_naive_round(clients: Sequence[_LineClient]) -> None:
    async with _naive_server(_answers_until_closed) as (port, handlers):
        tasks = await _start_clients(port, clients)
        # A plain asyncio server's shutdown, as stock servers do it for their
        # keep-alive connections: Server.close(), then writer.close() on each
        # connection. What is in flight (requests the server has not read,
        # answers the client has not read) is lost, and with unread requests
        # in the socket Linux answers the close with a RST.
        server = handlers.server
        assert server is not None
        server.close()
        for writer in list(handlers.writers):
            writer.close()
        await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT * 2)


async def _h3_graceful_round(clients: Sequence[_LineClient]) -> None:
    from .. import start_server

    def notice(writer: asyncio.StreamWriter) -> None:
        writer.write(_BYE)

    server = await start_server(
        _line_answers, _HOST, 0, grace=CLIENT_TIMEOUT, on_notice=notice, **_linger_kw()
    )
    async with server:
        tasks = await _start_clients(server.sockets[0].getsockname()[1], clients)
        await server.shutdown()
        await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT * 2)


# -- H4: connections in the accept queue at shutdown -------------------------------------

_H4_CLIENTS: Final = 6
_H4_BACKLOG: Final = 16


def _queued_clients(port: int, connected: threading.Event) -> list[tuple[bytes, End]]:
    """Connect, send ``REQ 1``, say so; then read each connection to its end.

    On BYE a client half-closes: it has nothing more to ask. All the reads
    share one deadline.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(_H4_CLIENTS):
            sock = _connect_to(port)
            socks.append(sock)
            sock.sendall(b"REQ 1\n")
    except OSError:
        pass
    finally:
        connected.set()
    deadline = time.monotonic() + CLIENT_TIMEOUT
    results: list[tuple[bytes, End]] = []
    for sock in socks:
        with sock:
            results.append(_read_until_bye_then_end(sock, deadline))
    results.extend((b"", "RST") for _ in range(_H4_CLIENTS - len(socks)))
    return results


def _read_until_bye_then_end(sock: socket.socket, deadline: float) -> tuple[bytes, End]:
    data, end = _read_to_end(sock, deadline=deadline, stop_at=_BYE)
    if end != "more":
        return data, end
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    rest, last = _read_to_end(sock, deadline=deadline)
    assert last != "more"
    return data + rest, last


async def _h4(close: Close, rounds: int) -> Tally:
    tally = Tally()
    for _ in range(rounds):
        results = await (_h4_naive_round() if close == NAIVE else _h4_graceful_round())
        for data, end in results:
            tally.count(b"OK 1\n" in data, end)
    return tally


async def _busy_then(port: int, stop: Callable[[], None]) -> list[tuple[bytes, End]]:
    """Keep the loop busy while the clients connect, then call ``stop`` at once.

    While the loop does not run, the kernel completes the clients' handshakes
    and queues them (their connect() has returned) without an accept(). The
    shutdown then starts before the loop gets to accept them.
    """
    loop = asyncio.get_running_loop()
    connected = threading.Event()
    started: asyncio.Future[asyncio.Future[list[tuple[bytes, End]]]] = loop.create_future()

    def busy() -> None:
        clients = loop.run_in_executor(None, _queued_clients, port, connected)
        connected.wait(CLIENT_TIMEOUT)  # blocks the loop, on purpose
        stop()
        started.set_result(clients)

    loop.call_soon(busy)
    clients = await started
    return await asyncio.wait_for(clients, CLIENT_TIMEOUT * 3)


async def _h4_naive_round() -> list[tuple[bytes, End]]:
    handlers = _Handlers(_line_answers)
    server = await asyncio.start_server(handlers, _HOST, 0, backlog=_H4_BACKLOG)
    try:
        # asyncio.Server.close() (and uvloop's) closes the listening socket;
        # Linux resets every connection still in its accept queue.
        return await _busy_then(server.sockets[0].getsockname()[1], server.close)
    finally:
        server.close()
        await handlers.wait()
        await server.wait_closed()


async def _h4_graceful_round() -> list[tuple[bytes, End]]:
    from .. import start_server

    def notice(writer: asyncio.StreamWriter) -> None:
        writer.write(_BYE)

    server = await start_server(
        _line_answers,
        _HOST,
        0,
        backlog=_H4_BACKLOG,
        grace=CLIENT_TIMEOUT,
        on_notice=notice,
        **_linger_kw(),
    )
    shutdowns: list[asyncio.Future[Any]] = []

    def stop() -> None:
        shutdowns.append(asyncio.ensure_future(server.shutdown()))

    async with server:
        results = await _busy_then(server.sockets[0].getsockname()[1], stop)
        await asyncio.wait_for(asyncio.gather(*shutdowns), CLIENT_TIMEOUT * 2)
    return results


# -- H5: abort, and a final message exchanged at close --------------------------------------


def _hello_then_end(port: int) -> End:
    with _connect_to(port) as sock:
        sock.sendall(b"HELLO\n")
        _, end = _end(sock)
        return end


async def _h5_abort(close: Close, rounds: int) -> Tally:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # nothing is left unread, nothing unsent
        if close == NAIVE:
            # asyncio's and uvloop's abort(): a plain close(), so with empty
            # queues Linux sends a FIN and the peer cannot tell it from a clean end.
            writer.transport.abort()
        else:
            abort(writer)

    tally = Tally()
    async with _naive_server(handler) as (port, _):
        for _ in range(rounds):
            end = await asyncio.to_thread(_hello_then_end, port)
            tally.count(end == "RST", end)
    return tally


_H5_FINAL: Final = b"BYE served=1\n"
_H5_REPLY: Final = b"THANKS read=1\n"


def _final_exchange(port: int) -> tuple[bool, End]:
    """Read the server's final message to its FIN, then send ours and half-close."""
    with _connect_to(port) as sock:
        sock.sendall(b"HELLO\n")
        data, end = _end(sock)
        if end != "FIN":
            return False, end
        try:
            sock.sendall(_H5_REPLY)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            # ECONNRESET, EPIPE, or ENOTCONN from shutdown(): all say a RST came in.
            return False, "RST"
        _, end = _end(sock)
        return data == _H5_FINAL, end


async def _h5_final(close: Close, rounds: int) -> Tally:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        if close == NAIVE:
            # A final message, then close(): whatever the client answers
            # arrives at a closed socket.
            writer.write(_H5_FINAL)
            await _close(writer, NAIVE)
            received.append(b"")
        else:
            result = await graceful_close(writer, final=_H5_FINAL, keep_trailing=True, **LINGER)
            received.append(result.trailing)

    tally = Tally()
    async with _naive_server(handler) as (port, handlers):
        outcomes = [await asyncio.to_thread(_final_exchange, port) for _ in range(rounds)]
        await handlers.wait()
    for (client_got_final, end), server_got in zip(outcomes, received, strict=False):
        tally.count(client_got_final and server_got == _H5_REPLY, end)
    tally.lost += len(outcomes) - len(received)
    return tally


# -- H6: the send side of a close: a slow reader ------------------------------------------

# A download of 1 MiB, written at once, to a client that reads 4 MiB/s through
# a 64 KiB receive buffer: about 0.25 s. The server's send buffer is 64 KiB
# too, so most of the download waits in the transport's own buffer, as a large
# download's does on any link. Two naive closes: a plain writer.close(), which
# keeps sending what the transport holds (it delivers: no hazard, the
# reference), and the same close bounded by a timer that starts at the close
# and then aborts what is still buffered, as sanic does after its
# GRACEFUL_TCP_CLOSE_TIMEOUT (5 s by default; 0.1 s here, for a 0.25 s
# download). aiograceful bounds lack of progress only: its 0.1 s start once the
# client has acknowledged everything.
_H6_SIZE: Final = 1 << 20
_H6_RATE: Final = 4 << 20
_H6_SNDBUF: Final = 64 * 1024
_H6_BOUND: Final = 0.1
_H6_ROUNDS: Final = 2


def _slow_read(port: int) -> tuple[int, End]:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(CLIENT_TIMEOUT)
        sock.connect((_HOST, port))
        sock.sendall(b"GET\n")
        got = 0
        try:
            while chunk := sock.recv(16 * 1024):
                got += len(chunk)
                time.sleep(len(chunk) / _H6_RATE)
        except (ConnectionResetError, BrokenPipeError):
            return got, "RST"
        except TimeoutError:
            return got, "open"
        return got, "FIN"


async def _close_then_abort(writer: asyncio.StreamWriter, bound: float) -> None:
    """``writer.close()``, then ``transport.abort()`` if bytes are still buffered at ``bound``.

    sanic's close: it checks the transport every 0.1 s, and once its timer
    (counted from the close) runs out, aborts a transport still holding bytes.
    """
    transport = writer.transport
    writer.close()
    deadline = time.monotonic() + bound
    for _ in range(int(bound / 0.01) + 2):  # bounded by ``bound`` too
        if transport.get_write_buffer_size() == 0 or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.01)
    if transport.get_write_buffer_size():
        transport.abort()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _h6(timed: bool) -> Callable[[Close, int], Awaitable[Tally]]:
    async def run(close: Close, rounds: int) -> Tally:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _H6_SNDBUF)
            writer.write(b"d" * _H6_SIZE)
            if close == GRACEFUL:
                await graceful_close(writer, timeout=_H6_BOUND, idle_timeout=_H6_BOUND)
            elif timed:
                await _close_then_abort(writer, _H6_BOUND)
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        tally = Tally()
        async with _naive_server(handler) as (port, handlers):
            for _ in range(min(rounds, _H6_ROUNDS)):
                got, end = await asyncio.to_thread(_slow_read, port)
                # Counted in bytes: what the client read, and what it never got.
                tally.delivered += got
                tally.lost += _H6_SIZE - got
                tally.ended(end)
            await handlers.wait()
        return tally

    return run


# -- H7: a restart under load -------------------------------------------------------------


#: How long the successor process takes to listen (a real service's start).
_H7_START: Final = 1.0


async def _h7(close: Close, rounds: int) -> Tally:
    """A server process restarted under load: plainly (naive), or by handoff (aiograceful).

    One restart per row, whatever ``rounds`` says: the row's count is every
    request the 4 client threads made across it (see ``_restart``).
    """
    from .restart import restart_under_load

    loop = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    kind = "plain" if close == NAIVE else "handoff"
    # The new process takes a second to listen, as a real service's start
    # does, and longer than a client's first SYN retransmission: the old
    # process's shutdown drops the SYNs that come while it settles (close_and_drain),
    # and a successor up before the retransmission would answer those
    # clients, hiding the refusals a plain restart causes.
    result = await asyncio.to_thread(
        restart_under_load,
        kind,
        loop=loop,
        before=0.25,
        after=0.25,
        startup_delay=_H7_START,
        quiet=True,
    )
    if result.old_exit != 0 or result.new_exit != 0:
        raise RuntimeError(f"server exit codes {result.old_exit}, {result.new_exit}")
    failed = result.load.failed
    # Counted in connections (each request opens one): answered, or not, and why not.
    tally = Tally(delivered=result.load.ok, lost=result.load.failures)
    tally.refused = failed["ConnectionRefusedError"]
    tally.fin = result.load.ok  # every answer ended with the server's FIN
    tally.rst = failed["ConnectionResetError"] + failed["BrokenPipeError"]
    tally.open = failed["TimeoutError"]
    others = tally.lost - tally.refused - tally.rst - tally.open
    kinds = {"refused": tally.refused, "reset": tally.rst, "timed out": tally.open}
    tally.detail = ", ".join(
        [f"{count:,} {kind}" for kind, count in kinds.items() if count]
        + ([f"{others:,} other"] if others else [])
    )
    tally.note = f"the successor's start delay: {_H7_START:g} s"
    return tally


# -- stock servers and their drop-ins, in subprocesses --------------------------------------

#: The stock servers the demo knows, in the order it runs them.
SERVERS: Final = ("uvicorn", "hypercorn", "aiohttp")
#: Their drop-ins, as the output names them.
_DROPINS: Final = {
    "uvicorn": "aiograceful.uvicorn.run",
    "hypercorn": "aiograceful.hypercorn.serve",
    "aiohttp": "aiograceful.aiohttp.run_app",
}
_STOCK: Final = {
    "uvicorn": "uvicorn.run",
    "hypercorn": "hypercorn.asyncio.serve",
    "aiohttp": "aiohttp.web.run_app",
}
#: The grace each server's shutdown gets (uvicorn's timeout_graceful_shutdown,
#: hypercorn's graceful_timeout, aiohttp's shutdown_timeout).
_SERVER_GRACE: Final = 5
#: Bound on a server's start (the interpreter and the server's imports).
_SERVER_START: Final = 20.0
_RUNNING: Final = re.compile(rb"[Rr]unning on http://127\.0\.0\.1:(\d+)")


def installed_servers() -> list[str]:
    """The stock servers this Python can import, in :data:`SERVERS` order."""
    return [name for name in SERVERS if importlib.util.find_spec(name) is not None]


async def _asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The drop-in rows' application: ``POST`` gets an early 413 (the body unread), else 200."""
    if scope["type"] != "http":  # lifespan is off
        return
    status, body = (413, b"too large\n") if scope["method"] == "POST" else (200, b"ok\n")
    head = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def serve_main(argv: Sequence[str]) -> None:
    """A server subprocess: ``SERVER {stock,dropin} {asyncio,uvloop}`` on 127.0.0.1, port 0.

    Each logs ``Running on http://127.0.0.1:PORT``; SIGTERM starts its shutdown.
    """
    server, side, loop_name = argv
    dropin = side == "dropin"
    factory = available_loops()[loop_name]
    if server == "uvicorn":
        import uvicorn

        import aiograceful.uvicorn

        run = aiograceful.uvicorn.run if dropin else uvicorn.run
        run(
            _asgi_app,
            host=_HOST,
            port=0,
            http="h11",
            loop=loop_name,
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=_SERVER_GRACE,
        )
    elif server == "hypercorn":
        from hypercorn.asyncio import serve as stock_serve
        from hypercorn.config import Config

        from aiograceful.hypercorn import serve as dropin_serve

        config = Config()
        config.bind = [f"{_HOST}:0"]
        config.graceful_timeout = _SERVER_GRACE
        serve = dropin_serve if dropin else stock_serve
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(_asgi_app, config))  # type: ignore[arg-type]
    else:
        from aiohttp import web

        import aiograceful.aiohttp

        async def upload(request: web.Request) -> web.Response:
            return web.Response(status=413, text="too large\n")  # the body is not read

        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app = web.Application()
        app.add_routes([web.post("/upload", upload), web.get("/", ok)])
        sock = socket.socket()
        sock.bind((_HOST, 0))
        run_app = aiograceful.aiohttp.run_app if dropin else web.run_app
        run_app(app, sock=sock, shutdown_timeout=_SERVER_GRACE, loop=factory(), access_log=None)


class ServerPool:
    """The drop-in rows' server subprocesses: started together, each used by H1, then H3.

    ``start`` launches every process at once (their imports overlap: the rows
    wait less); ``port`` waits (bounded) for one to log its port; H3's SIGTERM
    ends it; ``close`` stops what is left (SIGTERM, then a kill).
    """

    def __init__(self, loop: str) -> None:
        self.loop = loop
        self._procs: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
        self._ports: dict[tuple[str, str], int] = {}

    def start(self, servers: Sequence[str]) -> None:
        """Launch a stock and a drop-in process for each of ``servers``."""
        for server in servers:
            for side in ("stock", "dropin"):
                self._launch(server, side)

    def _launch(self, server: str, side: str) -> subprocess.Popen[bytes]:
        key = (server, side)
        if key not in self._procs:
            package = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (package, os.environ.get("PYTHONPATH", "")) if p)
            code = "import sys; from aiograceful._tools.demo import serve_main; "
            code += "serve_main(sys.argv[1:])"
            self._procs[key] = subprocess.Popen(
                [sys.executable, "-c", code, server, side, self.loop],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"},
            )
        return self._procs[key]

    def port(self, server: str, side: str) -> tuple[subprocess.Popen[bytes], int]:
        """The process serving ``server`` ``side`` and its port, once it listens."""
        key = (server, side)
        proc = self._launch(server, side)
        if key in self._ports:
            return proc, self._ports[key]
        assert proc.stdout is not None
        output = bytearray()
        deadline = time.monotonic() + _SERVER_START
        match = None
        while match is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                tail = bytes(output[-300:]).decode(errors="replace")
                raise RuntimeError(f"{server} ({side}) did not start: {tail}")
            ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                output += os.read(proc.stdout.fileno(), 65536)
                match = _RUNNING.search(output)
        # Keep reading its output, so that a chatty server never blocks on the pipe.
        threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
        self._ports[key] = int(match.group(1))
        return proc, self._ports[key]

    def close(self) -> None:
        """Stop every process still running: SIGTERM, then a kill after the grace."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs.values():
            try:
                proc.wait(_SERVER_GRACE * 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(CLIENT_TIMEOUT)
        self._procs.clear()
        self._ports.clear()


def _drain(stream: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        for _ in range(1_000_000):  # bounded by the process's end (EOF)
            if not os.read(stream.fileno(), 65536):
                return


def _keepalive_client(
    port: int, until: float, go: threading.Event, tally: Tally, lock: threading.Lock
) -> None:
    """GET / back to back on one keep-alive connection; a new one after ``Connection: close``.

    A request written on an open connection that gets no full answer is lost; a
    refused connect ends the client (the server has gone), with nothing sent.
    """
    answered = lost = 0
    end: End | None = None
    conn: http.client.HTTPConnection | None = None
    go.wait(CLIENT_TIMEOUT)
    try:
        for _ in range(1_000_000):  # bounded by ``until`` too
            if time.monotonic() >= until:
                break
            if conn is None:
                conn = http.client.HTTPConnection(_HOST, port, timeout=CLIENT_TIMEOUT)
                try:
                    conn.connect()
                except OSError:
                    break
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
            except http.client.RemoteDisconnected:
                lost, end = lost + 1, "FIN"
                break
            except (ConnectionResetError, BrokenPipeError):
                lost, end = lost + 1, "RST"
                break
            except TimeoutError:
                lost, end = lost + 1, "open"
                break
            except (OSError, http.client.HTTPException):
                lost, end = lost + 1, "RST"
                break
            answered += 1
            if response.will_close:
                conn.close()
                conn = None
                end = "FIN"
    finally:
        if conn is not None:
            conn.close()
        with lock:
            tally.delivered += answered
            tally.lost += lost
            if end is not None:
                tally.ended(end)


#: Rounds of the drop-in rows' early 413, whatever ``--rounds`` says, and each upload's size:
#: 16 MiB, far more than loopback's buffers hold, as in the drop-in tests.
_SERVER_H1_ROUNDS: Final = 5
_SERVER_H1_UPLOAD: Final = 16 << 20
#: Keep-alive clients in the drop-in rows' shutdown race, and how long they send before SIGTERM.
_RACE_CLIENTS: Final = 8
_RACE_BEFORE: Final = 0.3


def _server_h1(pool: ServerPool, server: str) -> Callable[[Close, int], Awaitable[Tally]]:
    """H1 against a server subprocess: http.client uploads 4 MiB with ``Connection: close``."""

    def clients(close: Close, rounds: int) -> Tally:
        tally = Tally()
        body = b"u" * _SERVER_H1_UPLOAD
        _, port = pool.port(server, "stock" if close == NAIVE else "dropin")
        for _ in range(_SERVER_H1_ROUNDS):
            status, end = _http_request(port, "POST", body, connection_close=True)
            tally.count(status == 413, end)
        return tally

    async def run(close: Close, rounds: int) -> Tally:
        return await asyncio.to_thread(clients, close, rounds)

    return run


def _server_h3(pool: ServerPool, server: str) -> Callable[[Close, int], Awaitable[Tally]]:
    """H3 against a server subprocess: keep-alive clients sending back to back at SIGTERM."""

    def clients(close: Close) -> Tally:
        tally = Tally()
        lock = threading.Lock()
        go = threading.Event()
        proc, port = pool.port(server, "stock" if close == NAIVE else "dropin")
        until = time.monotonic() + _RACE_BEFORE + _SERVER_GRACE + CLIENT_TIMEOUT
        threads = [
            threading.Thread(
                target=_keepalive_client, args=(port, until, go, tally, lock), daemon=True
            )
            for _ in range(_RACE_CLIENTS)
        ]
        for thread in threads:
            thread.start()
        go.set()
        time.sleep(_RACE_BEFORE)
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(_SERVER_GRACE + CLIENT_TIMEOUT * 2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_SERVER_GRACE * 2)
        return tally

    async def run(close: Close, rounds: int) -> Tally:
        return await asyncio.to_thread(clients, close)

    return run


CASES: Final[tuple[Case, ...]] = (
    Case(
        "H1",
        "early 413 during an upload",
        "the 413 reply read by http.client (a 4 MiB upload)",
        _h1,
        naive="413, writer.close()",
        graceful="413, graceful_close()",
    ),
    Case(
        "H2",
        "503 at the connection limit",
        "the 503 reply read by http.client (a 256 KiB form)",
        _h2,
        naive="503, writer.close()",
        graceful="start_server(max_connections=1)",
    ),
    Case(
        "H3",
        "shutdown, clients pipelining",
        "an answer to every request sent before the end (4 clients, 8 in flight each)",
        _h3,
        naive="Server.close(), writer.close()",
        graceful="GracefulServer.shutdown()",
    ),
    Case(
        "H4",
        "accept queue at shutdown",
        "the answer to a queued connection's request",
        _h4,
        naive="Server.close()",
        graceful="GracefulServer.shutdown()",
    ),
    Case(
        "H5",
        "abort()",
        "an abort the peer sees as a RST",
        _h5_abort,
        unit="aborts",
        naive="transport.abort()",
        short="abort",
        graceful="aiograceful.abort()",
    ),
    Case(
        "H5",
        "final message at close",
        "the server's last message and the client's reply, both read",
        _h5_final,
        naive="write BYE, writer.close()",
        short="final",
        graceful="graceful_close(final=)",
    ),
    Case(
        "H6",
        "slow reader, plain close",
        f"the bytes of a 1 MiB download a client reading 4 MiB/s read ({_H6_ROUNDS} rounds); "
        "the plain\n"
        "    close keeps sending what the transport holds: the reference, no hazard",
        _h6(timed=False),
        unit="bytes",
        naive="writer.close()",
        short="plain",
        graceful="graceful_close(timeout=0.1)",
        hazard_shown=False,
    ),
    Case(
        "H6",
        "slow reader, close timed from the close (sanic)",
        "the same download; the naive close aborts what the transport still holds\n"
        f"    {_H6_BOUND:g} s after the close, as sanic does after GRACEFUL_TCP_CLOSE_TIMEOUT "
        "(5 s by default);\n    aiograceful's timeout=0.1 starts once the client has everything",
        _h6(timed=True),
        unit="bytes",
        naive=f"writer.close(), abort at {_H6_BOUND:g} s",
        short="timed",
        graceful="graceful_close(timeout=0.1)",
    ),
    Case(
        "H7",
        "restart under load",
        "a connection (one request each, 4 client threads) answered across one restart;\n"
        "    refused: a connect refused while no process listens (a refused client retries "
        "after 1 ms)",
        _h7,
        unit="connections",
        naive="SIGTERM, successor binds",
        graceful="handoff=PATH",
    ),
)


def server_cases(servers: Sequence[str], pool: ServerPool) -> tuple[Case, ...]:
    """The drop-in rows: each server in ``servers`` stock (naive) and as aiograceful's drop-in."""
    cases: list[Case] = []
    for server in servers:
        cases.append(
            Case(
                "H1",
                "early 413 during an upload",
                f"the 413 read by http.client, uploading 16 MiB with Connection: close "
                f"({_SERVER_H1_ROUNDS} rounds);\n"
                "    stock aiohttp reads an unread body away before it closes (its lingering_time):"
                " no hazard there",
                _server_h1(pool, server),
                naive=f"stock {server}",
                graceful=_DROPINS[server],
                # aiohttp reads an unread body away before it closes (its lingering_time).
                hazard_shown=server != "aiohttp",
                server=server,
            )
        )
        cases.append(
            Case(
                "H3",
                "shutdown, keep-alive clients",
                f"an answer to every request sent on an open connection; {_RACE_CLIENTS} "
                f"keep-alive clients,\n    SIGTERM {_RACE_BEFORE:g} s in",
                _server_h3(pool, server),
                naive=f"stock {server}",
                graceful=_DROPINS[server],
                server=server,
            )
        )
    return tuple(cases)


# -- running and printing ---------------------------------------------------------------------


def available_loops() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loops this Python can run: asyncio's always, uvloop when it is installed."""
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.SelectorEventLoop
    }
    try:
        import uvloop
    except ImportError:
        return loops
    loops["uvloop"] = uvloop.new_event_loop
    return loops


def _run_case(
    case: Case,
    loop_name: str,
    factory: Callable[[], asyncio.AbstractEventLoop],
    close: Close,
    rounds: int,
) -> Row:
    errors: list[str] = []

    def on_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(str(context.get("exception") or context.get("message")))

    async def main() -> Tally:
        asyncio.get_running_loop().set_exception_handler(on_error)
        async with asyncio.timeout(CASE_BUDGET):
            return await case.run(close, rounds)

    started = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            tally = runner.run(main())
    except TimeoutError:
        return Row(case, loop_name, close, Tally(), time.monotonic() - started, "timed out")
    except Exception as exc:  # the demo reports a broken case and goes on
        return Row(case, loop_name, close, Tally(), time.monotonic() - started, repr(exc))
    error = f"loop errors: {errors[0]}" if errors and close == GRACEFUL else ""
    return Row(case, loop_name, close, tally, time.monotonic() - started, error)


def run_demo(
    loops: Sequence[str],
    rounds: int,
    *,
    servers: Sequence[str] = (),
    skipped: Sequence[str] = (),
    out: Callable[[str], None] = print,
) -> list[Row]:
    """Run every case on each loop in ``loops``, then the drop-in rows, printing as it goes.

    The drop-in rows (``servers``: stock uvicorn, hypercorn, aiohttp against
    aiograceful's drop-ins, in subprocesses) run on the last of ``loops``;
    ``skipped`` names servers asked for but not installed, each given a note line.
    """
    factories = available_loops()
    out(_header(loops, rounds))
    out(_format_head())
    rows: list[Row] = []
    for case in CASES:
        out(_case_head(case))
        for loop_name in loops:
            for close in _CLOSES:
                row = _run_case(case, loop_name, factories[loop_name], close, rounds)
                rows.append(row)
                out(_format_row(row))
    if servers or skipped:
        loop_name = loops[-1]
        out("")
        out(
            f"Stock servers (the naive side) and aiograceful's drop-ins, each a subprocess on "
            f"127.0.0.1, {loop_name}:"
        )
        for name in skipped:
            out(f"note: {name} is not installed: its rows are skipped.")
        pool = ServerPool(loop_name)
        try:
            pool.start(servers)
            for case in server_cases(servers, pool):
                out(_case_head(case))
                for close in _CLOSES:
                    row = _run_case(case, loop_name, factories[loop_name], close, rounds)
                    rows.append(row)
                    out(_format_row(row))
        finally:
            pool.close()
    out("")
    out(_legend(servers))
    return rows


def _header(loops: Sequence[str], rounds: int) -> str:
    return (
        f"aiograceful demo: {rounds} round(s) per case on 127.0.0.1, loops: {', '.join(loops)}; "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}.\n"
        "Each hazard is run twice: with the close real servers do (naive, named in each row),\n"
        "then with aiograceful. Every number below is measured now, by the clients; each row\n"
        "counts in its own unit (replies, bytes, aborts, connections), never a sum of unlike\n"
        "things.\n"
    )


_COLUMNS: Final = "    {:<8} {:<11} {:<32} {:>15} {:>8} {:>5} {:>5} {:>5}  {}"


def _format_head() -> str:
    head = _COLUMNS.format(
        "loop", "side", "close", "delivered/due", "lost", "FIN", "RST", "open", "verdict"
    )
    return head + "\n" + "-" * len(head)


def _case_head(case: Case) -> str:
    server = f"{case.server}: " if case.server else ""
    return f"{case.hazard}  {server}{case.title} ({case.unit})"


def _verdict(row: Row) -> str:
    """The row's verdict, in the row's own unit."""
    if row.error:
        return row.error
    tally, unit = row.tally, row.case.unit
    if tally.lost:
        text = f"lost {tally.lost:,} {unit}" + (f" ({tally.detail})" if tally.detail else "")
    elif tally.open:
        text = f"{tally.open} connection(s) left open"
    elif row.close == NAIVE and row.case.hazard_shown:
        text = f"all {unit} delivered: the hazard did not show this run"
    elif row.close == NAIVE:
        text = f"all {unit} delivered (no hazard here)"
    else:
        text = f"all {unit} delivered"
    if tally.note:
        text += f"; {tally.note}"
    return f"{text}; {row.seconds:.1f} s"


def _format_row(row: Row) -> str:
    tally = row.tally
    how = row.case.naive if row.close == NAIVE else row.case.graceful
    return _COLUMNS.format(
        row.loop,
        row.close,
        how,
        f"{tally.delivered}/{tally.delivered + tally.lost}",
        tally.lost,
        tally.fin,
        tally.rst,
        tally.open,
        _verdict(row),
    )


def _legend(servers: Sequence[str]) -> str:
    lines = ["delivered/due: what the clients received, out of what was due:"]
    for case in (*CASES, *server_cases(servers[:1], ServerPool(""))):
        what = f"{case.hazard} {'(drop-in rows) ' if case.server else ''}{case.title}"
        lines.append(f"  {what}: {case.delivered}")
    lines.append(
        "FIN / RST / open: how each connection ended, as its client saw it: recv() returned "
        'b"" (FIN),\n  raised ConnectionResetError or BrokenPipeError (RST), or stayed '
        f"open past {CLIENT_TIMEOUT:g} s."
    )
    return "\n".join(lines)


def _names(rows: Sequence[Row]) -> str:
    """The cases of ``rows``, grouped by unit: ``replies in H1, H2; bytes in H6 timed``."""
    by_unit: dict[str, list[str]] = {}
    for row in rows:
        names = by_unit.setdefault(row.case.unit, [])
        if row.case.label not in names:
            names.append(row.case.label)
    return "; ".join(f"{unit} in {', '.join(names)}" for unit, names in by_unit.items())


def summary(rows: Sequence[Row]) -> tuple[bool, str]:
    """(ok, two lines): where the naive side lost, per unit; did aiograceful deliver everything?

    The last line is aiograceful's: which rows it delivered everything in, per unit.
    """
    naive = [row for row in rows if row.close == NAIVE]
    graceful = [row for row in rows if row.close == GRACEFUL]
    lost = [row for row in naive if row.tally.lost]
    kept = [row for row in naive if not row.tally.lost and row.case.label not in _labels(lost)]
    line = f"The naive side lost {_names(lost)}." if lost else "The naive side lost nothing."
    if kept:
        line += f" It delivered everything in {', '.join(_labels(kept))}."
    failed = [row for row in graceful if not row.ok]
    if failed:
        names = ", ".join(
            f"{row.case.label} on {row.loop}"
            + (f" ({row.tally.detail})" if row.tally.detail else "")
            + (f" ({row.error})" if row.error else f" (lost {row.tally.lost:,} {row.case.unit})")
            for row in failed
        )
        return False, f"{line}\naiograceful did NOT deliver everything: {names}."
    return True, f"{line}\naiograceful delivered everything: {_names(graceful)}."


def _labels(rows: Sequence[Row]) -> list[str]:
    labels: list[str] = []
    for row in rows:
        if row.case.label not in labels:
            labels.append(row.case.label)
    return labels
