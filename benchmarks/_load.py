"""The load generators (run in the client child) and the wire format they share.

The wire format is the smallest that still has a request and a reply: a
fixed-size request line and a fixed-size reply, so that neither side parses
anything and the figures are the cost of the connection handling itself.
Every loop here is bounded by a count and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any, Final, cast

from ._harness import HOST, Control, wait_until

__all__ = [
    "REPLY",
    "REPLY_SIZE",
    "REQUEST",
    "REQUEST_SIZE",
    "keepalive_client",
    "oneshot_client",
    "silent_client",
]

REQUEST_SIZE: Final = 64
REPLY_SIZE: Final = 128
REQUEST: Final = b"GET /bench HTTP/1.1".ljust(REQUEST_SIZE - 1, b" ") + b"\n"
REPLY: Final = b"HTTP/1.1 200 OK".ljust(REPLY_SIZE - 1, b" ") + b"\n"
assert len(REQUEST) == REQUEST_SIZE
assert len(REPLY) == REPLY_SIZE

#: No single connection attempt or wait for a reply may take longer than this.
STEP_TIMEOUT: Final = 15.0


async def _wait_go(ctl: Control) -> bool:
    """Wait for the orchestrator's "go"; False if it said "stop" instead."""
    command, _ = await ctl.recv()
    return command == "go"


# -- keep-alive: many requests per connection ---------------------------------


class _PingPong(asyncio.Protocol):
    """Send a request, wait for the whole reply, repeat until the deadline or the limit."""

    def __init__(self, deadline: float, limit: int, done: asyncio.Future[int]) -> None:
        self._deadline = deadline
        self._limit = limit
        self._done = done
        self._got = 0
        self.count = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: cast, not isinstance.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self._got += len(data)
        if self._got < REPLY_SIZE:
            return
        self._got -= REPLY_SIZE
        self.count += 1
        assert self.transport is not None
        if self.count < self._limit and time.monotonic() < self._deadline:
            self.transport.write(REQUEST)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(self.count)


async def keepalive_client(ctl: Control, args: dict[str, Any]) -> None:
    """``args["conns"]`` connections, each doing request/reply in lock step."""
    ctl.send("ready")
    if not await _wait_go(ctl):
        return
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    deadline = started + float(args["duration"])
    per_conn = int(args["max_requests"]) // int(args["conns"])
    futures: list[asyncio.Future[int]] = []
    errors = 0
    for _ in range(int(args["conns"])):
        done: asyncio.Future[int] = loop.create_future()
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await loop.create_connection(
                    functools.partial(_PingPong, deadline, per_conn, done), HOST, args["port"]
                )
        except (OSError, TimeoutError):
            errors += 1
            continue
        futures.append(done)
    if futures:
        await asyncio.wait(futures, timeout=float(args["duration"]) + STEP_TIMEOUT)
    counts = [f.result() for f in futures if f.done()]
    errors += len(futures) - len(counts)
    elapsed = time.monotonic() - started
    ctl.send({"requests": sum(counts), "elapsed": elapsed, "errors": errors})


# -- one request per connection ----------------------------------------------


class _OneShot(asyncio.Protocol):
    """Connect, send one request, read the reply, close once it is read."""

    def __init__(self, done: asyncio.Future[str]) -> None:
        self._done = done
        self._got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self._got += len(data)
        if self._got >= REPLY_SIZE:
            # A cooperative peer: it has what it came for, so it closes now
            # (whether or not the server's FIN is in yet).
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done.done():
            return
        if self._got >= REPLY_SIZE:
            self._done.set_result("ok")
        elif isinstance(exc, ConnectionResetError):
            self._done.set_result("reset")
        else:
            self._done.set_result("short")


