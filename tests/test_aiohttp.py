"""aiograceful.aiohttp against the real aiohttp: its shutdown loses requests, the drop-in not.

aiohttp itself reads away the body of a request it answered early, so its
early 413 reaches every client (shown here for the drop-in too). What it
loses is at shutdown: idle keep-alive connections are closed at once, busy
ones after an answer that did not say Connection: close. The server is
``web.run_app`` or ``aiograceful.aiohttp.run_app`` in a subprocess on
127.0.0.1, on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("aiohttp")

import aiohttp
from _dropins import (
    HOST,
    assert_dropin_loses_nothing_in_race,
    assert_stalled_stream_gets_what_stock_delivers,
    assert_stock_loses_in_race,
    curl_uploads,
    httpclient_uploads,
    node_uploads,
    python,
    server_process,
    wget_uploads,
)
from _util import assert_still_accepts, read_stream_and_close, recv_until_eof
from _websocket import MESSAGES, websocket_shutdown

from aiograceful._versions import release

LOOPS = ["asyncio", "uvloop"]


def _argv(build: str, loop: str) -> list[str]:
    return [python(), "tests/_serve_main.py", "aiohttp", build, loop]


@pytest.fixture(scope="module")
def dropin_servers() -> Iterator[Callable[[str], int]]:
    """``dropin_servers(loop) -> port``: one drop-in aiohttp per loop, started on use."""
    started: dict[str, int] = {}
    with contextlib.ExitStack() as stack:

        def get(loop: str) -> int:
            if loop not in started:
                _proc, port = stack.enter_context(server_process(_argv("dropin", loop)))
                started[loop] = port
            return started[loop]

        yield get


def _httpclient_close(port: int, rounds: int) -> tuple[int, int]:
    return httpclient_uploads(port, rounds, "Connection: close")


CLIENTS: list[tuple[str, Callable[[int, int], tuple[int, int]], int]] = [
    ("http.client keep-alive", httpclient_uploads, 3),
    ("http.client Connection: close", _httpclient_close, 3),
    ("node", node_uploads, 3),
    ("wget", wget_uploads, 3),
    ("curl -H Expect:", curl_uploads, 3),
]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("client", "rounds"), [pytest.param(c, n, id=name) for name, c, n in CLIENTS]
)
def test_aiohttp_dropin_early_413_reaches_every_client(
    dropin_servers: Callable[[str], int],
    loop: str,
    client: Callable[[int, int], tuple[int, int]],
    rounds: int,
) -> None:
    """The drop-in keeps aiohttp's own drain of an early-answered body: every 413 arrives."""
    answered, total = client(dropin_servers(loop), rounds)
    assert answered == total, f"the drop-in delivered the 413 {answered}/{total} times"


@pytest.mark.parametrize("loop", LOOPS)
def test_aiohttp_shutdown_race_stock_loses_requests(loop: str) -> None:
    """Stock aiohttp at SIGTERM: keep-alive clients sending back to back lose requests."""
    assert_stock_loses_in_race(_argv("stock", loop), "aiohttp")


@pytest.mark.parametrize("loop", LOOPS)
def test_aiohttp_shutdown_race_dropin_loses_nothing(loop: str) -> None:
    """The drop-in at SIGTERM: every request sent on an open connection is answered."""
    assert_dropin_loses_nothing_in_race(_argv("dropin", loop))


