"""Instructions and syscalls per connection, counted rather than timed.

``python -m benchmarks.per_connection [--tool callgrind|strace] [--loop uvloop] [-n 400]``
(not part of ``python -m benchmarks``): each server of ``_wrk_servers.py`` runs
in a process of its own under a counting tool, takes ``--warmup`` sequential
``Connection: close`` requests from a blocking client in this process, then
``-n`` more with the counter on; the figure is the count over those ``-n``
divided by ``-n``. Counts do not move with the machine's load, which wall-clock
CPU on a shared 2-core machine does (+-30 %).

* ``callgrind``: user-space instructions (``valgrind --tool=callgrind``,
  collection switched on by ``callgrind_control -i on`` after the warm-up):
  the interpreter, the compiled modules, uvloop and libc; the kernel is not in
  it. ``--annotate`` prints the top functions (inclusive) of one server.
* ``strace``: system calls (``strace -f -c``), counted over the whole life of
  the process and minus the same process's count with no measured connection
  (the difference of two runs: start-up and exit cancel).

The client is the same for every server: connect, send the request, read to
EOF, close. ``AIOGRACEFUL_NO_EXTENSIONS=1`` in the environment measures the
pure-Python path.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ._wrk_servers import KINDS

ROOT: Final = Path(__file__).resolve().parent.parent
REQUEST: Final = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
_IO_TIMEOUT: Final = 60.0  # per request, under valgrind: every loop is bounded


def _request(port: int) -> int:
    """One request on a fresh connection; the bytes of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=_IO_TIMEOUT) as sock:
        sock.sendall(REQUEST)
        got = 0
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return got
            got += len(chunk)


def _start(kind: str, loop: str, wrapper: Sequence[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    cmd = [*wrapper, sys.executable, "-m", "benchmarks._wrk_servers", kind, loop]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the server prints its port, then serves
    if not line.strip():
        raise RuntimeError(f"the server exited before printing its port ({proc.args!r})")
    return int(line)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=300)


def _drive(port: int, count: int) -> None:
    for _ in range(count):
        if not _request(port):
            raise RuntimeError("empty reply")


def callgrind(kind: str, loop: str, warmup: int, count: int, out: Path) -> int:
    """Instructions the server ran for ``count`` connections."""
    wrapper = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]
    proc = _start(kind, loop, wrapper)
    try:
        port = _port(proc)
        _drive(port, warmup)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        time.sleep(0.5)  # the server is idle: nothing to count meanwhile
        _drive(port, count)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(proc.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        _stop(proc)
    text = out.read_text(errors="replace")
    found = re.search(r"^totals: (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no totals in {out}")
    return int(found.group(1))


def _strace_calls(kind: str, loop: str, count: int, out: Path) -> dict[str, int]:
    proc = _start(kind, loop, ["strace", "-f", "-c", "-o", str(out)])
    try:
        port = _port(proc)
        _drive(port, count)
    finally:
        _stop(proc)
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        # "% time seconds usecs/call calls [errors] syscall"
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls


def strace(kind: str, loop: str, warmup: int, count: int, out: Path) -> dict[str, float]:
    """System calls per connection, by name (the difference of two runs)."""
    base = _strace_calls(kind, loop, warmup, out)
    more = _strace_calls(kind, loop, warmup + count, out)
    per = {name: (more.get(name, 0) - base.get(name, 0)) / count for name in set(base) | set(more)}
    return {name: value for name, value in sorted(per.items()) if abs(value) >= 0.05}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.per_connection")
    parser.add_argument("--tool", choices=("callgrind", "strace"), default="callgrind")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    parser.add_argument("-n", "--count", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--annotate", action="store_true", help="callgrind: top functions")
    args = parser.parse_args(argv)
    if shutil.which("valgrind" if args.tool == "callgrind" else "strace") is None:
        sys.exit(f"{args.tool} is not installed")
    path = "pure" if os.environ.get("AIOGRACEFUL_NO_EXTENSIONS") else "default"
    print(f"# {args.tool}, {args.loop}, {args.count} connections, path={path}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            out = Path(tmp) / f"{kind}.out"
            if args.tool == "callgrind":
                total = callgrind(kind, args.loop, args.warmup, args.count, out)
                print(f"| {kind} | {total / args.count:,.0f} |", flush=True)
                if args.annotate:
                    subprocess.run(
                        ["callgrind_annotate", "--inclusive=yes", str(out)],
                        check=False,
                        timeout=300,
                    )
            else:
                per = strace(kind, args.loop, args.warmup, args.count, out)
                total_calls = sum(per.values())
                names = ", ".join(f"{name} {value:.2f}" for name, value in per.items())
                print(f"| {kind} | {total_calls:.2f} | {names} |", flush=True)


if __name__ == "__main__":
    main()
