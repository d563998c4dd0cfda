"""``python -m aiograceful demo``: every hazard on loopback, closed naively, then gracefully.

Theory of operation: a *case* is one hazard (H1..H5 and H7 of the design), one event
loop and one way of closing ("naive": what a typical asyncio server does;
"aiograceful": the library). Each case starts its own server on 127.0.0.1 on a
fresh loop, runs ``rounds`` rounds of real clients against it (stdlib
``http.client`` and raw sockets in threads, asyncio streams on the loop), and
counts what the clients saw: replies delivered or lost, and whether each
connection ended with a FIN (``recv`` returned ``b""``) or a RST
(``ConnectionResetError`` / ``BrokenPipeError``). H7 runs real server
processes instead, restarted under load (``_restart``). Nothing in the table
is written in; every number comes from the run.

Every wait is bounded: each client socket operation by :data:`CLIENT_TIMEOUT`,
each case by :data:`CASE_BUDGET`. A case that runs out of time is reported as
such and counts as a failure of the close it was testing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import platform
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, Literal

from .. import abort, graceful_close

__all__ = ["CASES", "LOOP_NAMES", "Case", "Row", "Tally", "available_loops", "run_demo"]

End = Literal["FIN", "RST", "open"]
Close = Literal["naive", "aiograceful"]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

NAIVE: Final = "naive"
GRACEFUL: Final = "aiograceful"
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
    #: What the losses were, where a case can tell (printed when aiograceful loses).
    detail: str = ""

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
    port: int, method: str, body: bytes | Callable[[], Iterator[bytes]]
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
                if not stopping and self.sent < _H3_MAX:
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


async def _h3_naive_round(clients: Sequence[_LineClient]) -> None:
    shutting_down = False

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            # After its own FIN the server can no longer answer: what raced
            # that FIN is read and dropped.
            if line.startswith(b"REQ ") and not shutting_down:
                writer.write(b"OK " + line[4:])
                await writer.drain()
        writer.close()

    async with _naive_server(handler) as (port, handlers):
        tasks = await _start_clients(port, clients)
        # The naive shutdown: half-close every connection at once, then wait
        # for the clients to close theirs.
        shutting_down = True
        for writer in list(handlers.writers):
            with contextlib.suppress(OSError):
                writer.write_eof()
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
# a 64 KiB receive buffer: about 0.25 s. The close lingers, bounded at 0.1 s
# either way. The naive linger counts from the start of the close, as a close
# timer does, and gives up with a RST, which drops what the kernel still holds;
# aiograceful bounds lack of progress only, so its 0.1 s start once the client
# has acknowledged everything.
_H6_SIZE: Final = 1 << 20
_H6_RATE: Final = 4 << 20
_H6_BOUND: Final = 0.1
_H6_ROUNDS: Final = 3


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


async def _h6(close: Close, rounds: int) -> Tally:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"d" * _H6_SIZE)
        if close == GRACEFUL:
            await graceful_close(writer, timeout=_H6_BOUND, idle_timeout=_H6_BOUND)
            return
        # A linger bounded by a timer from the start of the close: our FIN,
        # wait for the client's, then reset.
        writer.write_eof()
        try:
            await asyncio.wait_for(reader.read(), _H6_BOUND)
        except (TimeoutError, OSError):
            pass
        abort(writer)

    tally = Tally()
    async with _naive_server(handler) as (port, handlers):
        for _ in range(min(rounds, _H6_ROUNDS)):
            got, end = await asyncio.to_thread(_slow_read, port)
            tally.count(got == _H6_SIZE, end)
        await handlers.wait()
    return tally


# -- H7: a restart under load -------------------------------------------------------------


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
    # process's shutdown drops the SYNs of its last 10 ms (close_and_drain),
    # and a successor up before the retransmission would answer those
    # clients, hiding the refusals a plain restart causes.
    result = await asyncio.to_thread(
        restart_under_load,
        kind,
        loop=loop,
        before=0.25,
        after=0.25,
        startup_delay=1.0,
        quiet=True,
    )
    if result.old_exit != 0 or result.new_exit != 0:
        raise RuntimeError(f"server exit codes {result.old_exit}, {result.new_exit}")
    failed = result.load.failed
    tally = Tally(delivered=result.load.ok, lost=result.load.failures)
    tally.fin = result.load.ok  # every answer ended with the server's FIN
    tally.rst = failed["ConnectionResetError"] + failed["BrokenPipeError"]
    tally.open = failed["TimeoutError"]
    tally.detail = ", ".join(f"{count} {kind}" for kind, count in sorted(failed.items()))
    return tally


CASES: Final[tuple[Case, ...]] = (
    Case("H1", "early 413 during an upload", "the 413 reply read by http.client", _h1),
    Case("H2", "503 at the connection limit", "the 503 reply read by http.client", _h2),
    Case(
        "H3",
        "both sides end at once",
        "an answer to every request sent before the end",
        _h3,
    ),
    Case("H4", "accept queue at shutdown", "the answer to a queued connection's request", _h4),
    Case("H5", "abort()", "an abort the peer sees as a RST", _h5_abort),
    Case(
        "H5",
        "final message at close",
        "the server's last message and the client's reply, both read",
        _h5_final,
    ),
    Case(
        "H6",
        "slow reader at close",
        "a 1 MiB download read in full by a client reading 4 MiB/s (naive: a\n"
        "    linger bounded at 0.1 s from the close; aiograceful: timeout=0.1)",
        _h6,
    ),
    Case(
        "H7",
        "restart under load",
        "requests answered across a restart (naive: SIGTERM, then a new process\n"
        "    binds; aiograceful: handoff=PATH); a refused connect is lost, with no FIN or RST",
        _h7,
    ),
)


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


def run_demo(loops: Sequence[str], rounds: int, *, out: Callable[[str], None] = print) -> list[Row]:
    """Run every case on each loop in ``loops``, printing the table as it goes."""
    factories = available_loops()
    out(_header(loops, rounds))
    out(_format_head())
    rows: list[Row] = []
    for case in CASES:
        for loop_name in loops:
            for close in (NAIVE, GRACEFUL):
                row = _run_case(case, loop_name, factories[loop_name], close, rounds)
                rows.append(row)
                out(_format_row(row))
    out("")
    out(_legend())
    return rows


def _header(loops: Sequence[str], rounds: int) -> str:
    return (
        f"aiograceful demo: {rounds} round(s) per case on 127.0.0.1, loops: {', '.join(loops)}; "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}.\n"
        "Each hazard is run twice: with the close a typical asyncio server does (naive),\n"
        "then with aiograceful. Every number below is measured now, by the clients.\n"
    )


_COLUMNS: Final = "{:<3} {:<28} {:<8} {:<12} {:>11} {:>6} {:>5} {:>5} {:>5}  {}"


def _format_head() -> str:
    head = _COLUMNS.format(
        "", "hazard", "loop", "close", "delivered", "lost", "FIN", "RST", "open", ""
    )
    return head.rstrip() + "\n" + "-" * len(head.rstrip())


def _format_row(row: Row) -> str:
    tally = row.tally
    total = tally.delivered + tally.lost
    note = row.error or f"{row.seconds:.1f} s"
    return _COLUMNS.format(
        row.case.hazard,
        row.case.title,
        row.loop,
        row.close,
        f"{tally.delivered}/{total}",
        tally.lost,
        tally.fin,
        tally.rst,
        tally.open,
        note,
    )


def _legend() -> str:
    lines = ["delivered: what the clients received, out of what was due:"]
    for case in CASES:
        lines.append(f"  {case.hazard} {case.title}: {case.delivered}")
    lines.append(
        "FIN / RST / open: how each connection ended, as its client saw it: recv() returned "
        'b"" (FIN),\n  raised ConnectionResetError or BrokenPipeError (RST), or stayed '
        f"open past {CLIENT_TIMEOUT:g} s."
    )
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> tuple[bool, str]:
    """(ok, one line): did aiograceful deliver everything in every case?"""
    graceful = [row for row in rows if row.close == GRACEFUL]
    failed = [row for row in graceful if not row.ok]
    naive_lost = sum(row.tally.lost for row in rows if row.close == NAIVE)
    naive_total = sum(row.tally.lost + row.tally.delivered for row in rows if row.close == NAIVE)
    if failed:
        names = ", ".join(
            f"{row.case.hazard} {row.case.title} on {row.loop}"
            + (f" ({row.tally.detail})" if row.tally.detail else "")
            for row in failed
        )
        return False, f"aiograceful did NOT deliver everything: {names}."
    delivered = sum(row.tally.delivered for row in graceful)
    return True, (
        f"aiograceful delivered everything ({delivered}/{delivered}); "
        f"the naive close lost {naive_lost}/{naive_total}."
    )
