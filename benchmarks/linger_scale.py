"""Benchmark 4: many concurrent lingering connections: memory and timer cost.

The client opens N connections (10,000 by default), sends one request on each,
reads the reply, and then stays silent with its side open, so a server that
lingers waits for it until its timers run out (set far away here).

Two servers, each in a fresh process so that their memory figures are apart:

* ``bare``: ``asyncio.Protocol``; it replies and leaves the connection open.
* ``graceful``: ``GracefulProtocol``; it replies and leaves the connection
  open, and then, on the orchestrator's command, starts ``close_gracefully()``
  on all N at once: N lingering connections, each with its timer armed.

In each state the server reports its resident set (after ``gc.collect()``),
the CPU time of one event-loop iteration (a chain of ``call_soon`` callbacks)
and of one event (a one-byte ping-pong over a socket pair, through the loop's
poller), next to the same figures with no connection open. If anything did
O(n) work per iteration or per event, those figures would grow with N.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import socket
import time
from typing import Any, Final

from aiograceful import GracefulProtocol, HalfCloseState, LingerOptions

from ._harness import (
    HOST,
    Child,
    Config,
    Control,
    fit_scale,
    median,
    rss_bytes,
    serve_commands,
    wait_until,
)
from ._load import REPLY, REQUEST_SIZE
from ._report import Column, Section

NAME = "linger_scale"
TICKS: Final = 20_000
PINGS: Final = 5_000
INFLIGHT: Final = 256
TARGET_BYTES: Final = 1024

_protocols: list[asyncio.BaseProtocol] = []


class _Stats:
    replied = 0


class BareHold(asyncio.Protocol):
    """Reply, then hold the connection open."""

    transport: asyncio.Transport
    pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _protocols.append(self)

    def data_received(self, data: bytes) -> None:
        before = self.pending
        self.pending += len(data)
        if before < REQUEST_SIZE <= self.pending:
            self.transport.write(REPLY)
            _Stats.replied += 1

    def eof_received(self) -> bool:
        return True


class GracefulHold(GracefulProtocol):
    """Reply, then hold the connection open until told to linger."""

    # Far-away bounds: the peers stay silent, and no timer may fire while we measure.
    linger = LingerOptions(timeout=600.0, idle_timeout=600.0)
    pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _protocols.append(self)

    def data_received(self, data: bytes) -> None:
        before = self.pending
        self.pending += len(data)
        if before < REQUEST_SIZE <= self.pending:
            self.transport.write(REPLY)
            _Stats.replied += 1


async def _ticks(count: int) -> float:
    """CPU seconds per loop iteration, over a chain of ``count`` call_soon callbacks."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    left = [count]

    def step() -> None:
        left[0] -= 1
        if left[0] > 0:
            loop.call_soon(step)
        else:
            done.set_result(None)

    c0 = time.process_time()
    loop.call_soon(step)
    await asyncio.wait_for(done, 60)
    return (time.process_time() - c0) / count


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _Pinger(asyncio.Protocol):
    def __init__(self, count: int, done: asyncio.Future[None]) -> None:
        self.left = count
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.left -= 1
        if self.left > 0:
            self.transport.write(b"x")
        elif not self.done.done():
            self.done.set_result(None)