async def oneshot_client(ctl: Control, args: dict[str, Any]) -> None:
    """``args["concurrency"]`` workers, each opening connection after connection.

    Stops at ``args["duration"]`` seconds or ``args["max_conns"]`` connections.
    """
    ctl.send("ready")
    if not await _wait_go(ctl):
        return
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    deadline = started + float(args["duration"])
    budget = [int(args["max_conns"])]
    tally = {"ok": 0, "short": 0, "reset": 0, "errors": 0}
    port = int(args["port"])

    async def worker() -> None:
        while budget[0] > 0 and time.monotonic() < deadline:
            budget[0] -= 1
            done: asyncio.Future[str] = loop.create_future()
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await loop.create_connection(functools.partial(_OneShot, done), HOST, port)
                    outcome = await done
            except (OSError, TimeoutError):
                tally["errors"] += 1
                await asyncio.sleep(0.01)
                continue
            tally[outcome] += 1

    await asyncio.gather(*(worker() for _ in range(int(args["concurrency"]))))
    elapsed = time.monotonic() - started
    ctl.send({**tally, "connections": sum(tally.values()), "elapsed": elapsed})


# -- many connections that stay open -------------------------------------------


class _Silent(asyncio.Protocol):
    """Send one request, read the reply, then stay silent.

    With ``cooperative`` it closes as soon as the server's FIN arrives (the
    client a graceful shutdown hopes for); without, it keeps its side open and
    never sends again, so a lingering server waits for it.
    """

    def __init__(self, cooperative: bool, tally: dict[str, int]) -> None:
        self._cooperative = cooperative
        self._tally = tally
        self._got = 0
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: cast, not isinstance.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        before = self._got
        self._got += len(data)
        if before < REPLY_SIZE <= self._got:
            self._tally["replied"] += 1

    def eof_received(self) -> bool:
        self._tally["eof"] += 1
        # True keeps our side open: the silent peer a lingering server waits on.
        return not self._cooperative

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, ConnectionResetError):
            self._tally["reset"] += 1
        elif exc is not None:
            self._tally["error_lost"] += 1
        if not self.lost.done():
            self.lost.set_result(None)


async def silent_client(ctl: Control, args: dict[str, Any]) -> None:
    """Open ``args["conns"]`` connections (``args["inflight"]`` at a time) and hold them.

    Answers "open" with the counts once every connection has its reply (or
    the deadline passed), "tally" with the counts now, "wait_closed" once all
    are closed (bounded), and on "stop" resets what is left.
    """
    ctl.send("ready")
    loop = asyncio.get_running_loop()
    port = int(args["port"])
    cooperative = bool(args.get("cooperative", False))
    tally = {"replied": 0, "eof": 0, "reset": 0, "error_lost": 0, "connect_errors": 0}
    protocols: list[_Silent] = []
    try:
        while True:
            command, payload = await ctl.recv()
            if command == "stop":
                return
            if command == "open":
                started = time.monotonic()
                await _open_many(
                    loop,
                    port,
                    int(args["conns"]),
                    int(args["inflight"]),
                    cooperative,
                    tally,
                    protocols,
                )
                await wait_until(lambda: tally["replied"] >= len(protocols), STEP_TIMEOUT)
                ctl.send({**tally, "opened": len(protocols), "elapsed": time.monotonic() - started})
            elif command == "tally":
                ctl.send(dict(tally))
            elif command == "wait_closed":
                timeout = float(payload)
                started = time.monotonic()
                pending = [p.lost for p in protocols if not p.lost.done()]
                if pending:
                    await asyncio.wait(pending, timeout=timeout)
                still_open = sum(1 for p in protocols if not p.lost.done())
                ctl.send({**tally, "still_open": still_open, "waited": time.monotonic() - started})
            else:
                ctl.send({"error": f"unknown command {command!r}"})
    finally:
        _reset_all(protocols)
        await asyncio.sleep(0)


async def _open_many(
    loop: asyncio.AbstractEventLoop,
    port: int,
    count: int,
    inflight: int,
    cooperative: bool,
    tally: dict[str, int],
    protocols: list[_Silent],
) -> None:
    gate = asyncio.Semaphore(inflight)

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    _, protocol = await loop.create_connection(
                        lambda: _Silent(cooperative, tally), HOST, port
                    )
            except (OSError, TimeoutError):
                tally["connect_errors"] += 1
                return
            protocols.append(protocol)

    await asyncio.gather(*(one() for _ in range(count)))


def _reset_all(protocols: list[_Silent]) -> None:
    """RST every connection still open: no TIME_WAIT left behind for the next run."""
    from aiograceful import abort

    for protocol in protocols:
        transport = protocol.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(OSError):
                abort(transport)
