"""Benchmark 6: the cost of a close, measured with an outside client (wrk).

wrk (Debian's package; the benchmark starts it, and skips naming it when it is
absent) drives each server with ``-t1 -c50``: with ``-H "Connection: close"``
every request is one connection (accept, request, reply, close), without it
the connections are kept alive. Each server runs in a process of its own
(``benchmarks/_wrk_servers.py``, started fresh for each run on a port the
kernel picks), and its CPU time (utime + stime) is read from
``/proc/PID/stat`` just before and just after wrk runs: nothing inside the
server measures itself.

The close rows, on uvloop and on asyncio side by side in one run:

* ``bare``: ``asyncio.Protocol`` + ``transport.close()`` (loses the reply when
  the client is still sending; wrk never is).
* ``halfclose``: a hand-written half-close (``write_eof()``, close on the
  peer's FIN): the floor for a close that loses nothing.
* ``graceful-eof``: ``GracefulProtocol.write_eof()``: the record and the state
  machine, no linger.
* ``graceful``: ``GracefulProtocol.close_gracefully()``.
* ``streams-close``: ``asyncio.start_server`` + ``writer.close()``.
* ``streams-graceful``: ``aiograceful.start_server`` (graceful close after
  the handler returns).
* ``nginx lingering_close on`` and ``always`` (when nginx is installed): the C
  reference, one worker, its worker's CPU. With ``on`` nginx lingers only
  when more client data may follow (a body not read, pipelined bytes), which
  wrk never sends, so that row is nginx's plain close; ``always`` lingers
  on every connection.

Ratios are per repeat (each run against its baseline from the same repeat),
medians over the repeats; the order of the runs is reversed on every other
repeat.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from ._harness import HOST, Config, median
from ._report import Column, Section

NAME = "wrk"
CLOSE_KINDS: Final = (
    "bare",
    "halfclose",
    "graceful-eof",
    "graceful",
    "streams-close",
    "streams-graceful",
)
KEEPALIVE_KINDS: Final = ("bare", "graceful")
NGINX_KINDS: Final = ("nginx-on", "nginx-always")
NGINX_LABELS: Final = {
    "nginx-on": "nginx lingering_close on",
    "nginx-always": "nginx lingering_close always",
}
LABELS: Final = {
    "bare": "bare `transport.close()`",
    "halfclose": "hand-written half-close",
    "graceful-eof": "GracefulProtocol + `write_eof()`",
    "graceful": "GracefulProtocol + `close_gracefully()`",
    "streams-close": "`asyncio.start_server` + `writer.close()`",
    "streams-graceful": "`aiograceful.start_server`",
    **NGINX_LABELS,
}
KEEPALIVE_LABELS: Final = {
    "bare": "bare `asyncio.Protocol`",
    "graceful": "`GracefulProtocol`",
    "nginx-on": "nginx",
}
THREADS: Final = 1
CONNECTIONS: Final = 50
DEFAULT_REPEATS: Final = 3
#: The loop the goals are set for.
GOAL_LOOP: Final = "uvloop"
#: (kind, baseline, limit): server CPU per connection of kind / baseline's.
CLOSE_GOALS: Final = (
    ("graceful", "halfclose", 1.1),
    ("graceful", "bare", 1.2),
    ("streams-graceful", "streams-close", 1.2),
)
KEEPALIVE_GOAL: Final = 1.05
ROOT: Final = Path(__file__).resolve().parent.parent

# wrk calls done() once at the end; this prints its summary as one JSON line.
_LUA: Final = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, '
    .. '"read": %d, "write": %d, "status": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


class WrkError(RuntimeError):
    """A server or wrk could not run, or gave an answer the benchmark cannot read."""


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid``, from ``/proc/PID/stat`` (Linux), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        text = stat.read()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    # Fields 14 and 15 of proc(5); fields[0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of ``proc``'s stdout within ``timeout`` s (b"" if it exited)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise WrkError(f"server {proc.args!r}: no answer within {timeout:.0f} s")
    return proc.stdout.readline()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a child we started: close its stdin, then SIGTERM, then SIGKILL, each bounded."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(5.0)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)


class PythonServer:
    """One ``benchmarks._wrk_servers`` process."""

    def __init__(self, kind: str, loop_name: str) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._wrk_servers", kind, loop_name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        try:
            line = _readline(self.proc, 30.0)
            if not line.strip().isdigit():
                raise WrkError(f"server {kind} on {loop_name} did not start (said {line!r})")
            self.port = int(line)
        except BaseException:
            _stop(self.proc)
            raise
        self.cpu_pid = self.proc.pid

    def stats(self) -> dict[str, Any]:
        """The server's own counts (connections closed, errors, close outcomes)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(_readline(self.proc, 10.0))
        return answer

    def close(self) -> None:
        _stop(self.proc)


