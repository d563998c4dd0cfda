"""The command line: ``python -m aiograceful demo`` and ``python -m aiograceful probe``.

Errors a user can meet (a bad option, a bad ``HOST:PORT``, a host that cannot
be reached, uvloop asked for but missing) print one line on stderr and exit
with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
from collections.abc import Sequence
from typing import Final, NoReturn

from . import demo as _demo
from . import probe as _probe

__all__ = ["main"]

PROG: Final = "python -m aiograceful"
DEFAULT_ROUNDS: Final = 20
MAX_ROUNDS: Final = 200

EXIT_OK: Final = 0
EXIT_HAZARD: Final = 1
EXIT_USAGE: Final = 2


class UsageError(Exception):
    """A command-line mistake; its message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (and exit 2), not usage plus message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _rounds(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= MAX_ROUNDS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_ROUNDS}, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0 or value > 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600, got {text}")
    return value


_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
}


def _size(text: str) -> int:
    """A byte count: digits and a unit (K, M, G are KiB, MiB, GiB; KB, MB, GB are SI)."""
    stripped = text.strip()
    digits = stripped.rstrip("bBiIkKmMgG ")
    unit = stripped[len(digits) :].strip().lower()
    scale = _SIZE_UNITS.get(unit)
    try:
        if scale is None:
            raise ValueError(unit)
        value = int(digits, 10) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size (like 16M, 16MiB, 16MB): {text!r}") from None
    if not 0 < value <= 1 << 30:
        raise argparse.ArgumentTypeError(f"must be 1 byte to 1G, got {text}")
    return value


