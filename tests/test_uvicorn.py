"""aiograceful.uvicorn against the real uvicorn: stock loses answers, the drop-in does not.

Each server is ``python -m uvicorn _asgi_app:app`` in a subprocess on
127.0.0.1, stock (``--http h11`` / ``httptools``) or with the drop-in (``--http
aiograceful.uvicorn:H11Protocol`` / ``HttpToolsProtocol``), on asyncio's loop
and on uvloop (``--loop``). The clients are real: http.client, node, wget,
curl, ab. Every check first shows the stock server losing, then the drop-in
delivering every time. On a uvicorn whose CLI takes no import string in
``--http`` (before 0.36), the drop-in's servers are ``uvicorn.run(app,
http=Class)`` instead: the same server with the same protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _util import (
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    UPLOAD_HEAD,
    assert_still_accepts,
    read_stream_and_close,
    wait_for_tcp_state,
)

pytest.importorskip("uvicorn")

import click
import uvicorn
from _asgi_app import event_stream
from _dropins import (
    HOST,
    LoadCounts,
    ab_uploads,
    assert_dropin_loses_nothing_in_race,
    assert_stalled_stream_gets_what_stock_delivers,
    assert_stock_loses_in_race,
    curl_uploads,
    env,
    httpclient_uploads,
    node_uploads,
    python,
    server_process,
    shutdown_race,
    signal_load,
    wget_uploads,
)
from _exported import uvicorn_with_a_request
from _websocket import MESSAGES, websocket_shutdown
from uvicorn.config import WS_PROTOCOLS

from aiograceful import CloseOutcome, ShutdownPhase
from aiograceful import uvicorn as graceful_uvicorn
from aiograceful._tools.probe import run_probe

PARSERS = ["h11", "httptools"]
LOOPS = ["asyncio", "uvloop"]
DROPIN = {
    "h11": "aiograceful.uvicorn:H11Protocol",
    "httptools": "aiograceful.uvicorn:HttpToolsProtocol",
}


def _cli_takes_import_string() -> bool:
    """Whether uvicorn's CLI takes ``--http module:Class`` (uvicorn >= 0.36, its #2658).

    Before, ``--http`` is a choice of ``auto``, ``h11``, ``httptools``: a feature
    check on the option's type, not on the version.
    """
    from uvicorn.main import main

    option = next(param for param in main.params if param.name == "http")
    return not isinstance(option.type, click.Choice)


CLI_TAKES_IMPORT_STRING = _cli_takes_import_string()
NO_CLI_IMPORT_STRING = (
    f"uvicorn {uvicorn.__version__}'s CLI takes no import string in --http "
    "(--http module:Class is uvicorn >= 0.36); there the drop-in runs through "
    "uvicorn.run(http=Class), tested by every other test here"
)


def _argv(http: str, loop: str, **options: object) -> list[str]:
    """uvicorn serving ``_asgi_app:app`` with ``http`` (a parser's name, or ``module:Class``).

    A class goes to ``--http`` where the CLI takes an import string, and to
    ``uvicorn.run(http=Class)`` (``Config(http=Class)``: the same server, the
    same protocol) on the uvicorn whose CLI does not (before 0.36).
    ``options`` are ``Config``'s (``ws="wsproto"``, ``workers=2``): CLI
    options on the first path, ``uvicorn.run`` arguments on the second.
    """
    if ":" in http and not CLI_TAKES_IMPORT_STRING:
        return _uvicorn_run_argv(http, loop, **options)
    return _cli_argv(http, loop, **options)


def _cli_argv(http: str, loop: str, **options: object) -> list[str]:
    argv = [
        python(), "-m", "uvicorn", "_asgi_app:app", "--host", HOST, "--port", "0",
        "--http", http, "--loop", loop, "--log-level", "info", "--no-access-log",
    ]  # fmt: skip
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def _uvicorn_run_argv(http: str, loop: str, **options: object) -> list[str]:
    """``uvicorn.run(app, http=Class)`` for ``http`` = ``module:Class`` (any uvicorn)."""
    module, name = http.split(":")
    extra = "".join(f", {key}={value!r}" for key, value in options.items())
    code = (
        f"import uvicorn; from {module} import {name}; "
        f"uvicorn.run('_asgi_app:app', host={HOST!r}, port=0, http={name}, loop={loop!r}, "
        f"log_level='info', access_log=False{extra})"
    )
    return [python(), "-c", code]


def _need_parser(parser: str) -> None:
    if parser == "httptools":
        pytest.importorskip("httptools")


def _need_websocket(websocket: str) -> None:
    """Skip unless this uvicorn offers ``--ws websocket`` (websockets-sansio: uvicorn >= 0.35)."""
    if websocket == "websockets-sansio":
        pytest.importorskip("websockets")
    if websocket not in WS_PROTOCOLS:
        pytest.skip(f"uvicorn {uvicorn.__version__} has no --ws {websocket}")


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[str, str, bool], int]]:
    """``servers(parser, loop, dropin) -> port``: one uvicorn per combination, started on use."""
    started: dict[tuple[str, str, bool], int] = {}
    with contextlib.ExitStack() as stack:

        def get(parser: str, loop: str, dropin: bool) -> int:
            key = (parser, loop, dropin)
            if key not in started:
                http = DROPIN[parser] if dropin else parser
                _proc, port = stack.enter_context(server_process(_argv(http, loop)))
                started[key] = port
            return started[key]

        yield get


# -- the early answer, per client ------------------------------------------------------


# (name, client, rounds, whether stock uvicorn loses answers to it). Stock
# uvicorn drains the body of a keep-alive request, so keep-alive clients
# (http.client by default, curl, wget) get its 413; a client that asks for
# the close (Connection: close, HTTP/1.0: ab) is reset while it uploads.
def _httpclient_close(port: int, rounds: int) -> tuple[int, int]:
    return httpclient_uploads(port, rounds, "Connection: close")


def _httpclient_10(port: int, rounds: int) -> tuple[int, int]:
    return httpclient_uploads(port, rounds, "HTTP/1.0")


def _curl_close(port: int, rounds: int) -> tuple[int, int]:
    return curl_uploads(port, rounds, "-H", "Connection: close")


CLIENTS: list[tuple[str, Callable[[int, int], tuple[int, int]], int, bool]] = [
    ("http.client Connection: close", _httpclient_close, 4, True),
    ("http.client HTTP/1.0", _httpclient_10, 4, True),
    ("http.client keep-alive", httpclient_uploads, 3, False),
    ("node", node_uploads, 4, True),
    ("ab", ab_uploads, 4, True),
    ("wget", wget_uploads, 3, False),
    ("curl -H Expect:", curl_uploads, 3, False),
    ("curl -H Expect: Connection: close", _curl_close, 3, False),
]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize(
    ("client", "rounds", "stock_loses"),
    [pytest.param(c, n, s, id=name) for name, c, n, s in CLIENTS],
)
def test_uvicorn_early_413_reaches_every_client(
    servers: Callable[[str, str, bool], int],
    parser: str,
    loop: str,
    client: Callable[[int, int], tuple[int, int]],
    rounds: int,
    stock_loses: bool,
) -> None:
    """Stock uvicorn loses the early 413 to clients that ask for the close; the drop-in never."""
    _need_parser(parser)
    if stock_loses:
        answered, total = client(servers(parser, loop, False), rounds)
        assert answered < total, f"stock uvicorn delivered {answered}/{total}: no hazard shown"
    answered, total = client(servers(parser, loop, True), rounds)
    assert answered == total, f"the drop-in delivered the 413 {answered}/{total} times"


# -- the unread body is bounded ------------------------------------------------------


def _upload_without_reading(port: int, size: int) -> tuple[int, bool]:
    """Send a head announcing ``size`` bytes, then the body; return (bytes sent, reset?)."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(UPLOAD_HEAD % size)
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < size:
                sent += sock.send(chunk[: size - sent])
        except (ConnectionResetError, BrokenPipeError):
            return sent, True
        return sent, False


@pytest.mark.parametrize("loop", LOOPS)
def test_uvicorn_unread_body_after_early_answer_is_bounded(
    servers: Callable[[str, str, bool], int], loop: str
) -> None:
    """After an early 413, stock uvicorn reads a keep-alive body however large; the drop-in
    stops at its discard cap (here a subclass with ``max_discard`` = 1 MiB, via ``--http``)."""
    size = 64 << 20
    sent, reset = _upload_without_reading(servers("h11", loop, False), size)
    assert (sent, reset) == (size, False)  # stock: all 64 MiB read and dropped
    with server_process(_argv("_uvicorn_small_cap:H11Protocol", loop)) as (_proc, port):
        sent, reset = _upload_without_reading(port, size)
    assert reset, sent
    assert sent < size // 2, sent  # stopped near the cap (plus socket buffers), not at 64 MiB


# -- the half-closed client ------------------------------------------------------------------


def _get_then_half_close(port: int) -> bytes:
    """GET /slow (answered after 0.2 s), shutdown(SHUT_WR), read to the end."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        return data


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("parser", PARSERS)
def test_uvicorn_half_closed_client_gets_its_answer(
    servers: Callable[[str, str, bool], int], parser: str, loop: str
) -> None:
    """A request, then the client's FIN: stock uvicorn drops the answer, the drop-in sends it."""
    _need_parser(parser)
    assert _get_then_half_close(servers(parser, loop, False)) == b""
    data = _get_then_half_close(servers(parser, loop, True))
    assert data.startswith(b"HTTP/1.1 200"), data
    assert data.endswith(b"ok\n"), data
    assert b"connection: close" in data.lower(), data


@pytest.mark.skipif(not CLI_TAKES_IMPORT_STRING, reason=NO_CLI_IMPORT_STRING)
def test_uvicorn_cli_takes_the_dropin_as_an_import_string() -> None:
    """``uvicorn app --http aiograceful.uvicorn:H11Protocol`` serves with the drop-in's
    protocol: a half-closed client gets its answer (stock uvicorn drops it)."""
    with server_process(_cli_argv(DROPIN["h11"], "asyncio")) as (_proc, port):
        data = _get_then_half_close(port)
    assert data.startswith(b"HTTP/1.1 200"), data
    assert data.endswith(b"ok\n"), data


@pytest.mark.parametrize("parser", PARSERS)
def test_uvicorn_run_takes_the_dropin_class(parser: str) -> None:
    """``uvicorn.run(app, http=aiograceful.uvicorn.H11Protocol)`` (``Config(http=Class)``, which
    every supported uvicorn takes) serves with the drop-in: a half-closed client gets its
    answer, with ``Connection: close``."""
    _need_parser(parser)
    with server_process(_uvicorn_run_argv(DROPIN[parser], "asyncio")) as (_proc, port):
        data = _get_then_half_close(port)
    assert data.startswith(b"HTTP/1.1 200"), data
    assert data.endswith(b"ok\n"), data
    assert b"connection: close" in data.lower(), data


# -- the shutdown race ---------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("parser", PARSERS)
def test_uvicorn_shutdown_race_stock_loses_requests(parser: str, loop: str) -> None:
    """Stock uvicorn at SIGTERM: keep-alive clients sending back to back lose requests."""
    _need_parser(parser)
    assert_stock_loses_in_race(_argv(parser, loop), "uvicorn")


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("parser", PARSERS)
def test_uvicorn_shutdown_race_dropin_loses_nothing(parser: str, loop: str) -> None:
    """The drop-in at SIGTERM: every request sent on an open connection is answered."""
    _need_parser(parser)
    # uvicorn re-raises SIGTERM once it has shut down.
    assert_dropin_loses_nothing_in_race(_argv(DROPIN[parser], loop), exits=(0, -signal.SIGTERM))


# -- the probe ------------------------------------------------------------------------------------


@pytest.mark.parametrize("parser", PARSERS)
def test_uvicorn_probe_flags_stock_and_passes_dropin(
    servers: Callable[[str, str, bool], int], parser: str
) -> None:
    """The probe finds the hazards of stock uvicorn and none with the drop-in."""
    _need_parser(parser)
    _, stock = run_probe(
        HOST, servers(parser, "asyncio", False), http=True, body_size=16 << 20, wait=1, timeout=3
    )
    by_check = {v.check: v.status for v in stock}
    assert by_check["early answer while the client is still sending (keep-alive)"] == "pass"
    assert by_check["early answer while the client is still sending (Connection: close)"] == (
        "HAZARD"
    ), stock
    assert by_check["early answer while the client is still sending (HTTP/1.0)"] == "HAZARD"
    _, dropin = run_probe(
        HOST, servers(parser, "asyncio", True), http=True, body_size=16 << 20, wait=1, timeout=3
    )
    assert [v.status for v in dropin[:4]] == ["pass"] * 4, dropin


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("path", ["/", "/slow"], ids=["fast-app", "slow-app"])
def test_uvicorn_probe_half_close_verdict_does_not_depend_on_the_app(
    servers: Callable[[str, str, bool], int], parser: str, path: str
) -> None:
    """The probe's half-close check flags stock uvicorn (on uvloop, its default loop) behind a
    fast app as behind a slow one (pipelined requests outrun the app), and passes the drop-in."""
    _need_parser(parser)
    check = "answer after the client half-closes"
    verdicts = {}
    for dropin in (False, True):
        _, found = run_probe(
            HOST, servers(parser, "uvloop", dropin), http=True, path=path,
            body_size=1 << 20, wait=0.1, timeout=3,
        )  # fmt: skip
        verdicts[dropin] = next(v for v in found if v.check == check)
    assert verdicts[False].status == "HAZARD", verdicts[False]
    assert verdicts[True].status == "pass", verdicts[True]


def test_uvicorn_probe_idle_check_concludes() -> None:
    """Against stock uvicorn the idle check concludes within its wait: the connection serves
    one request, then uvicorn's keep-alive timeout closes it with a FIN."""
    with server_process(_argv("h11", "asyncio", timeout_keep_alive=1)) as (_p, port):
        _, found = run_probe(HOST, port, http=True, body_size=1 << 20, wait=4, timeout=3)
    idle = next(v for v in found if v.check == "idle (or shutdown) close")
    assert idle.status == "pass", idle
    assert "FIN" in idle.evidence, idle


# -- aiograceful.uvicorn.Server / run ---------------------------------------------------------


def _config(**kwargs: object) -> uvicorn.Config:
    from _asgi_app import app

    return uvicorn.Config(
        app,
        host=HOST,
        port=0,
        lifespan="off",
        log_level="warning",
        http=graceful_uvicorn.H11Protocol,
        **kwargs,  # type: ignore[arg-type]
    )


def _queued_requests(port: int, n: int) -> list[socket.socket]:
    """``n`` connections, each with a GET sent, made without letting the server's loop run."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection((HOST, port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        socks.append(sock)
    return socks


async def _answers(socks: list[socket.socket]) -> list[bytes]:
    def read(sock: socket.socket) -> bytes:
        data = b""
        with sock, contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
        return data

    return await asyncio.gather(*(asyncio.to_thread(read, s) for s in socks))


@pytest.mark.parametrize("dropin", [False, True], ids=["stock", "dropin"])
async def test_uvicorn_server_drains_the_accept_queue(dropin: bool) -> None:
    """Connections queued at shutdown: uvicorn.Server resets them, aiograceful's Server answers."""
    config = _config()
    server = graceful_uvicorn.Server(config) if dropin else uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    port = server.servers[0].sockets[0].getsockname()[1]
    # Blocking connects from the loop's own thread: the kernel completes the
    # handshakes, the loop accepts none of them before the shutdown begins.
    socks = _queued_requests(port, 4)
    shutdown = asyncio.ensure_future(server.shutdown())
    answers = await _answers(socks)
    await asyncio.wait_for(shutdown, 30)
    answered = sum(a.startswith(b"HTTP/1.1 200") for a in answers)
    if dropin:
        # (uvloop accepts as it attaches, so there they may be answered before
        # the notice, then closed after the quiet window: answered all the same.)
        assert answered == 4, answers
    else:
        assert answered < 4, answers


async def test_uvicorn_server_leaves_given_sockets_unfiltered() -> None:
    """Given its sockets (its workers, reload, gunicorn), the drop-in drains without the SYN
    filter: they are another process's too, and still take connections after it."""
    listener = socket.create_server((HOST, 0), backlog=16)
    keeper = listener.dup()  # the supervisor's copy
    with keeper, listener:
        config = _config()
        server = graceful_uvicorn.Server(config)
        config.load()
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[listener])
        port = listener.getsockname()[1]
        await asyncio.wait_for(server.shutdown(sockets=[listener]), 30)
        await assert_still_accepts(keeper, HOST, port)


