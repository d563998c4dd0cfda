"""``python -m benchmarks [NAME ...] [--quick] [--loop LOOP ...] [--repeats N] [--duration S]``.

Runs every benchmark on uvloop and on asyncio's default loop, prints each
table as it completes, and writes ``benchmarks/results/latest.md`` and
``latest.json`` (``quick.md``/``quick.json`` with ``--quick``; a run of some
benchmarks only writes ``latest-NAME.md``, so the full run's page stays).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ._harness import CLIENT_LOOP, LOOPS, Config, have_uvloop, machine_info, raise_nofile_limit
from ._report import Section, render_section, write_results

BENCHMARKS = ("keepalive", "lifecycle", "latency", "linger_scale", "shutdown", "wrk")
RESULTS = Path(__file__).resolve().parent / "results"

# Load average above this (per usable CPU) when a run starts means something
# else was using the CPUs: the report says so.
_BUSY_LOAD_PER_CPU = 0.25


def _config(args: argparse.Namespace) -> Config:
    loops = tuple(args.loop) if args.loop else LOOPS
    if not have_uvloop():
        loops = tuple(lp for lp in loops if lp != "uvloop")
    if args.quick:
        cfg = Config(quick=True, repeats=1, duration=0.5, scale=1000, samples=100, loops=loops)
    else:
        cfg = Config(quick=False, repeats=5, duration=2.0, scale=10_000, samples=1000, loops=loops)
    if args.repeats:
        cfg = Config(**{**cfg.__dict__, "repeats": args.repeats, "explicit_repeats": args.repeats})
    if args.duration:
        cfg = Config(**{**cfg.__dict__, "duration": args.duration})
    if args.scale:
        cfg = Config(**{**cfg.__dict__, "scale": args.scale})
    return cfg


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; return the exit status (0 unless a benchmark could not run)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run ({', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only these")
    parser.add_argument("--loop", action="append", choices=LOOPS, help="run only on these loops")
    parser.add_argument("--repeats", type=int, help="repeats per pair (default 5; --quick 1)")
    parser.add_argument("--scale", type=int, help="connections for the 10k benchmarks")
    parser.add_argument(
        "--duration", type=float, help="seconds of load per run (default 2; --quick 0.5; wrk: >= 1)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r} (choose from {', '.join(BENCHMARKS)})")
    cfg = _config(args)
    raise_nofile_limit()
    names = [*args.names, *(args.only or [])] or list(BENCHMARKS)
    machine = machine_info()
    load_before = _load()
    started = time.time()
    command = "python -m benchmarks" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    if not have_uvloop():
        print("uvloop is not installed: running on asyncio only (pip install -e '.[bench]')")
    print(
        f"{command}: {', '.join(names)} on {', '.join(cfg.loops)}; repeats={cfg.repeats}"
        + (" (wrk: 3 unless --repeats)" if "wrk" in names and not args.repeats else "")
    )
    sections: list[Section] = []
    status = 0
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        t0 = time.monotonic()
        try:
            result: Section | list[Section] = module.run(cfg)
            produced = result if isinstance(result, list) else [result]
        except Exception:
            status = 1
            failed = Section(name=name, title=name, what="", columns=[])
            failed.skipped = "it failed:\n\n```\n" + traceback.format_exc() + "```"
            produced = [failed]
        sections.extend(produced)
        for section in produced:
            print(render_section(section))
        print(f"({name}: {time.monotonic() - t0:.1f} s)\n", flush=True)
    meta = _meta(cfg, machine, command, started, load_before)
    stem = "quick" if cfg.quick else "latest"
    if set(names) != set(BENCHMARKS):
        # A partial run does not replace the full run's page.
        stem += "-" + "-".join(names)
    md_path, json_path = write_results(args.out, stem, meta, sections)
    print(f"wrote {md_path} and {json_path}")
    return status


def _meta(
    cfg: Config, machine: dict[str, Any], command: str, started: float, load_before: list[float]
) -> dict[str, Any]:
    load_after = _load()
    busy = max(load_before[0], load_after[0]) / max(1, machine["cpus_usable"])
    note = None
    if busy > _BUSY_LOAD_PER_CPU:
        note = (
            f"The machine was shared: the 1-minute load average was {load_before[0]} "
            f"before and {load_after[0]} after the run on {machine['cpus_usable']} CPUs, "
            "so other work competed for the CPUs. Ratios of server CPU time hold up "
            "better than throughput under such load; treat throughput as indicative."
        )
    return {
        "command": command,
        "started": datetime.datetime.fromtimestamp(started, datetime.UTC).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        ),
        "duration_s": time.time() - started,
        "machine": machine,
        "config": cfg.__dict__,
        "client_loop": CLIENT_LOOP if have_uvloop() else "asyncio",
        "load_before": load_before,
        "load_after": load_after,
        "shared_note": note,
    }


if __name__ == "__main__":
    sys.exit(main())
