"""Process plumbing shared by the benchmarks: children, control pipes, meters.

Every measurement runs in two child processes started by the orchestrator
(``python -m benchmarks``): a *server* on the event loop under test and a
*client* (the load generator). They talk to the orchestrator over a
``multiprocessing`` pipe; each child reads its pipe from inside its event loop
(``loop.add_reader`` on the pipe's descriptor), so a server can be asked for a
CPU reading while it serves.

A server's figures come from inside the server process: CPU time from
``time.process_time()`` (user + system time of the whole process), resident
memory from ``/proc/self/status``. Those hold on a shared machine, where
wall-clock figures do not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.metadata
import inspect
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

__all__ = [
    "CLIENT_LOOP",
    "LOOPS",
    "Child",
    "Config",
    "Control",
    "cpu_seconds",
    "fit_scale",
    "loop_factory",
    "machine_info",
    "median",
    "percentile",
    "raise_nofile_limit",
    "rss_bytes",
    "serve_commands",
    "wait_until",
]

#: The loops a benchmark runs each server on, in report order.
LOOPS: Final = ("uvloop", "asyncio")
#: The load generator runs on this loop whatever the server's loop is, so that
#: only the server changes between the two columns of a pair.
CLIENT_LOOP: Final = "uvloop"

HOST: Final = "127.0.0.1"

# "spawn": each child starts from a clean interpreter, so nothing the
# orchestrator imported or allocated shows in a child's memory figures.
_CTX: Final = multiprocessing.get_context("spawn")


class BenchError(RuntimeError):
    """A benchmark could not run (a child failed, hung, or gave a bad answer)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """How big and how long a run is."""

    quick: bool
    repeats: int
    #: Seconds of load per throughput run (keep-alive, lifecycle).
    duration: float
    #: Connections for the scale benchmarks (lingering, shutdown).
    scale: int
    #: Samples per latency run.
    samples: int
    loops: tuple[str, ...] = LOOPS
    #: ``--repeats`` when given: benchmarks with a default of their own (wrk) follow it.
    explicit_repeats: int | None = None


def have_uvloop() -> bool:
    """True if uvloop can be imported."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop factory for ``name`` ("uvloop" or "asyncio")."""
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    if name == "asyncio":
        # The default loop on Linux: the selector loop over epoll.
        return asyncio.SelectorEventLoop
    raise ValueError(f"unknown loop {name!r}")


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft


def nofile_limit() -> tuple[int, int]:
    """This process's (soft, hard) RLIMIT_NOFILE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fit_scale(wanted: int, spare: int = 200) -> tuple[int, str | None]:
    """The connection count one process can hold under its hard fd limit, and a note if cut.

    Each child raises its soft limit to the hard one; a server holding N
    connections needs N descriptors plus a few (listener, pipes, the loop's own).
    """
    hard = nofile_limit()[1]
    if hard == resource.RLIM_INFINITY or wanted + spare <= hard:
        return wanted, None
    scaled = max(1, hard - spare)
    return scaled, (
        f"Scaled down from {wanted:,} to {scaled:,} connections: the RLIMIT_NOFILE hard "
        f"limit is {hard:,} (raise it, e.g. `ulimit -Hn`, as root, to run the full count)."
    )


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    return time.process_time()


def rss_bytes() -> int:
    """This process's resident set size, from ``/proc/self/status`` (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Not Linux: the peak (ru_maxrss, KiB on Linux, bytes on macOS) is the best left.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def median(values: Iterable[float]) -> float:
    """The median, or NaN for no values."""
    data = list(values)
    return statistics.median(data) if data else math.nan


def percentile(values: Iterable[float], pct: float) -> float:
    """The nearest-rank percentile ``pct`` (0-100), or NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(data)))
    return data[min(rank, len(data)) - 1]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    try:
        uvloop_version = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop_version = "not installed"
    import aiograceful

    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "uvloop": uvloop_version,
        "aiograceful": aiograceful.__version__,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "nofile_hard_limit": nofile_limit()[1],
    }


# -- children ----------------------------------------------------------------


class Control:
    """A child's end of its pipe to the orchestrator, read from inside the loop."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn
        self._queue: asyncio.Queue[tuple[str, Any]] | None = None

    def send(self, message: Any) -> None:
        """Send ``message`` to the orchestrator (a small picklable value)."""
        self._conn.send(message)

    async def recv(self) -> tuple[str, Any]:
        """The next ``(command, payload)`` from the orchestrator."""
        queue = self._queue
        if queue is None:
            queue = self._queue = asyncio.Queue()
            asyncio.get_running_loop().add_reader(self._conn.fileno(), self._readable)
        return await queue.get()

    def _readable(self) -> None:
        queue = self._queue
        assert queue is not None
        try:
            while self._conn.poll():
                queue.put_nowait(self._conn.recv())
        except (EOFError, OSError):
            # The orchestrator is gone: stop.
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            queue.put_nowait(("stop", None))

    def close(self) -> None:
        """Stop reading the pipe (call inside the loop, before it closes)."""
        if self._queue is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._conn.fileno())
            except (RuntimeError, ValueError, OSError):
                pass