async def test_uvicorn_server_forces_after_grace() -> None:
    """A client that never finishes its request is closed after grace + force, not waited on."""
    config = _config(timeout_graceful_shutdown=1)
    server = graceful_uvicorn.Server(config, force_timeout=0.5)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    port = server.servers[0].sockets[0].getsockname()[1]
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 10")  # no end
        for _ in range(100):
            await asyncio.sleep(0.01)
            if server.server_state.connections:
                break
        await asyncio.wait_for(server.shutdown(), 10)
        assert not server.server_state.connections
        data = await asyncio.to_thread(_read_all, sock)
    assert data == b"", data


async def _started(server: uvicorn.Server) -> int:
    """Start ``server`` (lifespan off) as uvicorn's ``serve()`` does; return its port."""
    config = server.config
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    return int(server.servers[0].sockets[0].getsockname()[1])


@pytest.mark.parametrize("dropin", [False, True], ids=["stock", "dropin"])
async def test_uvicorn_server_cancelled_request_gets_500(dropin: bool) -> None:
    """A request the grace runs out on is cancelled and answered 500, by stock and drop-in alike."""
    config = _config(timeout_graceful_shutdown=0.5)
    server = graceful_uvicorn.Server(config, force_timeout=1) if dropin else uvicorn.Server(config)
    port = await _started(server)
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: test\r\n\r\n")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if server.server_state.tasks:
                break
        assert server.server_state.tasks, "the request never reached the application"
        shutdown = asyncio.ensure_future(server.shutdown())
        data = await asyncio.to_thread(_read_all, sock)
        await asyncio.wait_for(shutdown, 10)
    assert data.startswith(b"HTTP/1.1 500 "), data


