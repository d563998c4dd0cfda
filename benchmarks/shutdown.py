"""Benchmark 5: shutting down a server that holds many connections.

The client opens N connections (10,000 by default), sends a request on each
and reads the reply. The clients are cooperative: each closes as soon as the
server's FIN arrives. Then the server runs ``await server.shutdown(grace=...)``
and the figure is the time from that call to the :class:`ShutdownReport`,
beside the count of connections that the clients saw reset (target 0).

* ``protocol``: ``aiograceful.create_server`` with a ``GracefulProtocol``
  whose ``on_shutdown_notice`` is the default (a graceful close).
* ``streams``: ``aiograceful.start_server``; the handler answers, then waits
  for ``server.notice`` and returns, and the server closes its writer
  gracefully.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Final

import aiograceful
from aiograceful import GracefulProtocol

from ._harness import HOST, Child, Config, Control, fit_scale, median, serve_commands, wait_until
from ._load import REPLY, REQUEST_SIZE
from ._report import Column, Section

NAME = "shutdown"
VARIANTS = ("protocol", "streams")
GRACE: Final = 10.0
INFLIGHT: Final = 256


class _Stats:
    replied = 0


class _Hold(GracefulProtocol):
    """Reply to the request; keep the connection until the shutdown's notice."""

    pending = 0

    def data_received(self, data: bytes) -> None:
        before = self.pending
        self.pending += len(data)
        if before < REQUEST_SIZE <= self.pending:
            self.transport.write(REPLY)
            _Stats.replied += 1


_server: list[aiograceful.GracefulServer] = []


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readexactly(REQUEST_SIZE)
    except (asyncio.IncompleteReadError, OSError):
        return
    writer.write(REPLY)
    _Stats.replied += 1
    # Bounded: the shutdown comes within the benchmark's own deadlines.
    async with asyncio.timeout(600):
        await _server[0].notice.wait()


async def server(ctl: Control, args: dict[str, Any]) -> None:
    """The server child."""
    if args["variant"] == "protocol":
        srv = await aiograceful.create_server(_Hold, HOST, 0, backlog=4096, grace=GRACE)
    else:
        srv = await aiograceful.start_server(_handle, HOST, 0, backlog=4096, grace=GRACE)
    _server.append(srv)
    ctl.send({"port": srv.sockets[0].getsockname()[1], "nofile": args["nofile"]})

    async def wait_replied(count: object) -> dict[str, int]:
        assert isinstance(count, int)
        await wait_until(lambda: _Stats.replied >= count, 30.0)
        return {"replied": _Stats.replied, "connections": srv.connections}

    async def shutdown(_: object) -> dict[str, Any]:
        c0 = time.process_time()
        w0 = time.perf_counter()
        report = await srv.shutdown(grace=GRACE)
        wall = time.perf_counter() - w0
        return {
            "wall_s": wall,
            "cpu_s": time.process_time() - c0,
            "duration_s": report.duration,
            "connections": report.connections,
            "closed_clean": report.closed_clean,
            "forced": report.forced,
            "drained": report.drained,
            "outcomes": {k.name: v for k, v in report.outcomes.items()},
            "left": srv.connections,
        }

    try:
        await serve_commands(ctl, {"wait_replied": wait_replied, "shutdown": shutdown})
    finally:
        if not srv.notice.is_set():
            await srv.shutdown(grace=0.0)


def _run_one(cfg: Config, loop_name: str, variant: str) -> dict[str, Any]:
    with Child(f"{__name__}:server", loop_name, {"variant": variant}) as srv:
        args = {
            "port": srv.ready["port"],
            "conns": cfg.scale,
            "inflight": INFLIGHT,
            "cooperative": True,
        }
        with Child("benchmarks._load:silent_client", "uvloop", args) as client:
            opened = client.request("open", timeout=120)
            held = srv.request("wait_replied", opened["opened"], timeout=60)
            report = srv.request("shutdown", timeout=GRACE + 60)
            seen = client.request("wait_closed", 10.0, timeout=30)
    return {
        "n": opened["opened"],
        "held": held,
        "connect_errors": opened["connect_errors"],
        "report": report,
        "client": seen,
    }


def run(cfg: Config) -> Section:
    """Run the benchmark; return its section of the report."""
    repeats = min(cfg.repeats, 3)
    scale, scale_note = fit_scale(cfg.scale)
    cfg = dataclasses.replace(cfg, scale=scale)
    section = Section(
        name=NAME,
        title=f"5. Shutdown of {cfg.scale:,} connections, cooperative clients",
        what=(
            f"{cfg.scale:,} open connections, each answered once; the clients close as "
            "soon as the server's FIN arrives. Time from `await server.shutdown("
            f"grace={GRACE:g})` to its report (target < 1 s on uvloop), the server's CPU "
            "for it, and what the clients saw: resets (target 0) and connections left "
            f"open. {repeats} run(s), medians; counts are totals over the runs."
        ),
        columns=[
            Column("loop", "loop"),
            Column("variant", "server"),
            Column("n", "connections", "{:,d}"),
            Column("duration_ms", "shutdown() to report (ms)", "{:,.0f}"),
            Column("cpu_us_per_conn", "server CPU/connection (us)", "{:.1f}"),
            Column("clean", "closed within grace", "{:,d}"),
            Column("forced", "forced", "{:,d}"),
            Column("resets", "RSTs seen by clients", "{:,d}"),
            Column("left_open", "left open", "{:,d}"),
            Column("target", "target"),
        ],
    )
    for repeat in range(repeats):
        for loop_name in cfg.loops:
            for variant in VARIANTS:
                section.runs.append(
                    {
                        "loop": loop_name,
                        "variant": variant,
                        "repeat": repeat,
                        **_run_one(cfg, loop_name, variant),
                    }
                )
    for loop_name in cfg.loops:
        for variant in VARIANTS:
            runs = [r for r in section.runs if r["loop"] == loop_name and r["variant"] == variant]
            section.rows.append(
                {
                    "loop": loop_name,
                    "variant": variant,
                    "n": int(median(r["n"] for r in runs)),
                    "duration_ms": median(r["report"]["duration_s"] * 1e3 for r in runs),
                    "cpu_us_per_conn": median(
                        r["report"]["cpu_s"] / r["n"] * 1e6 for r in runs if r["n"]
                    ),
                    "clean": sum(r["report"]["closed_clean"] for r in runs),
                    "forced": sum(r["report"]["forced"] for r in runs),
                    "resets": sum(r["client"]["reset"] for r in runs),
                    "left_open": sum(r["client"]["still_open"] for r in runs),
                    "target": "< 1000 ms, 0 RST" if loop_name == "uvloop" else "",
                }
            )
    errors = sum(r["connect_errors"] for r in section.runs)
    outcomes: dict[str, int] = {}
    for r in section.runs:
        for name, count in r["report"]["outcomes"].items():
            outcomes[name] = outcomes.get(name, 0) + count
    section.notes.append(
        f"Connect errors: {errors}. Close outcomes over all runs: "
        + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        + "."
    )
    if scale_note:
        section.notes.append(scale_note)
    return section