def find_nginx() -> str | None:
    """The nginx binary, if installed (Debian puts it in /usr/sbin)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


_NGINX_CONF: Final = """\
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  lingering_close {mode};
  server {{
    listen {host}:{port} backlog=1024;
    location / {{ default_type text/plain; return 200 "ok"; }}
  }}
}}
"""


class NginxServer:
    """nginx with one worker on a free loopback port; CPU is read from the worker."""

    def __init__(self, binary: str, mode: str) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="aiograceful-nginx-")
        directory = self._dir.name
        self.port = _free_port()
        conf = Path(directory) / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(dir=directory, mode=mode, host=HOST, port=self.port))
        self.proc = subprocess.Popen(
            [binary, "-p", directory, "-c", str(conf), "-e", f"{directory}/error.log"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            self.cpu_pid = self._worker(10.0)
        except BaseException:
            self.close()
            raise

    def _worker(self, timeout: float) -> int:
        """The worker's pid, once it is up and the port accepts."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise WrkError(f"nginx exited ({self.proc.returncode}): {err.strip()}")
            with contextlib.suppress(OSError, ValueError):
                pids = children.read_text().split()
                if pids:
                    with socket.create_connection((HOST, self.port), timeout=1.0):
                        return int(pids[0])
            time.sleep(0.05)
        raise WrkError(f"nginx did not start within {timeout:.0f} s")

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        _stop(self.proc)
        self._dir.cleanup()


Server = PythonServer | NginxServer


def run_wrk(wrk: str, port: int, duration: int, close: bool, script: str) -> dict[str, Any]:
    """Run wrk against ``port``; return its summary (requests, errors) as a dict."""
    cmd = [wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration}s", "-s", script]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://{HOST}:{port}/")
    done = subprocess.run(cmd, capture_output=True, timeout=duration + 60, check=False)
    out = done.stdout.decode(errors="replace")
    match = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if done.returncode != 0 or match is None:
        raise WrkError(
            f"wrk failed ({done.returncode}): {out}{done.stderr.decode(errors='replace')}"
        )
    summary: dict[str, Any] = json.loads(match.group(1))
    return summary


@contextlib.contextmanager
def _server(loop_name: str, kind: str, nginx: str | None) -> Iterator[Server]:
    server: Server
    if kind in NGINX_KINDS:
        assert nginx is not None
        server = NginxServer(nginx, kind.removeprefix("nginx-"))
    else:
        server = PythonServer(kind, loop_name)
    try:
        yield server
    finally:
        server.close()


def _run_one(
    wrk: str, nginx: str | None, script: str, mode: str, loop_name: str, kind: str, duration: int
) -> dict[str, Any]:
    close = mode == "close"
    with _server(loop_name, kind, nginx) as server:
        cpu0 = proc_cpu_seconds(server.cpu_pid)
        summary = run_wrk(wrk, server.port, duration, close, script)
        cpu = proc_cpu_seconds(server.cpu_pid) - cpu0
        # Let the last connections end before asking how they ended.
        time.sleep(0.2)
        stats = server.stats()
    requests = summary["requests"]
    errors = {
        k: summary[k] for k in ("connect", "read", "write", "timeout", "status") if summary[k]
    }
    return {
        "mode": mode,
        "loop": loop_name,
        "variant": kind,
        "server_cpu_s": cpu,
        "requests": requests,
        "cpu_us": cpu / requests * 1e6 if requests else math.nan,
        "per_s": requests / (summary["duration_us"] / 1e6) if summary["duration_us"] else 0.0,
        "wrk_errors": errors,
        "server": stats,
    }


def _ratios(
    runs: Sequence[dict[str, Any]], mine: tuple[str, str, str], base: tuple[str, str, str]
) -> list[float]:
    """Per repeat: cpu_us of (mode, loop, variant) ``mine`` over ``base``'s."""

    def by_repeat(key: tuple[str, str, str]) -> dict[int, float]:
        return {
            r["repeat"]: r["cpu_us"]
            for r in runs
            if (r["mode"], r["loop"], r["variant"]) == key and not math.isnan(r["cpu_us"])
        }

    a, b = by_repeat(mine), by_repeat(base)
    return [a[k] / b[k] for k in sorted(a) if b.get(k)]


