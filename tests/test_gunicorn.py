"""aiograceful.gunicorn against real gunicorn: stock uvicorn-worker loses requests, the drop-in not.

Each server is ``python -m gunicorn _asgi_app:app`` in a subprocess on
127.0.0.1 with two workers: uvicorn-worker's classes (stock) or the
drop-in's (``-k aiograceful.gunicorn.UvicornWorker``: uvloop and httptools;
``UvicornH11Worker``: asyncio's loop and h11). Keep-alive clients and
clients opening a connection per request keep it busy through SIGHUP
reloads, ``max_requests`` recycling and the stop. A request written on an
open connection that gets no answer is lost; a connect refused before the
stop is a failure too.
"""

from __future__ import annotations

import http.client
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("uvicorn_worker")

from _dropins import HOST, LoadCounts, env, python, server_process, signal_load

from aiograceful import gunicorn as graceful_gunicorn
from aiograceful import uvicorn as graceful_uvicorn

#: How gunicorn logs its port.
LISTENING = re.compile(rb"Listening at: http://[^\s:]+:(\d+)")
WORKERS = ["UvicornWorker", "UvicornH11Worker"]
#: New connections the stop may reset unanswered (``LoadCounts.unsent``): the
#: arbiter closed its copy of the listener first, and one that completes its
#: handshake between the last worker's final accept() and its close is reset
#: with the queue (about one stop in 15 on loopback; see docs/dropins.md).
STOP_WINDOW = 1
#: Two reloads under load, then the stop.
RELOADS = [(1.0, signal.SIGHUP), (3.0, signal.SIGHUP), (5.0, signal.SIGTERM)]


def _argv(worker: str, *extra: str) -> list[str]:
    return [
        python(), "-m", "gunicorn", "_asgi_app:app", "-b", f"{HOST}:0", "-w", "2",
        "-k", worker, "--graceful-timeout", "10", "--log-level", "info", *extra,
    ]  # fmt: skip


def _load(worker: str, plan: list[tuple[float, signal.Signals]], *extra: str) -> LoadCounts:
    with server_process(_argv(worker, *extra), port_re=LISTENING) as (proc, port):
        counts = signal_load(proc, port, plan)
        assert proc.returncode == 0, counts
    assert counts.answered > 1000, counts
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("worker", WORKERS)
def test_gunicorn_worker_loses_nothing_across_reloads_and_stop(worker: str) -> None:
    """Two SIGHUP reloads and a SIGTERM under load: every request sent is answered."""
    counts = _load(f"aiograceful.gunicorn.{worker}", RELOADS)
    assert counts.failed == 0, counts
    assert counts.unsent <= STOP_WINDOW, counts


@pytest.mark.slow
def test_gunicorn_stock_worker_loses_requests_across_reloads() -> None:
    """Stock uvicorn-worker under the same load and signals loses requests (in two tries)."""
    seen = []
    for _ in range(2):
        counts = _load("uvicorn_worker.UvicornWorker", RELOADS)
        seen.append(counts)
        if counts.lost:
            return
    raise AssertionError(f"stock uvicorn-worker lost nothing: {seen}")


@pytest.mark.slow
@pytest.mark.parametrize("worker", WORKERS)
def test_gunicorn_worker_loses_nothing_when_recycled(worker: str) -> None:
    """``max_requests`` recycles the workers under load: every request sent is answered."""
    recycle = ("--max-requests", "1500", "--max-requests-jitter", "500")
    counts = _load(f"aiograceful.gunicorn.{worker}", [(5.0, signal.SIGTERM)], *recycle)
    assert counts.failed == 0, counts
    assert counts.unsent <= STOP_WINDOW, counts