async def test_uvicorn_server_idle_keepalive_gets_fin_within_quiet_window() -> None:
    """An idle keep-alive connection at shutdown gets its FIN after the quiet window, not grace."""
    config = _config(timeout_graceful_shutdown=10)
    server = graceful_uvicorn.Server(config)
    port = await _started(server)
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        first = b""
        for _ in range(100):  # the answer, whole (it may come in two segments)
            first += await asyncio.to_thread(sock.recv, 65536)
            if first.endswith(b"ok\n"):
                break
        assert first.startswith(b"HTTP/1.1 200"), first
        loop = asyncio.get_running_loop()
        began = loop.time()
        shutdown = asyncio.ensure_future(server.shutdown())
        rest = await asyncio.to_thread(_read_all, sock)
        took = loop.time() - began
    await asyncio.wait_for(shutdown, 10)  # the client's FIN (its close) ends the linger
    assert rest == b""
    assert took < 2.0, f"FIN {took:.2f} s after the shutdown began"
    stats = server.stats
    assert stats.phase is ShutdownPhase.DONE
    assert stats.outcomes[CloseOutcome.CLEAN] == 1, stats
    assert stats.shutdown_duration is not None
    assert stats.shutdown_duration < 3.0


async def test_uvicorn_server_drain_delay_keeps_accepting_with_notice_set() -> None:
    """During drain_delay the notice is set and new connections are still served."""
    config = _config(timeout_graceful_shutdown=2)
    server = graceful_uvicorn.Server(config, drain_delay=0.5)
    port = await _started(server)
    assert not server.notice.is_set()
    shutdown = asyncio.ensure_future(server.shutdown())
    await asyncio.sleep(0.1)
    assert server.notice.is_set()
    assert server.stats.phase is ShutdownPhase.DRAIN_DELAY

    def late_request() -> bytes:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            return _read_all(sock)

    answer = await asyncio.to_thread(late_request)
    await asyncio.wait_for(shutdown, 10)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b"connection: close" in answer.lower(), answer