def _fmt_ratio(ratios: list[float]) -> str | None:
    return f"{median(ratios):.2f}x" if ratios else None


def _jobs(loops: Sequence[str], nginx: str | None) -> list[tuple[str, str, str]]:
    jobs = [("close", lp, k) for lp in loops for k in CLOSE_KINDS]
    if nginx is not None:
        jobs += [("close", "C", k) for k in NGINX_KINDS]
    jobs += [("keepalive", lp, k) for lp in loops for k in KEEPALIVE_KINDS]
    if nginx is not None:
        jobs.append(("keepalive", "C", "nginx-on"))
    return jobs


def run(cfg: Config) -> list[Section]:
    """Run the benchmark; return its sections (connection close, keep-alive)."""
    duration = max(1, round(cfg.duration))
    repeats = cfg.explicit_repeats or (1 if cfg.quick else DEFAULT_REPEATS)
    close_section = Section(
        name=NAME,
        title="6. wrk: server CPU per connection (Connection: close)",
        what=(
            f"`wrk -t{THREADS} -c{CONNECTIONS} -d{duration}s -H 'Connection: close'` against "
            "each server in a process of its own (a fresh one per run); server CPU "
            "(utime + stime from /proc/PID/stat over the wrk run) divided by the requests wrk "
            f"completed, one connection each. {repeats} repeat(s), interleaved, medians. "
            f"Goals (on {GOAL_LOOP}): close_gracefully <= 1.1x the hand-written half-close "
            "and <= 1.2x bare; aiograceful.start_server <= 1.2x asyncio.start_server + "
            "writer.close(). nginx rows are compared with the uvloop rows."
        ),
        columns=[
            Column("loop", "loop"),
            Column("label", "server"),
            Column("cpu_us", "server CPU/conn (us)", "{:.1f}"),
            Column("per_s", "conn/s", "{:,.0f}"),
            Column("vs_bare", "vs bare"),
            Column("vs_half", "vs half-close"),
            Column("vs_streams", "vs writer.close()"),
            Column("per_repeat", "per-repeat (goal ratio)"),
            Column("goal", "goal"),
            Column("met", "met"),
        ],
    )
    keep_section = Section(
        name=f"{NAME}-keepalive",
        title="7. wrk: server CPU per keep-alive request",
        what=(
            f"`wrk -t{THREADS} -c{CONNECTIONS} -d{duration}s` (keep-alive) against the same "
            f"servers; server CPU per request. Goal (on {GOAL_LOOP}): GracefulProtocol <= "
            f"{KEEPALIVE_GOAL}x bare."
        ),
        columns=[
            Column("loop", "loop"),
            Column("label", "server"),
            Column("cpu_us", "server CPU/request (us)", "{:.2f}"),
            Column("per_s", "requests/s", "{:,.0f}"),
            Column("vs_bare", "vs bare"),
            Column("per_repeat", "per-repeat"),
            Column("goal", "goal"),
            Column("met", "met"),
        ],
    )
    wrk = shutil.which("wrk")
    if wrk is None:
        reason = (
            "wrk is not installed (Debian/Ubuntu: `apt-get install wrk`); "
            "this benchmark needs wrk as its outside client."
        )
        close_section.skipped = keep_section.skipped = reason
        return [close_section, keep_section]
    if not os.path.exists("/proc/self/stat"):
        close_section.skipped = keep_section.skipped = "no /proc/PID/stat (Linux only)."
        return [close_section, keep_section]
    nginx = find_nginx()
    jobs = _jobs(cfg.loops, nginx)
    runs: list[dict[str, Any]] = []
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="aiograceful-wrk-") as lua:
        lua.write(_LUA)
        lua.flush()
        for repeat in range(repeats):
            order = jobs if repeat % 2 == 0 else list(reversed(jobs))
            for mode, loop_name, kind in order:
                figures = _run_one(wrk, nginx, lua.name, mode, loop_name, kind, duration)
                runs.append({**figures, "repeat": repeat})
    close_section.runs = [r for r in runs if r["mode"] == "close"]
    keep_section.runs = [r for r in runs if r["mode"] == "keepalive"]
    _close_rows(close_section, cfg.loops, nginx is not None)
    _keep_rows(keep_section, cfg.loops, nginx is not None)
    if nginx is None:
        close_section.notes.append("nginx is not installed: no C reference row.")
    for section in (close_section, keep_section):
        section.notes.append(_errors_note(section.runs))
    return [close_section, keep_section]