def _get(port: int, path: str, got: list[int | str]) -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=20)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        got.append(response.status)
    except (OSError, http.client.HTTPException) as exc:
        got.append(type(exc).__name__)
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("worker", WORKERS)
def test_gunicorn_worker_keeps_its_heartbeat_while_it_drains(worker: str) -> None:
    """A grace twice the arbiter's timeout: the worker is not killed, the hung request gets 500.

    A worker silent for the arbiter's ``timeout`` is aborted: its client
    would see the connection end without an answer.
    """
    # max_requests 1 (uvicorn counts answered requests): /hang, then /, and
    # the worker shuts down with /hang in flight; grace = 10 - 5 (margin) -
    # 1 (force) = 4 s against a timeout of 2 s.
    argv = _argv(f"aiograceful.gunicorn.{worker}", "--timeout", "2", "--max-requests", "1")
    argv[argv.index("-w") + 1] = "1"
    with server_process(argv, port_re=LISTENING) as (proc, port):
        got: list[int | str] = []
        hung = threading.Thread(target=_get, args=(port, "/hang", got), daemon=True)
        hung.start()
        time.sleep(0.5)
        _get(port, "/", got)  # the first answer: the worker begins its shutdown
        hung.join(10)
        assert proc.poll() is None  # the arbiter still serves (a new worker)
    assert got == [200, 500]


def test_gunicorn_budget_fits_graceful_timeout() -> None:
    """drain_delay + grace + force + margin is gunicorn's graceful_timeout, never more."""
    budget = graceful_gunicorn.shutdown_budget
    assert budget(30.0) == (0.0, 24.0, 1.0)
    assert budget(10.0, force_timeout=2.0, drain_delay=1.0) == (1.0, 2.0, 2.0)
    # A short graceful_timeout shrinks the force, then the drain delay, then the grace.
    assert budget(6.0, force_timeout=5.0, drain_delay=5.0) == (0.5, 0.0, 0.5)
    assert budget(3.0) == (0.0, 0.0, 0.0)
    for timeout in (0.0, 1.0, 5.5, 12.0, 30.0, 120.0):
        drain, grace, force = budget(timeout, force_timeout=3.0, drain_delay=2.0)
        assert min(drain, grace, force) >= 0
        assert drain + grace + force + graceful_gunicorn.SHUTDOWN_MARGIN <= max(timeout, 5.0)


def test_gunicorn_import_refuses_an_untested_old_version() -> None:
    """uvicorn-worker 0.3 (which cannot start uvicorn 0.54's loop): the ImportError names it."""
    code = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda name: '0.3.0' if name == 'uvicorn-worker' else real(name)\n"
        "try:\n"
        "    import aiograceful.gunicorn\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        timeout=30,
        check=True,
        text=True,
        env=env(),
    )
    assert "needs uvicorn-worker>=0.4 (found 0.3.0)" in out.stdout, out


def test_gunicorn_workers_serve_through_the_dropin_protocols() -> None:
    """The workers keep uvicorn-worker's names and loops, with aiograceful's protocols."""
    import uvicorn_worker

    worker = graceful_gunicorn.UvicornWorker
    h11_worker = graceful_gunicorn.UvicornH11Worker
    assert issubclass(worker, uvicorn_worker.UvicornWorker)
    assert worker.CONFIG_KWARGS["http"] is graceful_uvicorn.protocol_class("auto")
    assert h11_worker.CONFIG_KWARGS["loop"] == "asyncio"
    assert h11_worker.CONFIG_KWARGS["http"] is graceful_uvicorn.H11Protocol


def test_gunicorn_import_needs_gunicorn_only_inside_its_module() -> None:
    """``import aiograceful`` loads no gunicorn; without it, an ImportError names what to get."""
    code = (
        "import sys, aiograceful\n"
        "assert 'gunicorn' not in sys.modules and 'uvicorn_worker' not in sys.modules\n"
        "sys.modules['gunicorn'] = None\n"
        "try:\n"
        "    import aiograceful.gunicorn\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        timeout=30,
        check=True,
        text=True,
        env=env(),
    )
    assert "pip install 'aiograceful[gunicorn]'" in out.stdout, out