def _escaped(text: str) -> bytes:
    """``--send`` text with backslash escapes (``\\r\\n``) decoded, as bytes."""
    try:
        decoded, _ = codecs.escape_decode(text.encode("utf-8"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad escape in {text!r}: {exc}") from None
    if not isinstance(decoded, bytes) or not decoded:
        raise argparse.ArgumentTypeError("must not be empty")
    return decoded


def _servers(text: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in _demo.SERVERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"choose from {','.join(_demo.SERVERS)} or none, got {text!r}"
        )
    return list(dict.fromkeys(names))


def _path(text: str) -> str:
    if not text.startswith("/") or any(c in text for c in " \r\n"):
        raise argparse.ArgumentTypeError(f"must start with / and have no spaces: {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``demo`` and ``probe`` commands and their options."""
    parser = _Parser(
        prog=PROG,
        description="End asyncio TCP connections without losing data: see it, and check a server.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{demo,probe}", parser_class=_Parser)

    demo = commands.add_parser(
        "demo",
        help="run each hazard H1-H7 on loopback, naive close vs aiograceful, and stock "
        "uvicorn, hypercorn, aiohttp vs their drop-ins",
        description=(
            "Run each hazard H1-H7 of the design on 127.0.0.1 with real clients, first with "
            "the close real servers do (writer.close(), Server.close(), transport.abort(), a "
            "close timer, a plain restart), then with aiograceful, and print what the clients "
            "saw, each row in its own unit (replies, bytes, aborts, connections). Then the early "
            "413 (H1) "
            "and the shutdown race (H3) against stock uvicorn, hypercorn and aiohttp, each "
            "beside aiograceful's drop-in, in subprocesses. Exit 0 when aiograceful delivered "
            "everything, 1 otherwise, 2 on a usage error."
        ),
    )
    demo.add_argument(
        "--loop",
        choices=("asyncio", "uvloop", "both"),
        default=None,
        help="event loop(s) to run on (default: both when uvloop is installed, else asyncio); "
        "the drop-in rows run on the last",
    )
    demo.add_argument(
        "--rounds",
        type=_rounds,
        default=DEFAULT_ROUNDS,
        metavar="N",
        help=f"rounds per case, 1..{MAX_ROUNDS} (default {DEFAULT_ROUNDS})",
    )
    demo.add_argument(
        "--servers",
        type=_servers,
        default=None,
        metavar="LIST",
        help=f"stock servers for the drop-in rows, comma-separated, from {','.join(_demo.SERVERS)}"
        ", or 'none' (default: those installed); one not installed is skipped with a note",
    )

    probe = commands.add_parser(
        "probe",
        help="check a running server from outside for the same hazards",
        description=(
            "Check the server at HOST:PORT from outside: is an early answer reset away while "
            "the client still sends, does it answer after the client half-closes, is its idle "
            "close a FIN or a RST. Only HOST:PORT is contacted. Exit 0 when no hazard is "
            "found, 1 when one is, 2 when the probe cannot run."
        ),
    )
    probe.add_argument("target", metavar="HOST:PORT", help="the server, e.g. 127.0.0.1:8080")
    probe.add_argument(
        "--http", action="store_true", help="speak HTTP/1.1 (POST with a large body, GET)"
    )
    probe.add_argument("--path", type=_path, default="/", help="HTTP request path (default /)")
    probe.add_argument(
        "--send",
        type=_escaped,
        default=None,
        metavar="TEXT",
        help=r"raw request without --http, with \r\n escapes (default 'PING\r\n')",
    )
    probe.add_argument(
        "--body-size",
        type=_size,
        default=_probe.DEFAULT_BODY_SIZE,
        metavar="SIZE",
        help="bytes sent after the request in the early-answer check (default 16M)",
    )
    probe.add_argument(
        "--wait",
        type=_seconds,
        default=_probe.DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"how long to wait for an idle close (default {_probe.DEFAULT_WAIT:g})",
    )
    probe.add_argument(
        "--timeout",
        type=_seconds,
        default=_probe.DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"silence after which a step gives up (default {_probe.DEFAULT_TIMEOUT:g})",
    )
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    loops = _demo.available_loops()
    if args.loop == "both":
        if "uvloop" not in loops:
            raise UsageError("--loop both needs uvloop: pip install 'aiograceful[uvloop]'")
        names = list(_demo.LOOP_NAMES)
    elif args.loop is None:
        names = [name for name in _demo.LOOP_NAMES if name in loops]
    else:
        if args.loop not in loops:
            raise UsageError(f"--loop {args.loop}: uvloop is not installed")
        names = [args.loop]
    installed = _demo.installed_servers()
    wanted = installed if args.servers is None else args.servers
    rows = _demo.run_demo(
        names,
        args.rounds,
        servers=[name for name in wanted if name in installed],
        skipped=[name for name in wanted if name not in installed],
        out=lambda line: print(line, flush=True),
    )
    ok, line = _demo.summary(rows)
    print(line)
    return EXIT_OK if ok else EXIT_HAZARD


def _run_probe(args: argparse.Namespace) -> int:
    try:
        host, port = _probe.parse_target(args.target)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.send is not None and args.http:
        raise UsageError("--send is for raw probes; with --http the probe writes the requests")

    def show(verdict: _probe.Verdict) -> None:
        print(_probe.format_verdict(verdict), flush=True)

    def started(target: _probe.Target) -> None:
        # Printed once the server is reached: a connect error comes alone.
        print(
            f"aiograceful probe {target} ({'HTTP/1.1' if args.http else 'raw TCP'}); "
            f"idle-close wait up to {args.wait:g} s",
            flush=True,
        )

    try:
        _, verdicts = _probe.run_probe(
            host,
            port,
            http=args.http,
            path=args.path,
            send=args.send,
            body_size=args.body_size,
            wait=args.wait,
            timeout=args.timeout,
            progress=show,
            started=started,
        )
    except _probe.ProbeError as exc:
        print(f"{PROG} probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(_probe.format_report(verdicts))
    return _probe.exit_status(verdicts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError("choose a command: demo or probe (see --help)")
        if args.command == "demo":
            return _run_demo(args)
        return _run_probe(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