def test_uvicorn_server_rejects_bad_drain_delay() -> None:
    """``Server(drain_delay=...)`` and ``run(drain_delay=...)`` name the bad argument."""
    with pytest.raises(ValueError, match="drain_delay"):
        graceful_uvicorn.Server(_config(), drain_delay=-1)
    with pytest.raises(ValueError, match="drain_delay"):
        graceful_uvicorn.run(object(), drain_delay=float("nan"))


def _run_argv(module: str, loop: str, **extra: object) -> list[str]:
    options = ", ".join(f"{k}={v!r}" for k, v in extra.items())
    code = (
        f"import {module} as m; m.run('_asgi_app:app', host={HOST!r}, port=0, loop={loop!r}, "
        f"lifespan='off', log_level='info', timeout_graceful_shutdown=1{', ' if options else ''}"
        f"{options})"
    )
    return [python(), "-c", code]


@pytest.mark.parametrize("loop", LOOPS)
def test_uvicorn_run_stalled_stream_client_gets_what_stock_delivers(loop: str) -> None:
    """A client that stops reading a stream at SIGTERM gets, once the server has exited, what
    stock uvicorn's exit leaves it (the kernel's buffer, then a FIN), within grace + force."""
    assert_stalled_stream_gets_what_stock_delivers(
        _run_argv("uvicorn", loop), _run_argv("aiograceful.uvicorn", loop, force_timeout=0.5), 1.5
    )


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_uvicorn_run_rejects_bad_force_timeout() -> None:
    """``run(force_timeout=...)`` and ``Server(force_timeout=...)`` name the bad argument."""
    with pytest.raises(ValueError, match="force_timeout"):
        graceful_uvicorn.run("_asgi_app:app", force_timeout=-1)
    with pytest.raises(TypeError, match="force_timeout"):
        graceful_uvicorn.Server(_config(), force_timeout="1")  # type: ignore[arg-type]


