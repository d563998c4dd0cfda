"""Restarts under load (hazard H7): a server process, new connections back to back, a restart.

Theory of operation: :func:`restart_under_load` starts a server process
(``python -m aiograceful._tools.restart``: an aiograceful ``start_server`` that
answers each connection's request with ``200`` and its pid), points client
threads at it (stdlib sockets, one new connection per request, back to
back), restarts the server in the middle, and counts what the clients saw:
requests answered, and failures by type (``ConnectionRefusedError`` while
no process listens, ``ConnectionResetError`` for a reset queue...).

* A plain restart: SIGTERM the old process (its shutdown drains its queue
  and loses no accepted connection), wait for it to exit, start the new one,
  which binds the port. Between the two, nobody listens: connects are refused.
* A handoff restart: start the new process with the same ``handoff`` path
  while the old one serves. It takes the old one's listening sockets, serves,
  and acknowledges; the old one stops accepting and exits 0. The kernel
  socket, and its queue, never close.

Every wait is bounded (:data:`STEP_TIMEOUT`); the clients stop by themselves.
The demo's H7 row and the tests use this module.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from .. import CloseOutcome

__all__ = [
    "REQUEST",
    "STEP_TIMEOUT",
    "Load",
    "LoadResult",
    "RestartResult",
    "ServerProcess",
    "main",
    "restart_under_load",
]

REQUEST: Final = b"GET / HTTP/1.0\r\nHost: restart\r\n\r\n"
_OK: Final = b"HTTP/1.0 200 OK\r\n"
#: Bound on each step of a restart (a process starting, a process exiting).
STEP_TIMEOUT: Final = 10.0
_HOST: Final = "127.0.0.1"


# -- the server process ----------------------------------------------------------------


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return
    body = str(os.getpid()).encode()
    writer.write(_OK + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


async def _serve(args: argparse.Namespace) -> int:
    from .. import start_server

    # A real service imports and configures itself before it listens.
    await asyncio.sleep(args.startup_delay)
    server = await start_server(
        _answer,
        _HOST,
        args.port,
        handoff=args.handoff,
        grace=args.grace,
        reuse_port=args.reuse_port or None,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY port={port} pid={os.getpid()}", flush=True)
    await server.serve_forever()
    stats = server.stats
    print(
        f"DONE handed_off={server.handed_off} closed={stats.closed} "
        f"clean={stats.outcomes[CloseOutcome.CLEAN]} drained={stats.drained}",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aiograceful._tools.restart``: serve ``200 <pid>`` until SIGTERM or a handoff."""
    parser = argparse.ArgumentParser(prog="python -m aiograceful._tools.restart")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--handoff", default=None)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args(argv)
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.SelectorEventLoop
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(args))