ChildMain = Callable[[Control, dict[str, Any]], Awaitable[None]]


def _resolve(target: str) -> ChildMain:
    module_name, _, attr = target.partition(":")
    fn: ChildMain = getattr(importlib.import_module(module_name), attr)
    return fn


def _child_entry(
    conn: multiprocessing.connection.Connection,
    target: str,
    loop_name: str,
    args: dict[str, Any],
) -> None:
    """A child process: raise the fd limit, build the loop, run ``target``."""
    try:
        args = {**args, "nofile": raise_nofile_limit()}
        fn = _resolve(target)
        ctl = Control(conn)

        async def main() -> None:
            try:
                await fn(ctl, args)
            finally:
                ctl.close()

        with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
            runner.run(main())
    except BaseException:
        try:
            conn.send({"error": traceback.format_exc()})
        except OSError:
            pass
        raise
    finally:
        conn.close()


class Child:
    """A child process running ``target`` ("module:function") on one loop.

    The child's first message (its "ready" answer) is in :attr:`ready`.
    """

    def __init__(
        self,
        target: str,
        loop_name: str,
        args: Mapping[str, Any],
        *,
        ready_timeout: float = 60.0,
    ) -> None:
        self.target = target
        self.loop_name = loop_name
        parent, child = _CTX.Pipe()
        self._conn = parent
        self._proc = _CTX.Process(
            target=_child_entry,
            args=(child, target, loop_name, dict(args)),
            daemon=True,
            name=f"bench:{target}:{loop_name}",
        )
        self._proc.start()
        child.close()
        try:
            self.ready: Any = self.recv(ready_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._proc.pid

    def send(self, command: str, payload: Any = None) -> None:
        """Send ``(command, payload)``."""
        self._conn.send((command, payload))

    def recv(self, timeout: float) -> Any:
        """The child's next message; raise :class:`BenchError` on an error or after ``timeout``."""
        if not self._conn.poll(timeout):
            raise BenchError(f"{self.target} on {self.loop_name}: no answer within {timeout:.0f} s")
        try:
            message = self._conn.recv()
        except EOFError:
            raise BenchError(f"{self.target} on {self.loop_name}: exited") from None
        if isinstance(message, dict) and "error" in message:
            raise BenchError(f"{self.target} on {self.loop_name} failed:\n{message['error']}")
        return message

    def request(self, command: str, payload: Any = None, *, timeout: float = 60.0) -> Any:
        """Send a command and return the answer."""
        self.send(command, payload)
        return self.recv(timeout)

    def close(self, timeout: float = 15.0) -> None:
        """Ask the child to stop; terminate it if it does not within ``timeout``."""
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", None))
            except OSError:
                pass
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)
        self._conn.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


Handler = Callable[[Any], Any]


async def serve_commands(ctl: Control, handlers: Mapping[str, Handler]) -> None:
    """Answer the orchestrator's commands until "stop".

    Built in: "mark" starts a CPU measurement, "cpu" returns the CPU seconds
    since the mark, "rss" the resident set size now. A handler may return an
    awaitable; its result is the answer.
    """
    mark = cpu_seconds()
    builtin: dict[str, Handler] = {
        "cpu": lambda _payload: cpu_seconds() - mark,
        "rss": lambda _payload: rss_bytes(),
    }
    while True:
        command, payload = await ctl.recv()
        if command == "stop":
            return
        if command == "mark":
            mark = cpu_seconds()
            ctl.send(None)
            continue
        handler = handlers.get(command) or builtin.get(command)
        if handler is None:
            ctl.send({"error": f"unknown command {command!r}"})
            continue
        answer = handler(payload)
        if inspect.isawaitable(answer):
            answer = await answer
        ctl.send(answer)


def run_load(
    server: Child,
    client_target: str,
    client_args: Mapping[str, Any],
    *,
    timeout: float,
) -> tuple[float, Any]:
    """Run one client against ``server``: mark, go, wait; return (server CPU s, client result).

    The client child is started and ready before the mark, so its start-up
    costs the server nothing that is measured.
    """
    with Child(client_target, CLIENT_LOOP if have_uvloop() else "asyncio", client_args) as client:
        server.request("mark")
        client.send("go")
        result = client.recv(timeout)
        cpu = float(server.request("cpu"))
    return cpu, result


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` every ``interval`` s for at most ``timeout`` s; return its last value."""
    for _ in range(max(1, math.ceil(timeout / interval))):
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()