def test_uvicorn_run_serves_and_shuts_down() -> None:
    """``aiograceful.uvicorn.run(app, host=, port=)`` serves, and its SIGTERM race loses nothing."""
    code = (
        "import aiograceful.uvicorn as u; "
        f"u.run('_asgi_app:app', host={HOST!r}, port=0, log_level='info', access_log=False)"
    )
    with server_process([python(), "-c", code]) as (proc, port):
        counts = shutdown_race(proc, port)
        assert proc.returncode in (0, -signal.SIGTERM), counts  # uvicorn re-raises it
    assert counts.answered > 0, counts
    assert counts.lost == 0, counts


def _workers_load(argv: list[str]) -> LoadCounts:
    """Keep-alive and new-connection clients; SIGTERM to the supervisor after 1.5 s."""
    with server_process(argv) as (proc, port):
        time.sleep(1.0)  # the workers start after the supervisor logs its port
        counts = signal_load(proc, port, [(1.5, signal.SIGTERM)])
    assert counts.answered > 100, counts
    return counts


@pytest.mark.slow
def test_uvicorn_cli_workers_lose_requests_at_sigterm() -> None:
    """``uvicorn --workers 2`` with the drop-in protocols: the supervisor's exit resets some."""
    argv = _argv(DROPIN["h11"], "asyncio", workers=2)
    seen = []
    for _ in range(2):
        counts = _workers_load(argv)
        seen.append(counts)
        # Reset after the stop began on a connection the workers never
        # accepted: ``unsent`` (the request was written, and held until then).
        if counts.lost + counts.unsent:
            return
    raise AssertionError(f"uvicorn --workers lost nothing: {seen}")