async def test_aiohttp_app_runner_notice_and_quiet_window() -> None:
    """``GracefulAppRunner`` + ``TCPSite``: at cleanup, an idle keep-alive connection stays
    open for the quiet window, and a request sent in it is answered with Connection: close.

    (Stock ``web.AppRunner`` closes that connection at once: the request is lost.)
    """
    from aiohttp import web

    from aiograceful.aiohttp import GracefulAppRunner

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    results = {}
    for name, runner_class in (("stock", web.AppRunner), ("dropin", GracefulAppRunner)):
        app = web.Application()
        app.add_routes([web.get("/", ok)])
        runner = runner_class(app, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = runner.addresses[0][1]
        sock = await asyncio.to_thread(socket.create_connection, (HOST, port), 5)
        with sock:
            await asyncio.to_thread(sock.sendall, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            first = await asyncio.to_thread(_read_answer, sock)
            cleanup = asyncio.ensure_future(runner.cleanup())
            await asyncio.sleep(0.2)  # the shutdown has begun; the connection is idle
            try:
                await asyncio.to_thread(sock.sendall, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                second = await asyncio.to_thread(_read_answer, sock)
            except OSError as exc:
                second = repr(exc).encode()
            await asyncio.wait_for(cleanup, 20)
        assert first.startswith(b"HTTP/1.1 200"), first
        results[name] = second
    assert not results["stock"].startswith(b"HTTP/1.1 200"), results
    assert results["dropin"].startswith(b"HTTP/1.1 200"), results
    assert b"connection: close" in results["dropin"].lower(), results


def _read_answer(sock: socket.socket) -> bytes:
    """One answer (headers and a 3-byte body), or what came before the connection ended."""
    data = b""
    while not data.endswith(b"ok\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


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
def test_aiohttp_half_closed_client_gets_its_answer(
    dropin_servers: Callable[[str], int], loop: str
) -> None:
    """A request, then the client's FIN: stock aiohttp drops the answer, the drop-in sends it."""
    with server_process(_argv("stock", loop)) as (_proc, port):
        assert _get_then_half_close(port) == b""
    data = _get_then_half_close(dropin_servers(loop))
    assert data.startswith(b"HTTP/1.1 200"), data
    assert data.endswith(b"ok\n"), data
    assert b"connection: close" in data.lower(), data


async def test_aiohttp_app_runner_drains_the_accept_queue() -> None:
    """Connections queued at cleanup: ``web.AppRunner`` resets them, ``GracefulAppRunner``
    answers each (with Connection: close)."""
    from aiohttp import web

    from aiograceful.aiohttp import GracefulAppRunner

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    answered = {}
    for name, runner_class in (("stock", web.AppRunner), ("dropin", GracefulAppRunner)):
        app = web.Application()
        app.add_routes([web.get("/", ok)])
        runner = runner_class(app, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = runner.addresses[0][1]
        # Blocking connects from the loop's own thread: the kernel completes
        # the handshakes; the loop accepts none before the cleanup begins.
        socks = []
        for _ in range(4):
            sock = socket.create_connection((HOST, port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            socks.append(sock)
        cleanup = asyncio.ensure_future(runner.cleanup())
        answers = await asyncio.gather(*(asyncio.to_thread(_read_all, s) for s in socks))
        await asyncio.wait_for(cleanup, 20)
        answered[name] = sum(a.startswith(b"HTTP/1.1 200") for a in answers)
    assert answered["stock"] < 4, answered
    assert answered["dropin"] == 4, answered


async def test_aiohttp_sock_site_is_left_unfiltered() -> None:
    """A ``SockSite``'s socket is someone else's too (gunicorn's worker, a supervisor): the
    drop-in drains it without the SYN filter, so it still takes connections after cleanup."""
    from aiohttp import web

    from aiograceful.aiohttp import GracefulAppRunner

    listener = socket.create_server((HOST, 0), backlog=16)
    keeper = listener.dup()
    with keeper:
        runner = GracefulAppRunner(web.Application(), shutdown_timeout=2.0)
        await runner.setup()
        await web.SockSite(runner, listener).start()
        port = listener.getsockname()[1]
        await asyncio.wait_for(runner.cleanup(), 20)
        await assert_still_accepts(keeper, HOST, port)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    with sock, contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


@contextlib.asynccontextmanager
async def _running(
    runner_class: type[Any], routes: list[Any], **kwargs: Any
) -> AsyncIterator[tuple[Any, int]]:
    """``runner_class(app, **kwargs)`` with ``routes`` on a TCPSite at 127.0.0.1:0; (runner, port).

    Cleaned up on the way out if the test did not do it.
    """
    from aiohttp import web

    app = web.Application()
    app.add_routes(routes)
    runner = runner_class(app, **kwargs)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, 0).start()
        yield runner, runner.addresses[0][1]
    finally:
        if runner.server is not None:
            await asyncio.wait_for(runner.cleanup(), 20)


def _ok_routes() -> list[Any]:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    return [web.get("/", ok)]


async def _seconds_to_fin(runner: Any, port: int) -> tuple[float, float]:
    """One answered request on a keep-alive connection, then cleanup: (to the FIN, to the end)."""
    loop = asyncio.get_running_loop()
    sock = await asyncio.to_thread(socket.create_connection, (HOST, port), 5)
    with sock:
        await asyncio.to_thread(sock.sendall, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        first = await asyncio.to_thread(_read_answer, sock)
        assert first.startswith(b"HTTP/1.1 200"), first
        started = loop.time()
        cleanup = asyncio.ensure_future(runner.cleanup())
        sock.settimeout(15)
        rest, error = await asyncio.to_thread(recv_until_eof, sock)
        to_fin = loop.time() - started
        assert rest == b"", rest  # a FIN, nothing more
        assert error is None, error
        await asyncio.wait_for(cleanup, 20)
        return to_fin, loop.time() - started


async def test_aiohttp_app_runner_idle_connection_fin_within_2s() -> None:
    """At cleanup an idle keep-alive connection gets its FIN within 2 s (the quiet window),
    and the cleanup ends soon after; stock closes it at once (losing a racing request)."""
    from aiohttp import web

    from aiograceful.aiohttp import SHUTDOWN_QUIET, GracefulAppRunner

    seen = {}
    for name, runner_class in (("stock", web.AppRunner), ("dropin", GracefulAppRunner)):
        async with _running(
            runner_class, _ok_routes(), shutdown_timeout=5.0, keepalive_timeout=30.0
        ) as (runner, port):
            seen[name] = await _seconds_to_fin(runner, port)
    to_fin, total = seen["dropin"]
    assert SHUTDOWN_QUIET * 0.8 <= to_fin < 2.0, seen
    assert total < 2.5, seen
    assert seen["stock"][0] < 1.0, seen


def _sse_routes() -> list[Any]:
    """``GET /events``: an endless event stream (bounded to 600 events, one every 50 ms)."""
    from aiohttp import web

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(600):
            await resp.write(b"data: %d\n\n" % i)
            await asyncio.sleep(0.05)
        return resp

    return [web.get("/events", events)]


def _read_stream(sock: socket.socket) -> tuple[bytes, OSError | None]:
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
    return recv_until_eof(sock)


async def test_aiohttp_app_runner_endless_stream_bounded_shutdown() -> None:
    """An endless event stream open at cleanup: stock takes 2x shutdown_timeout (1x before
    aiohttp 3.10.2), the drop-in at most shutdown_timeout + force_timeout (and ends the
    stream with a FIN, not a reset)."""
    from aiohttp import web, web_protocol

    from aiograceful.aiohttp import GracefulAppRunner

    loop = asyncio.get_running_loop()
    grace, force = 1.0, 0.5
    durations = {}
    for name, runner_class, extra in (
        ("stock", web.AppRunner, {}),
        ("dropin", GracefulAppRunner, {"force_timeout": force}),
    ):
        serving = _running(runner_class, _sse_routes(), shutdown_timeout=grace, **extra)
        async with serving as (runner, port):
            sock = await asyncio.to_thread(socket.create_connection, (HOST, port), 5)
            with sock:
                sock.settimeout(15)
                reading = asyncio.ensure_future(asyncio.to_thread(_read_stream, sock))
                await asyncio.sleep(0.3)  # the stream is under way
                started = loop.time()
                await asyncio.wait_for(runner.cleanup(), 20)
                durations[name] = loop.time() - started
                data, error = await asyncio.wait_for(reading, 15)
            assert b"data: 1\n\n" in data, data[:200]
            if name == "dropin":
                assert error is None, error
                stats = runner.stats
                assert stats.forced == 1, stats
                assert stats.closed == 1, stats
    # Stock aiohttp >= 3.10.2 waits shutdown_timeout for the handler, then as long again
    # for its cancellation (its RequestHandler has a _handler_waiter); 3.9 to 3.10.1
    # cancel the handler at once and wait shutdown_timeout for it.
    graceful_wait = hasattr(web_protocol.RequestHandler, "_handler_waiter")
    stock = 2 * grace if graceful_wait else grace
    assert durations["stock"] >= stock - 0.1, durations
    assert durations["dropin"] <= grace + force + 0.5, durations


async def test_aiohttp_app_runner_drain_delay_notice_and_stats() -> None:
    """``GracefulAppRunner(drain_delay=)``: the notice is set at once, a new connection is still
    accepted and answered (Connection: close) during the delay, and ``stats`` counts it."""
    from aiograceful import ShutdownPhase
    from aiograceful.aiohttp import GracefulAppRunner

    loop = asyncio.get_running_loop()
    serving = _running(GracefulAppRunner, _ok_routes(), shutdown_timeout=2.0, drain_delay=0.6)
    async with serving as (runner, port):
        assert not runner.notice.is_set()
        before = runner.stats
        assert before.phase is ShutdownPhase.SERVING, before
        started = loop.time()
        cleanup = asyncio.ensure_future(runner.cleanup())
        await asyncio.sleep(0.2)
        assert runner.notice.is_set()
        during = runner.stats
        assert during.phase is ShutdownPhase.DRAIN_DELAY, during
        sock = await asyncio.to_thread(socket.create_connection, (HOST, port), 5)
        with sock:
            await asyncio.to_thread(sock.sendall, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = await asyncio.to_thread(_read_all, sock)
        await asyncio.wait_for(cleanup, 20)
        duration = loop.time() - started
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b"connection: close" in answer.lower(), answer
    stats = runner.stats
    assert stats.phase is ShutdownPhase.DONE, stats
    assert stats.closed == 1, stats
    assert stats.active == 0, stats
    assert stats.shutdown_duration is not None, stats
    assert 0.6 <= stats.shutdown_duration <= duration, (stats, duration)


@pytest.mark.parametrize("loop", LOOPS)
def test_aiohttp_stalled_stream_client_gets_what_stock_delivers(loop: str) -> None:
    """A client that stops reading an event stream at SIGTERM gets, once the server exited,
    what the stock server's exit leaves it (the kernel's buffer, then a FIN), within bounds."""
    grace = "1.0"
    stock = [python(), "tests/_serve_main.py", "aiohttp", "stock", loop, grace]
    dropin = [python(), "tests/_serve_main.py", "aiohttp", "dropin", loop, grace]
    # The drop-in's bound: its grace, the force (1 s), and its app cleanup.
    assert_stalled_stream_gets_what_stock_delivers(stock, dropin, 1.0 + 1.0)


@pytest.mark.parametrize("loop", LOOPS)
def test_aiohttp_websocket_shutdown_goes_away(loop: str) -> None:
    """At shutdown stock aiohttp's WebSocket ends with no close frame; the drop-in's with 1001
    (aiohttp < 3.10.4: the handler's own 1000, woken before the frame is written)."""
    stock = websocket_shutdown([*_argv("stock", loop), "2"])
    dropin = websocket_shutdown([*_argv("dropin", loop), "2"])
    assert stock.code == 1006, stock  # no close frame: cancelled after shutdown_timeout
    code = 1001 if release(aiohttp.__version__) >= (3, 10, 4) else 1000
    assert (dropin.code, dropin.ended) == (code, "fin"), dropin
    assert dropin.in_order, dropin
    assert len(dropin.messages) == MESSAGES, dropin
    assert dropin.exited < 2.0, dropin  # within the grace, not after it


async def _stream_at_cleanup(dropin: bool) -> tuple[bytes, OSError | None, float]:
    """An event stream's client, the runner cleaned up 0.3 s in: what it read, its error, seconds.

    The handler ends its stream once ``runner.notice`` is set (the drop-in's);
    stock aiohttp's runner has none.
    """
    from aiohttp import web

    from aiograceful.aiohttp import GracefulAppRunner

    runners: list[GracefulAppRunner] = []

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(10_000):  # bounded: 100 s of events; the grace ends it sooner
            if runners and runners[0].notice.is_set():
                await response.write(b"event: bye\ndata: shutting down\n\n")
                await response.write_eof()
                return response
            await response.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        return response

    app = web.Application()
    app.add_routes([web.get("/events", events)])
    runner_class = GracefulAppRunner if dropin else web.AppRunner
    runner = runner_class(app, shutdown_timeout=1.0)
    if isinstance(runner, GracefulAppRunner):
        runners.append(runner)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = runner.addresses[0][1]
    sock = await asyncio.to_thread(socket.create_connection, (HOST, port), 10)
    with sock:
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n")
        reading = asyncio.ensure_future(asyncio.to_thread(read_stream_and_close, sock))
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(runner.cleanup(), 10)
        took = loop.time() - began
        got, error = await asyncio.wait_for(reading, 10)
    return got, error, took


async def test_aiohttp_stream_ends_itself_at_the_notice() -> None:
    """A stream that reads runner.notice ends itself; stock aiohttp cuts it after the grace."""
    stock, _stock_error, stock_took = await _stream_at_cleanup(dropin=False)
    got, error, took = await _stream_at_cleanup(dropin=True)
    # Stock: no notice to read; the handler is cancelled after the grace, its stream cut.
    assert not stock.endswith(b"0\r\n\r\n"), stock[-64:]
    assert stock_took >= 1.0, stock_took
    assert error is None, error
    assert got.endswith(b"event: bye\ndata: shutting down\n\n\r\n0\r\n\r\n"), got[-64:]
    assert took < 1.0, took  # at the notice, not after the grace