def _median_of(
    runs: Sequence[dict[str, Any]], mode: str, loop_name: str, kind: str, key: str
) -> float:
    return median(
        r[key] for r in runs if (r["mode"], r["loop"], r["variant"]) == (mode, loop_name, kind)
    )


def _close_rows(section: Section, loops: Sequence[str], with_nginx: bool) -> None:
    runs = section.runs
    pairs = [(lp, k) for lp in loops for k in CLOSE_KINDS]
    if with_nginx:
        pairs += [("C", k) for k in NGINX_KINDS]
    for loop_name, kind in pairs:
        ref = GOAL_LOOP if loop_name == "C" and GOAL_LOOP in loops else loop_name
        key = ("close", loop_name, kind)
        row: dict[str, Any] = {
            "loop": loop_name,
            "variant": kind,
            "label": LABELS[kind],
            "cpu_us": _median_of(runs, "close", loop_name, kind, "cpu_us"),
            "per_s": _median_of(runs, "close", loop_name, kind, "per_s"),
        }
        if kind != "bare" or loop_name == "C":
            row["vs_bare"] = _fmt_ratio(_ratios(runs, key, ("close", ref, "bare")))
        if kind not in ("bare", "halfclose") or loop_name == "C":
            row["vs_half"] = _fmt_ratio(_ratios(runs, key, ("close", ref, "halfclose")))
        if kind == "streams-graceful":
            row["vs_streams"] = _fmt_ratio(_ratios(runs, key, ("close", ref, "streams-close")))
        goals = [g for g in CLOSE_GOALS if g[0] == kind] if loop_name == GOAL_LOOP else []
        if goals:
            texts, met, reps = [], [], []
            for _, base, limit in goals:
                ratios = _ratios(runs, key, ("close", loop_name, base))
                value = median(ratios)
                texts.append(f"<= {limit}x {base}")
                met.append("yes" if value <= limit else f"no ({value:.2f}x)")
                reps.append(" ".join(f"{x:.2f}" for x in ratios))
            row["goal"] = "; ".join(texts)
            row["met"] = "; ".join(met)
            row["per_repeat"] = "; ".join(reps)
        section.rows.append(row)


def _keep_rows(section: Section, loops: Sequence[str], with_nginx: bool) -> None:
    runs = section.runs
    pairs = [(lp, k) for lp in loops for k in KEEPALIVE_KINDS]
    if with_nginx:
        pairs.append(("C", "nginx-on"))
    for loop_name, kind in pairs:
        ref = GOAL_LOOP if loop_name == "C" and GOAL_LOOP in loops else loop_name
        key = ("keepalive", loop_name, kind)
        row: dict[str, Any] = {
            "loop": loop_name,
            "variant": kind,
            "label": KEEPALIVE_LABELS.get(kind, kind),
            "cpu_us": _median_of(runs, "keepalive", loop_name, kind, "cpu_us"),
            "per_s": _median_of(runs, "keepalive", loop_name, kind, "per_s"),
        }
        if kind != "bare" or loop_name == "C":
            ratios = _ratios(runs, key, ("keepalive", ref, "bare"))
            row["vs_bare"] = _fmt_ratio(ratios)
            row["per_repeat"] = " ".join(f"{x:.2f}" for x in ratios)
            if kind == "graceful" and loop_name == GOAL_LOOP:
                value = median(ratios)
                row["goal"] = f"<= {KEEPALIVE_GOAL}x bare"
                row["met"] = "yes" if value <= KEEPALIVE_GOAL else f"no ({value:.2f}x)"
        section.rows.append(row)


def _errors_note(runs: Sequence[dict[str, Any]]) -> str:
    wrk_errors: dict[str, int] = {}
    server_errors = 0
    most = 0
    outcomes: dict[str, int] = {}
    for r in runs:
        for k, v in r["wrk_errors"].items():
            label = "non-2xx" if k == "status" else k
            wrk_errors[label] = wrk_errors.get(label, 0) + v
        server_errors += r["server"].get("errors", 0)
        most = max(most, r["server"].get("errors", 0))
        for k, v in r["server"].get("outcomes", {}).items():
            outcomes[k] = outcomes.get(k, 0) + v
    return (
        "wrk socket errors and non-2xx responses over all runs: "
        + (", ".join(f"{k} {v}" for k, v in sorted(wrk_errors.items())) or "none")
        + f". Connections that ended in an error on the server: {server_errors} (at most {most} "
        f"in one run; wrk leaves up to {CONNECTIONS} connections open when it exits, and a "
        "reply it has not read then makes its close a RST). aiograceful close outcomes: "
        + (", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "none")
        + "."
    )