async def _pingpong(count: int) -> float:
    """CPU seconds per one-byte round trip between two transports of this loop."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    done: asyncio.Future[None] = loop.create_future()
    echo_t, _ = await loop.connect_accepted_socket(_Echo, a)
    ping_t, _ = await loop.connect_accepted_socket(lambda: _Pinger(count, done), b)
    try:
        c0 = time.process_time()
        ping_t.write(b"x")
        await asyncio.wait_for(done, 60)
        return (time.process_time() - c0) / count
    finally:
        echo_t.close()
        ping_t.close()
        await asyncio.sleep(0)


async def _figures(_: object) -> dict[str, float]:
    """RSS (after a full collection), loop-iteration and event cost, as of now."""
    gc.collect()
    rss = rss_bytes()
    tick = median([await _ticks(TICKS) for _ in range(3)])
    ping = median([await _pingpong(PINGS) for _ in range(3)])
    return {"rss": rss, "tick_s": tick, "ping_s": ping}


def _lingering() -> int:
    return sum(
        1
        for p in _protocols
        if isinstance(p, GracefulProtocol) and p.state is HalfCloseState.LINGERING
    )


async def _start_lingers(_: object) -> dict[str, float]:
    """close_gracefully() on every connection at once; time it."""
    graceful = [p for p in _protocols if isinstance(p, GracefulProtocol)]
    c0 = time.process_time()
    w0 = time.perf_counter()
    for protocol in graceful:
        protocol.close_gracefully()
    cpu = time.process_time() - c0
    wall = time.perf_counter() - w0
    await wait_until(lambda: _lingering() >= len(graceful), 30.0)
    # Let the half-closes (uvloop shuts down asynchronously) and the peers' ACKs settle.
    await asyncio.sleep(0.3)
    return {"started": len(graceful), "cpu_s": cpu, "wall_s": wall, "lingering": _lingering()}


async def server(ctl: Control, args: dict[str, Any]) -> None:
    """The server child."""
    factory = GracefulHold if args["variant"] == "graceful" else BareHold
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(factory, HOST, 0, backlog=4096)
    ctl.send({"port": srv.sockets[0].getsockname()[1], "nofile": args["nofile"]})

    async def wait_replied(count: object) -> int:
        assert isinstance(count, int)
        await wait_until(lambda: _Stats.replied >= count, 30.0)
        return _Stats.replied

    try:
        await serve_commands(
            ctl,
            {
                "figures": _figures,
                "wait_replied": wait_replied,
                "linger": _start_lingers,
                "lingering": lambda _: _lingering(),
            },
        )
    finally:
        srv.close()
        for protocol in _protocols:
            transport = getattr(protocol, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.abort()
        await asyncio.sleep(0)


def _run_one(cfg: Config, loop_name: str, variant: str) -> dict[str, Any]:
    with Child(f"{__name__}:server", loop_name, {"variant": variant}) as srv:
        empty = srv.request("figures")
        args = {"port": srv.ready["port"], "conns": cfg.scale, "inflight": INFLIGHT}
        with Child("benchmarks._load:silent_client", "uvloop", args) as client:
            opened = client.request("open", timeout=120)
            replied = srv.request("wait_replied", opened["opened"], timeout=60)
            held = srv.request("figures", timeout=120)
            run: dict[str, Any] = {
                "n": opened["opened"],
                "replied": replied,
                "connect_errors": opened["connect_errors"],
                "empty": empty,
                "open": held,
                "server_nofile": srv.ready.get("nofile"),
            }
            if variant == "graceful":
                run["start"] = srv.request("linger", timeout=120)
                run["lingering"] = srv.request("figures", timeout=120)
                run["still_lingering"] = srv.request("lingering")
    return run


def _per_conn(run: dict[str, Any], state: str) -> float:
    n = run["n"]
    return (run[state]["rss"] - run["empty"]["rss"]) / n if n else float("nan")


def run(cfg: Config) -> Section:
    """Run the benchmark; return its section of the report."""
    repeats = min(cfg.repeats, 3)
    scale, scale_note = fit_scale(cfg.scale)
    cfg = dataclasses.replace(cfg, scale=scale)
    section = Section(
        name=NAME,
        title=f"4. {cfg.scale:,} concurrent lingering connections",
        what=(
            f"{cfg.scale:,} connections whose peers stay silent. Memory per connection is "
            "the server's RSS delta over its RSS with no connection, divided by the count; "
            "'beyond bare' subtracts the bare protocol's figure from the same repeat "
            f"(target <= {TARGET_BYTES} bytes for lingering). Loop iteration and ping-pong "
            "event costs are server CPU time; the ratio is against the same process with no "
            f"connection open (about 1.0 means no O(n) work). {repeats} run(s), medians."
        ),
        columns=[
            Column("loop", "loop"),
            Column("state", "server state"),
            Column("bytes_per_conn", "RSS/connection (B)", "{:,.0f}"),
            Column("beyond_bare", "beyond bare open (B)", "{:,.0f}"),
            Column("tick_us", "loop iteration (us)", "{:.2f}"),
            Column("tick_ratio", "iteration vs empty", "{:.2f}"),
            Column("ping_us", "ping-pong event (us)", "{:.2f}"),
            Column("ping_ratio", "event vs empty", "{:.2f}"),
            Column("start_us", "close_gracefully() call (us)", "{:.2f}"),
        ],
    )
    for repeat in range(repeats):
        for loop_name in cfg.loops:
            for variant in ("bare", "graceful"):
                run_ = _run_one(cfg, loop_name, variant)
                section.runs.append(
                    {"loop": loop_name, "variant": variant, "repeat": repeat, **run_}
                )

    def runs_of(loop_name: str, variant: str) -> list[dict[str, Any]]:
        return [r for r in section.runs if r["loop"] == loop_name and r["variant"] == variant]

    for loop_name in cfg.loops:
        bare = {r["repeat"]: r for r in runs_of(loop_name, "bare")}
        graceful = runs_of(loop_name, "graceful")
        states = [
            ("bare open", list(bare.values()), "open"),
            ("graceful open", graceful, "open"),
            ("graceful lingering", graceful, "lingering"),
        ]
        for label, runs, state in states:
            row: dict[str, Any] = {
                "loop": loop_name,
                "state": label,
                "bytes_per_conn": median(_per_conn(r, state) for r in runs),
                "tick_us": median(r[state]["tick_s"] * 1e6 for r in runs),
                "tick_ratio": median(r[state]["tick_s"] / r["empty"]["tick_s"] for r in runs),
                "ping_us": median(r[state]["ping_s"] * 1e6 for r in runs),
                "ping_ratio": median(r[state]["ping_s"] / r["empty"]["ping_s"] for r in runs),
            }
            if label != "bare open":
                row["beyond_bare"] = median(
                    _per_conn(r, state) - _per_conn(bare[r["repeat"]], "open")
                    for r in runs
                    if r["repeat"] in bare
                )
            if state == "lingering":
                row["start_us"] = median(r["start"]["cpu_s"] / r["n"] * 1e6 for r in runs)
            section.rows.append(row)
    ns = sorted({r["n"] for r in section.runs})
    errors = sum(r["connect_errors"] for r in section.runs)
    section.notes.append(
        f"Connections held per run: {', '.join(map(str, ns))}; connect errors: {errors}. "
        f"RLIMIT_NOFILE in the server: {section.runs[0]['server_nofile'] if section.runs else '?'}."
    )
    short = [
        r for r in section.runs if r["variant"] == "graceful" and r["still_lingering"] < r["n"]
    ]
    if short:
        section.notes.append(
            f"{len(short)} run(s) had fewer lingering than open connections when measured."
        )
    if scale_note:
        section.notes.append(scale_note)
    section.notes.append(
        "RSS/connection covers the Python objects and the loop's own per-connection "
        "structures; the kernel's socket buffers are not in RSS."
    )
    return section
