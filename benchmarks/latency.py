"""Benchmark 3: how long a graceful close takes with a cooperative peer.

The client connects, sends a request, reads the reply and closes at once: the
peer a lingering close hopes for. The server times its close, from just after
writing the reply to the transport being gone (``connection_lost``), with
``time.perf_counter()``:

* ``graceful_close``: ``await aiograceful.graceful_close(writer)`` on a streams server.
* ``close_gracefully``: ``GracefulProtocol.close_gracefully()``, until ``connection_lost``.
* ``fixed-500ms``: half-close, sleep 500 ms, close: what Go's net/http does
  (its ``rstAvoidanceDelay``) instead of waiting for the peer's FIN.
* ``plain-close``: ``writer.close()`` and ``await writer.wait_closed()``, no
  linger at all (and so no protection from H1), for scale.

One connection at a time, so the figure is the round trip and not a queue.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from aiograceful import GracefulProtocol, graceful_close

from ._harness import HOST, Child, Config, Control, median, percentile, run_load, serve_commands
from ._load import REPLY, REQUEST_SIZE
from ._report import Column, Section

NAME = "latency"
VARIANTS = ("graceful_close", "close_gracefully", "fixed-500ms", "plain-close")
FIXED_DELAY: Final = 0.5
FIXED_SAMPLES: Final = 6  # each takes half a second; a few suffice for a sleep

_samples: list[float] = []


async def _read_request(reader: asyncio.StreamReader) -> None:
    try:
        await reader.readexactly(REQUEST_SIZE)
    except (asyncio.IncompleteReadError, OSError):
        pass


async def _handle_graceful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(REPLY)
    t0 = time.perf_counter()
    await graceful_close(writer)
    _samples.append(time.perf_counter() - t0)


async def _handle_fixed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(REPLY)
    t0 = time.perf_counter()
    # Go's closeWriteAndWait: CloseWrite, sleep rstAvoidanceDelay, then Close.
    writer.write_eof()
    await asyncio.sleep(FIXED_DELAY)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    _samples.append(time.perf_counter() - t0)


async def _handle_plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    writer.write(REPLY)
    t0 = time.perf_counter()
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    _samples.append(time.perf_counter() - t0)


class _Timed(GracefulProtocol):
    pending = 0
    t0 = 0.0

    def data_received(self, data: bytes) -> None:
        before = self.pending
        self.pending += len(data)
        if before < REQUEST_SIZE <= self.pending:
            self.transport.write(REPLY)
            self.t0 = time.perf_counter()
            self.close_gracefully()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.t0:
            _samples.append(time.perf_counter() - self.t0)


async def server(ctl: Control, args: dict[str, Any]) -> None:
    """The server child."""
    variant = args["variant"]
    srv: asyncio.AbstractServer
    if variant == "close_gracefully":
        srv = await asyncio.get_running_loop().create_server(_Timed, HOST, 0)
    else:
        handler = {
            "graceful_close": _handle_graceful,
            "fixed-500ms": _handle_fixed,
            "plain-close": _handle_plain,
        }[variant]
        srv = await asyncio.start_server(handler, HOST, 0)
    ctl.send({"port": srv.sockets[0].getsockname()[1]})
    try:
        await serve_commands(ctl, {"samples": lambda _: list(_samples)})
    finally:
        srv.close()


def _run_one(cfg: Config, loop_name: str, variant: str) -> list[float]:
    count = FIXED_SAMPLES if variant == "fixed-500ms" else cfg.samples
    with Child(f"{__name__}:server", loop_name, {"variant": variant}) as srv:
        run_load(
            srv,
            "benchmarks._load:oneshot_client",
            {"port": srv.ready["port"], "concurrency": 1, "duration": 30.0, "max_conns": count},
            timeout=90,
        )
        # The server records a sample once its close is over, which may be
        # after the client saw the reply: wait (bounded) for the last ones.
        samples: list[float] = []
        for _ in range(40):
            samples = srv.request("samples")
            if len(samples) >= count:
                break
            time.sleep(0.05)
    return samples


def run(cfg: Config) -> Section:
    """Run the benchmark; return its section of the report."""
    repeats = min(cfg.repeats, 3)
    section = Section(
        name=NAME,
        title="3. graceful_close latency, cooperative peer",
        what=(
            "Server-side time from just after writing the reply until the connection is "
            "gone, one connection at a time on loopback; the client closes as soon as it "
            f"has read the reply. {cfg.samples} samples per run ({FIXED_SAMPLES} for the "
            f"fixed delay), {repeats} run(s) per loop, pooled. `fixed-500ms` is Go's "
            "rstAvoidanceDelay (half-close, sleep 500 ms, close), measured the same way; "
            "`plain-close` has no linger at all."
        ),
        columns=[
            Column("loop", "loop"),
            Column("variant", "close"),
            Column("n", "samples", "{:d}"),
            Column("median_us", "median (us)", "{:,.0f}"),
            Column("p99_us", "p99 (us)", "{:,.0f}"),
            Column("max_us", "max (us)", "{:,.0f}"),
            Column("vs_fixed", "fixed-500ms median / this median", "{:,.0f}x"),
        ],
    )
    pooled: dict[tuple[str, str], list[float]] = {}
    for repeat in range(repeats):
        for loop_name in cfg.loops:
            for variant in VARIANTS:
                samples = _run_one(cfg, loop_name, variant)
                pooled.setdefault((loop_name, variant), []).extend(samples)
                section.runs.append(
                    {
                        "loop": loop_name,
                        "variant": variant,
                        "repeat": repeat,
                        "n": len(samples),
                        "median_s": median(samples),
                        "p99_s": percentile(samples, 99),
                    }
                )
    for loop_name in cfg.loops:
        fixed = median(pooled.get((loop_name, "fixed-500ms"), []))
        for variant in VARIANTS:
            samples = pooled.get((loop_name, variant), [])
            mid = median(samples)
            row: dict[str, Any] = {
                "loop": loop_name,
                "variant": variant,
                "n": len(samples),
                "median_us": mid * 1e6,
                "p99_us": percentile(samples, 99) * 1e6,
                "max_us": max(samples) * 1e6 if samples else float("nan"),
            }
            if variant != "fixed-500ms" and mid > 0:
                row["vs_fixed"] = fixed / mid
            section.rows.append(row)
    return section