@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
def test_uvicorn_run_workers_lose_nothing_at_sigterm(loop: str) -> None:
    """``run(app, workers=2)``: the listener refuses handshakes, the workers drain it, none lost."""
    from uvicorn.supervisors import Multiprocess

    if not hasattr(Multiprocess, "terminate_all"):
        pytest.skip(f"uvicorn {uvicorn.__version__}: its supervisor is older than 0.30's")
    code = (
        "import aiograceful.uvicorn as u; "
        f"u.run('_asgi_app:app', host={HOST!r}, port=0, workers=2, loop={loop!r}, "
        "access_log=False)"
    )
    counts = _workers_load([python(), "-c", code])
    assert counts.failed == 0, counts
    assert counts.unsent == 0, counts  # nothing was left queued for the exit to reset


def test_uvicorn_http_names_map_to_the_dropins() -> None:
    """``run(http=...)``: uvicorn's names select aiograceful's protocols; a class is kept."""
    assert graceful_uvicorn.protocol_class("h11") is graceful_uvicorn.H11Protocol
    auto = graceful_uvicorn.protocol_class("auto")
    assert auto in (
        graceful_uvicorn.H11Protocol,
        getattr(graceful_uvicorn, "HttpToolsProtocol", None),
    )
    assert graceful_uvicorn.protocol_class(int) is int


