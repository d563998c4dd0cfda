"""Benchmark 1: keep-alive request/response, GracefulProtocol against a bare Protocol.

Both servers do the same work in ``data_received`` (count whole requests,
write one fixed reply per request); the only difference is the base class.
``GracefulProtocol`` never wraps ``data_received``, so the cost it may add is
in ``connection_made``/``connection_lost`` and in its EOF handling, spread
over many requests per connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiograceful import GracefulProtocol

from ._harness import HOST, Child, Config, Control, run_load, serve_commands
from ._load import REPLY, REQUEST_SIZE
from ._report import Column, Section, paired, ratio_rows

NAME = "keepalive"
VARIANTS = ("bare", "graceful")
TARGET = 1.05
CONNS = 8


class _Stats:
    requests = 0
    connections = 0


class BareKeepAlive(asyncio.Protocol):
    """A plain ``asyncio.Protocol``: one reply per fixed-size request."""

    transport: asyncio.Transport
    pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _Stats.connections += 1

    def data_received(self, data: bytes) -> None:
        count, self.pending = divmod(self.pending + len(data), REQUEST_SIZE)
        if count:
            _Stats.requests += count
            self.transport.write(REPLY if count == 1 else REPLY * count)


class GracefulKeepAlive(GracefulProtocol):
    """The same server on ``GracefulProtocol``."""

    pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _Stats.connections += 1

    def data_received(self, data: bytes) -> None:
        count, self.pending = divmod(self.pending + len(data), REQUEST_SIZE)
        if count:
            _Stats.requests += count
            self.transport.write(REPLY if count == 1 else REPLY * count)


async def server(ctl: Control, args: dict[str, Any]) -> None:
    """The server child."""
    factory = {"bare": BareKeepAlive, "graceful": GracefulKeepAlive}[args["variant"]]
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(factory, HOST, 0, backlog=1024)
    ctl.send({"port": srv.sockets[0].getsockname()[1]})

    def stats(_: object) -> dict[str, int]:
        return {"requests": _Stats.requests, "connections": _Stats.connections}

    try:
        await serve_commands(ctl, {"stats": stats})
    finally:
        srv.close()


def _run_one(cfg: Config, loop_name: str, variant: str, repeat: int) -> dict[str, Any]:
    with Child(f"{__name__}:server", loop_name, {"variant": variant}) as srv:
        before = srv.request("stats")
        cpu, client = run_load(
            srv,
            "benchmarks._load:keepalive_client",
            {
                "port": srv.ready["port"],
                "conns": CONNS,
                "duration": cfg.duration,
                "max_requests": 5_000_000,
            },
            timeout=cfg.duration + 60,
        )
        after = srv.request("stats")
    requests = after["requests"] - before["requests"]
    return {
        "server_cpu_s": cpu,
        "requests": requests,
        "cpu_us_per_req": cpu / requests * 1e6 if requests else float("nan"),
        "req_per_s": client["requests"] / client["elapsed"] if client["elapsed"] else 0.0,
        "client_errors": client["errors"],
    }


def run(cfg: Config) -> Section:
    """Run the benchmark; return its section of the report."""
    section = Section(
        name=NAME,
        title="1. Keep-alive request/response",
        what=(
            f"{CONNS} connections, each sending a {REQUEST_SIZE}-byte request and waiting "
            f"for the {len(REPLY)}-byte reply, for {cfg.duration:.1f} s. Server CPU per "
            "request is the figure; the ratio is GracefulProtocol / bare asyncio.Protocol "
            f"(target <= {TARGET} on uvloop)."
        ),
        columns=[
            Column("loop", "loop"),
            Column("variant", "server"),
            Column("cpu_us_per_req", "server CPU/request (us)", "{:.2f}"),
            Column("req_per_s", "requests/s", "{:,.0f}"),
            Column("ratio", "CPU ratio vs bare (median)", "{:.3f}"),
            Column("ratios", "per-repeat ratios"),
            Column("target", "target"),
        ],
    )
    section.runs = paired(cfg, VARIANTS, lambda lp, v, r: _run_one(cfg, lp, v, r))
    section.rows = ratio_rows(
        section.runs,
        cfg.loops,
        VARIANTS,
        "bare",
        "cpu_us_per_req",
        ["cpu_us_per_req", "req_per_s"],
        target=f"<= {TARGET}",
    )
    errors = sum(int(r["client_errors"]) for r in section.runs)
    if errors:
        section.notes.append(f"{errors} client connection(s) failed across all runs.")
    return section
