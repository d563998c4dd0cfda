"""Benchmark 2: connection lifecycle (accept, request, reply, close).

The client connects, sends one request, reads the reply and closes once it
has read it. The servers:

* ``bare``: ``asyncio.Protocol``, reply, ``transport.close()``. The baseline;
  it loses the reply whenever the client is still sending (hazard H1), which
  this client never does.
* ``graceful``: ``GracefulProtocol``, reply, ``close_gracefully()``.
* ``streams-graceful``: ``asyncio.start_server``, reply,
  ``await aiograceful.graceful_close(writer)``.
* ``streams-close``: ``asyncio.start_server``, reply, ``writer.close()`` and
  ``await writer.wait_closed()``: what a streams server costs without
  aiograceful, for scale.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, ClassVar

from aiograceful import GracefulProtocol, graceful_close

from ._harness import HOST, Child, Config, Control, run_load, serve_commands
from ._load import REPLY, REQUEST_SIZE
from ._report import Column, Section, paired, ratio_rows

NAME = "lifecycle"
VARIANTS = ("bare", "bare-halfclose", "graceful", "streams-graceful", "streams-close")
TARGET = 1.2
CONCURRENCY = 8
MAX_CONNS = 20_000  # per run: well inside the ephemeral port range


class _Stats:
    closed = 0
    errors = 0
    outcomes: ClassVar[collections.Counter[str]] = collections.Counter()


class BareOneShot(asyncio.Protocol):
    """Reply to the request, then a plain ``transport.close()``."""

    transport: asyncio.Transport
    pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        before = self.pending
        self.pending += len(data)
        if before < REQUEST_SIZE <= self.pending:
            self.transport.write(REPLY)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        _Stats.closed += 1
        if exc is not None:
            _Stats.errors += 1


class BareHalfClose(BareOneShot):
    """Reply, ``write_eof()``, and close when the peer's FIN arrives: a lingering close
    written by hand, with no timer and no byte cap (so not safe against a peer that
    never closes), to show what the half-close itself costs."""

    def data_received(self, data: bytes) -> None:
        before = self.pending
        self.pending += len(data)
        if before < REQUEST_SIZE <= self.pending:
            self.transport.write(REPLY)
            self.transport.write_eof()

    def eof_received(self) -> bool:
        return False  # asyncio closes the transport: both directions are done


class GracefulOneShot(GracefulProtocol):
    """Reply to the request, then ``close_gracefully()``."""

    pending = 0

    def data_received(self, data: bytes) -> None:
        before = self.pending
        self.pending += len(data)
        if before < REQUEST_SIZE <= self.pending:
            self.transport.write(REPLY)
            self.close_gracefully()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        _Stats.closed += 1
        result = self.close_result
        _Stats.outcomes[result.outcome.name if result else "none"] += 1


async def _handle_graceful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readexactly(REQUEST_SIZE)
    except (asyncio.IncompleteReadError, OSError):
        _Stats.errors += 1
    writer.write(REPLY)
    result = await graceful_close(writer)
    _Stats.closed += 1
    _Stats.outcomes[result.outcome.name] += 1


async def _handle_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readexactly(REQUEST_SIZE)
    except (asyncio.IncompleteReadError, OSError):
        _Stats.errors += 1
    writer.write(REPLY)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        _Stats.errors += 1
    _Stats.closed += 1


async def server(ctl: Control, args: dict[str, Any]) -> None:
    """The server child."""
    variant = args["variant"]
    loop = asyncio.get_running_loop()
    srv: asyncio.AbstractServer
    if variant == "bare":
        srv = await loop.create_server(BareOneShot, HOST, 0, backlog=1024)
    elif variant == "bare-halfclose":
        srv = await loop.create_server(BareHalfClose, HOST, 0, backlog=1024)
    elif variant == "graceful":
        srv = await loop.create_server(GracefulOneShot, HOST, 0, backlog=1024)
    elif variant == "streams-graceful":
        srv = await asyncio.start_server(_handle_graceful, HOST, 0, backlog=1024)
    else:
        srv = await asyncio.start_server(_handle_close, HOST, 0, backlog=1024)
    ctl.send({"port": srv.sockets[0].getsockname()[1]})

    def stats(_: object) -> dict[str, Any]:
        return {"closed": _Stats.closed, "errors": _Stats.errors, "outcomes": dict(_Stats.outcomes)}

    try:
        await serve_commands(ctl, {"stats": stats})
    finally:
        srv.close()


def _run_one(cfg: Config, loop_name: str, variant: str) -> dict[str, Any]:
    with Child(f"{__name__}:server", loop_name, {"variant": variant}) as srv:
        cpu, client = run_load(
            srv,
            "benchmarks._load:oneshot_client",
            {
                "port": srv.ready["port"],
                "concurrency": CONCURRENCY,
                "duration": cfg.duration,
                "max_conns": MAX_CONNS,
            },
            timeout=cfg.duration + 60,
        )
        stats = srv.request("stats")
    closed = stats["closed"]
    return {
        "server_cpu_s": cpu,
        "connections": closed,
        "cpu_us_per_conn": cpu / closed * 1e6 if closed else float("nan"),
        "conn_per_s": client["connections"] / client["elapsed"] if client["elapsed"] else 0.0,
        "client": client,
        "server_errors": stats["errors"],
        "outcomes": stats["outcomes"],
    }


def run(cfg: Config) -> Section:
    """Run the benchmark; return its section of the report."""
    section = Section(
        name=NAME,
        title="2. Connection lifecycle",
        what=(
            f"{CONCURRENCY} concurrent clients, each connecting, sending one "
            f"{REQUEST_SIZE}-byte request, reading the {len(REPLY)}-byte reply and closing, "
            f"for {cfg.duration:.1f} s (at most {MAX_CONNS:,} connections). Server CPU per "
            "connection is the figure; ratios are against the bare protocol's plain close "
            f"(target <= {TARGET} on uvloop for the aiograceful servers). `streams-close` is "
            "`writer.close()` on a streams server, shown for scale."
        ),
        columns=[
            Column("loop", "loop"),
            Column("variant", "server"),
            Column("cpu_us_per_conn", "server CPU/connection (us)", "{:.1f}"),
            Column("conn_per_s", "connections/s", "{:,.0f}"),
            Column("ratio", "CPU ratio vs bare (median)", "{:.3f}"),
            Column("ratios", "per-repeat ratios"),
            Column("target", "target"),
        ],
    )
    section.runs = paired(cfg, VARIANTS, lambda lp, v, _r: _run_one(cfg, lp, v))
    section.rows = ratio_rows(
        section.runs,
        cfg.loops,
        VARIANTS,
        "bare",
        "cpu_us_per_conn",
        ["cpu_us_per_conn", "conn_per_s"],
    )
    for row in section.rows:
        if row["loop"] == "uvloop" and row["variant"] in ("graceful", "streams-graceful"):
            row["target"] = f"<= {TARGET}"
    lost = collections.Counter[str]()
    outcomes = collections.Counter[str]()
    for r in section.runs:
        client = r["client"]
        lost.update({k: client[k] for k in ("short", "reset", "errors") if client[k]})
        outcomes.update(r["outcomes"])
    section.notes.append(
        "Client-side failures over all runs: "
        + (", ".join(f"{k} {v}" for k, v in sorted(lost.items())) or "none")
        + ". aiograceful close outcomes: "
        + (", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "none")
        + "."
    )
    return section