def test_import_aiograceful_does_not_import_uvicorn() -> None:
    """``import aiograceful`` never needs the server packages."""
    code = (
        "import sys, aiograceful; "
        "bad = [m for m in ('uvicorn', 'hypercorn', 'aiohttp') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env(), timeout=30)


def test_uvicorn_all_is_importable_without_httptools() -> None:
    """Without httptools, ``__all__`` leaves ``HttpToolsProtocol`` out, so ``import *`` works;
    the name itself raises ImportError saying what to install."""
    code = (
        "import sys; sys.modules['httptools'] = None\n"  # as if it were not installed
        "import aiograceful.uvicorn as u\n"
        "assert 'HttpToolsProtocol' not in u.__all__, u.__all__\n"
        "from aiograceful.uvicorn import *\n"
        "try:\n"
        "    u.HttpToolsProtocol\n"
        "except ImportError as exc:\n"
        "    assert 'pip install httptools' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('HttpToolsProtocol without httptools')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env(), timeout=30)
    if importlib.util.find_spec("httptools") is not None:
        assert "HttpToolsProtocol" in graceful_uvicorn.__all__
    for name in graceful_uvicorn.__all__:
        assert getattr(graceful_uvicorn, name) is not None, name


def test_dropins_share_one_set_of_close_options() -> None:
    """LINGER, IDLE_LINGER and SHUTDOWN_QUIET are defined once and re-exported by each drop-in."""
    from aiograceful import _dropin_options

    modules = [graceful_uvicorn]
    for name in ("aiograceful.hypercorn", "aiograceful.aiohttp"):
        with contextlib.suppress(ImportError):  # that server is not installed
            modules.append(importlib.import_module(name))
    for module in modules:
        for name in ("LINGER", "IDLE_LINGER", "SHUTDOWN_QUIET"):
            if name in module.__all__:
                assert getattr(module, name) is getattr(_dropin_options, name), (module, name)
    assert graceful_uvicorn.H11Protocol.linger is _dropin_options.LINGER


def _trickle(sock: socket.socket, stop: threading.Event) -> str:
    """Keep sending 1 KiB every 50 ms (never a FIN) until stopped or the server ends it."""
    chunk = b"x" * 1024
    try:
        for _ in range(400):  # 20 s at most
            if stop.wait(0.05):
                return "stopped"
            sock.sendall(chunk)
    except OSError as exc:
        return type(exc).__name__
    return "ran out"


@pytest.mark.parametrize("dropin", [False, True], ids=["stock", "dropin"])
async def test_uvicorn_server_force_shortens_a_lingering_close(dropin: bool) -> None:
    """A lingering close whose client never sends its FIN and keeps sending (so no idle
    bound fires): uvicorn.Server's shutdown returns with it still open (the drop-in's
    protocol in both); aiograceful's Server's force phase ends it (TIMEOUT, a RST) within
    grace + force_timeout, before its shutdown returns."""
    config = _config(timeout_graceful_shutdown=1)
    if dropin:
        server: uvicorn.Server = graceful_uvicorn.Server(config, force_timeout=0.5)
    else:
        server = uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    port = server.servers[0].sockets[0].getsockname()[1]
    stop = threading.Event()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        # An upload answered early (413, Connection: close): its close lingers,
        # discarding what the client still sends (LINGER: 30 s total, 5 s idle).
        sock.sendall(UPLOAD_HEAD % (64 << 20))
        sock.sendall(b"x" * 65536)
        head = await asyncio.to_thread(sock.recv, 65536)
        assert head.startswith(b"HTTP/1.1 413"), head
        connection: Any = next(iter(server.server_state.connections))  # aiograceful's protocol
        linger = connection._end.linger
        trickle = asyncio.ensure_future(asyncio.to_thread(_trickle, sock, stop))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if linger.lingering:
                break
        assert linger.lingering, linger
        await asyncio.wait_for(server.shutdown(), 10)
        still_open = bool(server.server_state.connections)
        outcome = linger.outcome
        # The client's side: the RST (TCP_CLOSE), or still established.
        state = await wait_for_tcp_state(sock, TCP_CLOSE, within=1.0)
        stop.set()
        ended = await asyncio.wait_for(trickle, 10)
        if still_open:
            linger.abort()  # the stock server left it: end it here
            await asyncio.wait_for(linger.future(), 5)
    if dropin:
        assert not still_open, linger
        assert outcome is CloseOutcome.TIMEOUT, linger
        assert state == TCP_CLOSE, (state, ended)
    else:
        assert still_open, linger  # uvicorn's shutdown returned; the linger goes on
        # The linger's FIN came (it half-closed at once), no RST: it still discards.
        assert state == TCP_CLOSE_WAIT, (state, ended)
        assert ended == "stopped", ended


async def test_uvicorn_server_stats_read_from_another_thread() -> None:
    """server.stats reads from a thread with no loop (a metrics scrape) while the shutdown runs."""
    async with uvicorn_with_a_request() as (server, _kept):
        shutdown = asyncio.ensure_future(server.shutdown())
        await asyncio.sleep(0.2)  # the kept keep-alive connection holds grace (its quiet window)
        stats = await asyncio.to_thread(lambda: server.stats)
        assert stats.phase is ShutdownPhase.GRACE, stats
        assert stats.shutdown_duration is not None, stats
        assert stats.shutdown_duration > 0, stats
        await asyncio.wait_for(shutdown, 10)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("websocket", ["wsproto", "websockets-sansio"])
def test_uvicorn_websocket_shutdown_goes_away(websocket: str, parser: str, loop: str) -> None:
    """At shutdown stock uvicorn's WebSocket closes with 1012; the drop-in's with 1001, all sent."""
    _need_parser(parser)
    _need_websocket(websocket)
    stock = websocket_shutdown(_argv(parser, loop, ws=websocket))
    dropin = websocket_shutdown(_argv(DROPIN[parser], loop, ws=websocket))
    # Its close does not wait for the client's close frame: on asyncio's loop
    # that frame sometimes arrives after the close and the client is reset.
    assert stock.code == 1012, stock
    assert (dropin.code, dropin.ended) == (1001, "fin"), dropin
    assert dropin.in_order, dropin
    assert len(dropin.messages) == MESSAGES, dropin
    assert dropin.exited < 5.0, dropin


async def _stream_at_shutdown(dropin: bool) -> tuple[bytes, OSError | None, float]:
    """An event stream's client, the server shut down 0.3 s in: what it read, its error, seconds."""
    servers: list[graceful_uvicorn.Server] = []
    config = uvicorn.Config(
        event_stream(lambda: bool(servers) and servers[0].notice.is_set()),
        host=HOST,
        port=0,
        lifespan="off",
        log_level="critical",
        http=graceful_uvicorn.H11Protocol if dropin else "h11",
        timeout_graceful_shutdown=1,
    )
    server = graceful_uvicorn.Server(config) if dropin else uvicorn.Server(config)
    if isinstance(server, graceful_uvicorn.Server):
        servers.append(server)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    port = server.servers[0].sockets[0].getsockname()[1]
    sock = socket.create_connection((HOST, port), timeout=10)
    with sock:
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n")
        reading = asyncio.ensure_future(asyncio.to_thread(read_stream_and_close, sock))
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(server.shutdown(), 10)
        took = loop.time() - began
        got, error = await asyncio.wait_for(reading, 10)
    return got, error, took


async def test_uvicorn_stream_ends_itself_at_the_notice() -> None:
    """A stream that reads Server.notice ends itself; stock uvicorn cuts it after the grace."""
    stock, _stock_error, stock_took = await _stream_at_shutdown(dropin=False)
    got, error, took = await _stream_at_shutdown(dropin=True)
    # Stock: no notice to read; the app is cancelled after the grace, its stream cut.
    assert not stock.endswith(b"0\r\n\r\n"), stock[-64:]
    assert stock_took >= 1.0, stock_took
    assert error is None, error
    assert got.endswith(b"event: bye\ndata: shutting down\n\n\r\n0\r\n\r\n"), got[-64:]
    assert took < 1.0, took  # at the notice, not after the grace


@pytest.mark.parametrize("loop", LOOPS)
def test_uvicorn_websocket_close_wait_is_bounded(loop: str) -> None:
    """A client that never answers the close frame holds the drop-in's exit ~2 s, then a FIN."""
    stock = websocket_shutdown(_argv("h11", loop, ws="wsproto"), echo=False)
    dropin = websocket_shutdown(_argv(DROPIN["h11"], loop, ws="wsproto"), echo=False)
    assert stock.code == 1012, stock
    assert stock.exited < 1.0, stock  # stock does not wait for the client's close frame
    assert (dropin.code, dropin.ended) == (1001, "fin"), dropin
    # WEBSOCKET_CLOSE_TIMEOUT, then the lingering close (IDLE_LINGER's idle 0.5 s).
    assert graceful_uvicorn.WEBSOCKET_CLOSE_TIMEOUT <= dropin.exited < 5.0, dropin


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("websocket", ["wsproto", "websockets-sansio"])
def test_uvicorn_websocket_send_after_close_is_a_disconnect(websocket: str, loop: str) -> None:
    """An app still sending after the drop-in's close frame gets an OSError, not a logged error."""
    _need_websocket(websocket)
    # The client is slow to answer the close frame: the app sends in between.
    stock = websocket_shutdown(_argv("h11", loop, ws=websocket), path="/chatty", echo=False)
    dropin_argv = _argv(DROPIN["h11"], loop, ws=websocket)
    dropin = websocket_shutdown(dropin_argv, path="/chatty", echo=False)
    assert stock.code == 1012, stock
    assert (dropin.code, dropin.ended) == (1001, "fin"), dropin
    assert dropin.in_order, dropin
    assert len(dropin.messages) >= MESSAGES, dropin
    assert b"Exception in ASGI application" not in dropin.log, dropin.log.decode()