class ServerProcess:
    """A ``python -m aiograceful._tools.restart`` child; :meth:`ready` waits for its READY line."""

    def __init__(
        self,
        port: int,
        *,
        handoff: str | None = None,
        loop: str = "asyncio",
        startup_delay: float = 0.0,
        reuse_port: bool = False,
        quiet: bool = False,
    ) -> None:
        argv = [sys.executable, "-m", "aiograceful._tools.restart", "--port", str(port)]
        argv += ["--loop", loop, "--startup-delay", str(startup_delay)]
        if handoff is not None:
            argv += ["--handoff", handoff]
        if reuse_port:
            argv.append("--reuse-port")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder that holds aiograceful
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        stderr = subprocess.DEVNULL if quiet else None
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, env=env)
        self._buffer = b""
        self.lines: list[str] = []
        self.port = port

    def _line(self, deadline: float) -> str | None:
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        text = line.decode(errors="replace")
        self.lines.append(text)
        return text

    def ready(self, timeout: float = STEP_TIMEOUT) -> int:
        """Wait for READY; return the port. ``RuntimeError`` if it exits or times out first."""
        deadline = time.monotonic() + timeout
        for _ in range(100):
            line = self._line(deadline)
            if line is None:
                break
            if line.startswith("READY "):
                fields = dict(item.split("=", 1) for item in line.split()[1:])
                self.port = int(fields["port"])
                return self.port
        raise RuntimeError(f"the server process did not become ready: {self.lines}")

    def wait(self, timeout: float = STEP_TIMEOUT) -> int:
        """Wait for the process to exit (killing it after ``timeout``); its exit code."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout)
        deadline = time.monotonic() + 1.0
        while self._line(deadline) is not None:
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc

    def close(self) -> None:
        """Kill the process if it still runs; close its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STEP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> int:
        """SIGTERM, then :meth:`wait`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()


# -- the load ------------------------------------------------------------------------------


_BAD_SAMPLES: Final = 3
_BAD_BYTES: Final = 120


@dataclasses.dataclass
class LoadResult:
    """What the client threads saw."""

    #: Requests answered with 200.
    ok: int = 0
    #: Failed requests, by the exception's name (or ``"bad reply"``).
    failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    #: Distinct server pids that answered.
    pids: set[int] = dataclasses.field(default_factory=set)
    #: The first few replies that were not ``200 <pid>`` (their first bytes), to tell
    #: an empty reply (the connection closed unanswered) from a cut one.
    bad_replies: list[bytes] = dataclasses.field(default_factory=list)

    @property
    def failures(self) -> int:
        """How many requests failed."""
        return sum(self.failed.values())


class Load:
    """``threads`` clients making new connections back to back, until :meth:`stop`.

    Bounded: each socket operation by ``timeout``, each client by
    ``max_seconds`` and ``max_requests``.
    """

    def __init__(
        self,
        port: int,
        *,
        threads: int = 4,
        timeout: float = 3.0,
        max_seconds: float = 30.0,
        max_requests: int = 200_000,
    ) -> None:
        self.port = port
        self._timeout = timeout
        self._deadline = time.monotonic() + max_seconds
        self._max_requests = max_requests
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.result = LoadResult()
        self._threads = [
            threading.Thread(target=self._client, daemon=True, name=f"load-{i}")
            for i in range(threads)
        ]

    def start(self) -> Load:
        """Start the client threads."""
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> LoadResult:
        """Stop the clients and return what they saw."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout * 3)
        return self.result

    def _client(self) -> None:
        for _ in range(self._max_requests):
            if self._stop.is_set() or time.monotonic() > self._deadline:
                return
            failure: str | None = None
            pid = None
            bad = b""
            try:
                pid, bad = self._request()
            except OSError as exc:
                failure = type(exc).__name__
                if type(exc) is OSError:  # no subclass says what it was: the errno does
                    failure = f"OSError({exc.errno})"
            if pid is None and failure is None:
                failure = "bad reply"
            with self._lock:
                if failure is None:
                    assert pid is not None
                    self.result.ok += 1
                    self.result.pids.add(pid)
                else:
                    self.result.failed[failure] += 1
                    if failure == "bad reply" and len(self.result.bad_replies) < _BAD_SAMPLES:
                        self.result.bad_replies.append(bad)
            if failure == "ConnectionRefusedError":
                time.sleep(0.001)  # as a client's retry would: no busy loop

    def _request(self) -> tuple[int | None, bytes]:
        """One request on a new connection: the pid that answered (None: a bad reply), the reply."""
        with socket.create_connection((_HOST, self.port), timeout=self._timeout) as sock:
            sock.sendall(REQUEST)
            chunks = []
            for _ in range(64):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
        reply = b"".join(chunks)
        if not reply.startswith(_OK):
            return None, reply[:_BAD_BYTES]
        _head, _, body = reply.partition(b"\r\n\r\n")
        try:
            return int(body), b""
        except ValueError:
            return None, reply[:_BAD_BYTES]


# -- a restart under load -----------------------------------------------------------------


@dataclasses.dataclass
class RestartResult:
    """One restart under load: what the clients saw, and how the processes exited."""

    kind: str
    load: LoadResult
    old_exit: int
    new_exit: int
    seconds: float
    #: The old process's last line (``DONE handed_off=...``), if it printed one.
    old_done: str = ""


def restart_under_load(
    kind: str,
    *,
    loop: str = "asyncio",
    threads: int = 4,
    before: float = 0.4,
    after: float = 0.4,
    startup_delay: float = 0.2,
    workdir: str | None = None,
    quiet: bool = False,
) -> RestartResult:
    """Serve, load, restart (``kind``: ``"plain"`` or ``"handoff"``), load on, stop; what was seen.

    ``startup_delay`` is the time the new process takes before it listens
    (a real service imports and configures itself first); it is the same
    for both kinds, and only the plain restart has nobody listening then.
    ``quiet`` sends the server processes' stderr to /dev/null.
    """
    if kind not in ("plain", "handoff"):
        raise ValueError(f"kind must be 'plain' or 'handoff', got {kind!r}")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            import tempfile

            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="aiog-restart-"))
        path = os.path.join(workdir, "handoff.sock") if kind == "handoff" else None
        old = ServerProcess(0, handoff=path, loop=loop, quiet=quiet)
        new: ServerProcess | None = None
        try:
            port = old.ready()
            load = Load(port, threads=threads).start()
            time.sleep(before)
            if kind == "plain":
                old_exit = old.stop()
                new = ServerProcess(port, loop=loop, startup_delay=startup_delay, quiet=quiet)
                new.ready()
            else:
                new = ServerProcess(
                    port, handoff=path, loop=loop, startup_delay=startup_delay, quiet=quiet
                )
                new.ready()
                old_exit = old.wait()
            time.sleep(after)
            result = load.stop()
            new_exit = new.stop()
        finally:
            for proc in (old, new):
                if proc is not None:
                    proc.close()
    done = next((line for line in old.lines if line.startswith("DONE ")), "")
    return RestartResult(kind, result, old_exit, new_exit, time.monotonic() - started, done)


if __name__ == "__main__":
    sys.exit(main())
