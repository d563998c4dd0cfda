"""aiograceful.hypercorn against the real hypercorn: stock loses answers, the drop-in does not.

The server is hypercorn's own ``serve()`` or ``aiograceful.hypercorn.serve()``
with ``tests/_asgi_app.py``, in a subprocess on 127.0.0.1, on asyncio's loop
and on uvloop. Each check first shows the stock server losing, then the
drop-in delivering every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import http.client
import socket
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("hypercorn")

from _asgi_app import event_stream
from _dropins import (
    HOST,
    ab_uploads,
    answer,
    assert_dropin_loses_nothing_in_race,
    assert_stalled_stream_gets_what_stock_delivers,
    assert_stock_loses_in_race,
    connect_each_iteration,
    curl_uploads,
    httpclient_uploads,
    hypercorn_serving,
    node_uploads,
    python,
    queued_connections,
    server_process,
    wget_uploads,
)
from _util import (
    SMALL_RCVBUF,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    assert_still_accepts,
    paced_read,
    read_stream_and_close,
    recv_until_eof,
    set_linger_zero,
    wait_for_tcp_state,
)
from _websocket import MESSAGES, websocket_shutdown

from aiograceful import CloseOutcome, CloseResult, LingerOptions
from aiograceful._ending import Ending

LOOPS = ["asyncio", "uvloop"]


def _argv(build: str, loop: str) -> list[str]:
    return [python(), "tests/_serve_main.py", "hypercorn", build, loop]


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[str, bool], int]]:
    """``servers(loop, dropin) -> port``: one hypercorn per combination, started on use."""
    started: dict[tuple[str, bool], int] = {}
    with contextlib.ExitStack() as stack:

        def get(loop: str, dropin: bool) -> int:
            if (loop, dropin) not in started:
                build = "dropin" if dropin else "stock"
                _proc, port = stack.enter_context(server_process(_argv(build, loop)))
                started[loop, dropin] = port
            return started[loop, dropin]

        yield get


def _httpclient_close(port: int, rounds: int) -> tuple[int, int]:
    return httpclient_uploads(port, rounds, "Connection: close")


# (name, client, rounds). Stock hypercorn resets every one of them while it
# uploads except curl, which reads while it sends.
CLIENTS: list[tuple[str, Callable[[int, int], tuple[int, int]], int, bool]] = [
    ("http.client keep-alive", httpclient_uploads, 4, True),
    ("http.client Connection: close", _httpclient_close, 4, True),
    ("node", node_uploads, 4, True),
    ("wget", wget_uploads, 3, True),
    ("ab", ab_uploads, 3, True),
    ("curl -H Expect:", curl_uploads, 3, False),
]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("client", "rounds", "stock_loses"),
    [pytest.param(c, n, s, id=name) for name, c, n, s in CLIENTS],
)
def test_hypercorn_early_413_reaches_every_client(
    servers: Callable[[str, bool], int],
    loop: str,
    client: Callable[[int, int], tuple[int, int]],
    rounds: int,
    stock_loses: bool,
) -> None:
    """Stock hypercorn resets an upload it answered early; the drop-in's client reads the 413."""
    if stock_loses:
        answered, total = client(servers(loop, False), rounds)
        assert answered < total, f"stock hypercorn delivered {answered}/{total}: no hazard shown"
    answered, total = client(servers(loop, True), rounds)
    assert answered == total, f"the drop-in delivered the 413 {answered}/{total} times"


@pytest.mark.parametrize("loop", LOOPS)
def test_hypercorn_shutdown_race_stock_loses_requests(loop: str) -> None:
    """Stock hypercorn at SIGTERM: keep-alive clients sending back to back lose requests."""
    assert_stock_loses_in_race(_argv("stock", loop), "hypercorn")


@pytest.mark.parametrize("loop", LOOPS)
def test_hypercorn_shutdown_race_dropin_loses_nothing(loop: str) -> None:
    """The drop-in at SIGTERM: every request sent on an open connection is answered."""
    assert_dropin_loses_nothing_in_race(_argv("dropin", loop))


@pytest.mark.parametrize("loop", LOOPS)
def test_hypercorn_dropin_answers_a_half_closed_client(
    servers: Callable[[str, bool], int], loop: str
) -> None:
    """A request then the client's FIN: the drop-in answers, then closes (a FIN).

    (Stock hypercorn answers too, then holds the connection for its
    keep-alive timeout.)
    """
    with socket.create_connection((HOST, servers(loop, True)), timeout=3) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data
    assert data.endswith(b"ok\n"), data


# -- the accept queue at shutdown ------------------------------------------------------------


_GET_CLOSE = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


async def _arriving_at_shutdown(serve: Callable[..., Awaitable[None]]) -> list[bytes | str]:
    """Connections arriving, one per loop iteration, as hypercorn's shutdown begins; a GET
    on each; what each got (the answer, or the error)."""
    socks: list[socket.socket] = []
    async with hypercorn_serving(serve) as (port, stop):
        # One served request first: hypercorn is up and accepting.
        warm = await asyncio.to_thread(
            answer, socket.create_connection((HOST, port), 5), None, _GET_CLOSE
        )
        assert isinstance(warm, bytes), warm
        assert warm.startswith(b"HTTP/1.1 200"), warm
        stop.set()
        connect_each_iteration(asyncio.get_running_loop(), port, socks)
        for _ in range(200):  # until a connect is refused (the listener is gone)
            await asyncio.sleep(0.005)
            if len(socks) >= 50 or not _accepting(port):
                break
        got = await asyncio.gather(*(asyncio.to_thread(answer, s) for s in socks))
    return list(got)


def _accepting(port: int) -> bool:
    """A connect completes: False once it is refused or unanswered (a draining listener).

    Short, as connect_each_iteration's: it blocks the loop while it waits.
    """
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _answered(got: list[bytes | str]) -> int:
    return sum(isinstance(g, bytes) and g.startswith(b"HTTP/1.1 200") for g in got)


async def test_hypercorn_connections_arriving_at_shutdown_are_answered() -> None:
    """Connections that arrive as the shutdown begins: stock hypercorn answers none of them
    (closed at once, reset from the accept queue, or accepted and dropped as the listener
    closes); the drop-in accepts them all, draining the queue, and answers each."""
    from hypercorn.asyncio import serve as stock_serve

    from aiograceful.hypercorn import serve

    previous_hook = sys.unraisablehook
    stock_leaks: list[str] = []

    def leak_hook(unraisable: Any) -> None:
        # CPython 3.13.0: such a transport's __del__ detaches it from a
        # server whose waiters are gone (TypeError). Stock's leak, not ours.
        where = getattr(unraisable.object, "__qualname__", "")
        if where == "_SelectorTransport.__del__" and unraisable.exc_type is TypeError:
            stock_leaks.append(where)
        else:
            previous_hook(unraisable)

    with warnings.catch_warnings(record=True) as leaked:
        # On asyncio's loop, a connection accepted in the iteration in which
        # the listener closes gets a transport the server refuses to attach:
        # nothing serves it, nothing closes it; its socket is collected here.
        warnings.simplefilter("always", ResourceWarning)
        sys.unraisablehook = leak_hook
        try:
            stock = await _arriving_at_shutdown(stock_serve)
            gc.collect()
        finally:
            sys.unraisablehook = previous_hook
    assert stock, "no connection arrived during the shutdown"
    assert all(issubclass(w.category, ResourceWarning) for w in leaked), leaked
    assert _answered(stock) < len(stock), stock
    got = await _arriving_at_shutdown(serve)
    assert got, "no connection arrived during the shutdown"
    assert _answered(got) == len(got), got
    assert all(b"connection: close" in g.lower() for g in got if isinstance(g, bytes)), got


async def test_hypercorn_fd_bind_is_left_unfiltered() -> None:
    """An ``fd://`` bind's socket may be another process's too (systemd's): the drop-in drains
    it without the SYN filter, so it still takes connections after hypercorn stops."""
    from _asgi_app import app
    from hypercorn.config import Config

    from aiograceful.hypercorn import serve as dropin_serve

    serve: Callable[..., Awaitable[None]] = dropin_serve  # the app is typed loosely
    listener = socket.create_server((HOST, 0), backlog=16)
    keeper = listener.dup()  # the supervisor's copy
    port = listener.getsockname()[1]
    with keeper:
        config = Config()
        config.bind = [f"fd://{listener.detach()}"]
        stop = asyncio.Event()
        task = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait))
        for _ in range(200):  # until hypercorn serves (bounded: 2 s)
            await asyncio.sleep(0.01)
            if await asyncio.to_thread(_accepting, port):
                break
        stop.set()
        await asyncio.wait_for(task, 20)
        await assert_still_accepts(keeper, HOST, port)


async def test_hypercorn_listener_drains_its_accept_queue() -> None:
    """A listener closed with connections in its accept queue: asyncio's server (hypercorn's)
    resets them; the drop-in's listener serves each through hypercorn's callback."""
    from aiograceful.hypercorn import _start_server

    results = {}
    for name, start in (("stock", asyncio.start_server), ("dropin", _start_server)):
        served = 0

        async def callback(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal served
            served += 1
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            writer.close()

        server = await start(callback, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        socks = queued_connections(port, 4)  # the loop accepts none of them before close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        got = await asyncio.gather(*(asyncio.to_thread(answer, s) for s in socks))
        results[name] = (served, _answered(list(got)), got)
    assert results["stock"][:2] == (0, 0), results
    assert results["dropin"][:2] == (4, 4), results


# -- send_timeout: a client that stops reading -------------------------------------------------

#: The download: a little more than the buffers on the way hold (the
#: server's kernel with SO_SNDBUF _SNDBUF, its transport's 64 KiB, the client's).
_BODY = 896 << 10
_SNDBUF = 256 << 10
#: The client stops reading with at least this much of the download still to
#: come: more than its receive buffer holds, so that some stays unacknowledged.
_LEFT = 192 << 10
_RATE = 256 << 10  # bytes/s the client reads at, until it stops
_SEND_TIMEOUT = 1.0
#: The client stops this long after the drop-in's close began (if _LEFT is not reached first).
_READ_DURING_CLOSE = 1.5 * _SEND_TIMEOUT


async def _download_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """GET: ``_BODY`` bytes, in 16 KiB sends (each waits for flow control)."""
    if scope["type"] != "http":
        return
    headers = [(b"content-length", str(_BODY).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    chunk = b"x" * (16 << 10)
    for _ in range(_BODY // len(chunk) - 1):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": chunk})


def _read_then_stop(
    port: int, stopped: list[float], closes: list[tuple[float, Any]]
) -> socket.socket:
    """GET with Connection: close through a small receive buffer, read at ``_RATE`` until
    ``_LEFT`` bytes are still to come, or ``_READ_DURING_CLOSE`` after the close began
    (``closes``), then stop reading (the socket stays open: returned)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.settimeout(10)
    sock.connect((HOST, port))
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    got = 0
    for _ in range(10_000):  # bounded by the byte count too
        if got >= _BODY - _LEFT:
            break
        if closes and time.monotonic() - closes[0][0] >= _READ_DURING_CLOSE:
            break
        chunk = sock.recv(8 << 10)
        assert chunk, f"the download ended after {got} bytes"
        got += len(chunk)
        time.sleep(len(chunk) / _RATE)
    stopped.append(time.monotonic())
    return sock


async def test_hypercorn_send_timeout_ends_a_close_the_client_stopped_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that reads slowly, then stops: stock hypercorn's close waits on it without a
    bound; the drop-in's close lasts while bytes are acknowledged (longer than send_timeout),
    then ends send_timeout after the client stopped (IDLE_TIMEOUT, bytes left unacked, RST)."""
    from hypercorn.asyncio import serve as stock_serve

    import aiograceful.hypercorn as graceful_hypercorn

    monkeypatch.setattr(
        graceful_hypercorn.GracefulTCPServer,
        "linger",
        LingerOptions(send_timeout=_SEND_TIMEOUT, timeout=5.0, idle_timeout=1.0),
    )
    closes: list[tuple[float, asyncio.Future[CloseResult]]] = []
    real_close = Ending.close

    def recording_close(self: Ending) -> None:
        if not self.closing:
            assert self.options.send_timeout == _SEND_TIMEOUT, self.options
            closes.append((time.monotonic(), self.linger.future()))
        real_close(self)

    monkeypatch.setattr(Ending, "close", recording_close)
    options: dict[str, Any] = {"app": _download_app, "sndbuf": _SNDBUF, "graceful_timeout": 1.0}

    # Stock: once the client stops reading, nothing ends the close.
    stopped: list[float] = []
    async with hypercorn_serving(stock_serve, **options) as (port, _stop):
        sock = await asyncio.to_thread(_read_then_stop, port, stopped, closes)
        with sock:
            state = await wait_for_tcp_state(sock, TCP_CLOSE, within=_SEND_TIMEOUT + 2.0)
            assert state == TCP_ESTABLISHED, state  # no RST: the stock close still waits
            set_linger_zero(sock)  # end it from our side
    assert not closes  # (stock never called the drop-in's close)

    # The drop-in.
    stopped.clear()
    async with hypercorn_serving(graceful_hypercorn.serve, **options) as (port, _stop):
        sock = await asyncio.to_thread(_read_then_stop, port, stopped, closes)
        with sock:
            assert closes, "the close had not begun when the client stopped reading"
            began, fut = closes[0]
            # The close began while the client still read, more than send_timeout before
            # it stopped: bytes were acknowledged all along, and it was not cut.
            assert stopped[0] - began > _SEND_TIMEOUT, (began, stopped)
            assert not fut.done(), fut
            result = await asyncio.wait_for(fut, _SEND_TIMEOUT + 5.0)
            rest, error = await asyncio.to_thread(recv_until_eof, sock)
    assert result.outcome is CloseOutcome.IDLE_TIMEOUT, result
    assert result.unacked is not None, result
    assert result.unacked > 0, result
    assert error is None, error  # a FIN, not a RST
    assert rest  # what the client had not acknowledged still came


# -- the shared shutdown order: bounds, the quiet window, the operations -----------------

_GRACE = 2.0
_FORCE = 1.0  # DEFAULT_FORCE_TIMEOUT
#: What a shutdown may take past grace + force: the loop's short waits.
_SLACK = 1.0


async def _endless_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """GET: a download that never ends (bounded: 64 MiB in 16 KiB sends)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    chunk = b"x" * (16 << 10)
    for _ in range((64 << 20) // len(chunk)):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _servers() -> list[tuple[str, Callable[..., Awaitable[None]]]]:
    from hypercorn.asyncio import serve as stock_serve

    from aiograceful.hypercorn import serve as dropin_serve

    return [("stock", stock_serve), ("dropin", dropin_serve)]


def _get_one(sock: socket.socket) -> None:
    """GET / on a keep-alive connection and read its answer (headers and ``ok``)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    first = b""
    for _ in range(10):  # a few segments at most
        first += sock.recv(65536)
        if first.endswith(b"ok\n"):
            break
    assert first.startswith(b"HTTP/1.1 200"), first
    assert first.endswith(b"ok\n"), first


async def test_hypercorn_serve_idle_connection_fin_within_2s() -> None:
    """At shutdown an idle keep-alive connection gets its FIN within 2 s (the quiet window),
    not after hypercorn's keep-alive timeout; stock closes it at once (racing requests lost)."""
    seen: dict[str, float] = {}
    for name, serve in _servers():
        async with hypercorn_serving(serve, keep_alive_timeout=5.0) as (port, stop):
            sock = await asyncio.to_thread(socket.create_connection, (HOST, port), 5)
            with sock:
                sock.settimeout(10)
                await asyncio.to_thread(_get_one, sock)
                started = time.monotonic()
                stop.set()
                rest, error = await asyncio.to_thread(recv_until_eof, sock)
                seen[name] = time.monotonic() - started
                assert rest == b"", rest
                assert error is None, error  # a FIN
    assert seen["dropin"] < 2.0, seen
    assert seen["stock"] < 1.0, seen


def _stall(port: int) -> socket.socket:
    """GET the endless download through a small receive buffer, then read nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.settimeout(15)
    sock.connect((HOST, port))
    sock.sendall(b"GET /endless HTTP/1.1\r\nHost: t\r\n\r\n")
    return sock


async def test_hypercorn_serve_stalled_client_bounded_shutdown() -> None:
    """A client that stops reading a download: the drop-in's shutdown ends within
    graceful_timeout + force_timeout (stock hypercorn's
    cancelled close waits on such a client without a bound: not run here)."""
    durations: dict[str, float] = {}
    for name, serve in _servers()[1:]:  # stock: see the docstring
        serving = hypercorn_serving(
            serve, app=_endless_app, sndbuf=_SNDBUF, graceful_timeout=_GRACE
        )
        async with serving as (port, stop):
            sock = await asyncio.to_thread(_stall, port)
            await asyncio.sleep(0.3)  # the buffers fill; the app waits on flow control
            started = time.monotonic()
            stop.set()
        durations[name] = time.monotonic() - started
        sock.close()
    assert durations["dropin"] < _GRACE + _FORCE + _SLACK, durations


async def test_hypercorn_serve_slow_reader_bounded_shutdown() -> None:
    """A client reading 1 KiB every 100 ms: the drop-in's shutdown ends within
    graceful_timeout + force_timeout (stock hypercorn's cancelled close waits on it, and
    its cancelled task reaches the loop's exception handler: not run here)."""
    durations: dict[str, float] = {}
    request = b"GET /endless HTTP/1.1\r\nHost: t\r\n\r\n"
    for name, serve in _servers()[1:]:  # stock: see the docstring
        serving = hypercorn_serving(
            serve, app=_endless_app, sndbuf=_SNDBUF, graceful_timeout=_GRACE
        )
        async with serving as (port, stop):
            # Reads for ~6 s at 10 KiB/s (longer than the bound), then closes.
            reading = asyncio.ensure_future(
                asyncio.to_thread(paced_read, port, request, 10 << 10, expect=60 << 10)
            )
            await asyncio.sleep(0.5)
            started = time.monotonic()
            stop.set()
        durations[name] = time.monotonic() - started
        got, _how = await asyncio.wait_for(reading, 20)
        assert got > 0, got
    assert durations["dropin"] < _GRACE + _FORCE + _SLACK, durations


def _back_to_back(port: int, until: float) -> int:
    """GET / back to back on keep-alive connections until ``until``; the answers read."""
    answered = 0
    conn: http.client.HTTPConnection | None = None
    for _ in range(100_000):  # bounded by ``until`` too
        if time.monotonic() >= until:
            break
        if conn is None:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            break
        answered += 1
        if response.will_close:
            break
    if conn is not None:
        conn.close()
    return answered


async def test_hypercorn_serve_keepalive_load_shutdown_is_prompt() -> None:
    """Keep-alive clients sending back to back at shutdown: each is answered with
    Connection: close and the drop-in's shutdown ends at once (no full quiet window)."""
    from aiograceful.hypercorn import serve

    async with hypercorn_serving(serve) as (port, stop):
        until = time.monotonic() + 5.0
        clients = [
            asyncio.ensure_future(asyncio.to_thread(_back_to_back, port, until)) for _ in range(3)
        ]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        stop.set()
    duration = time.monotonic() - started
    answered = await asyncio.wait_for(asyncio.gather(*clients), 10)
    assert all(answered), answered
    assert duration < 0.6, duration


async def test_hypercorn_serve_drain_delay_notice_and_stats() -> None:
    """``serve(..., drain_delay=, control=)``: the notice is set at once, a new connection
    is still accepted and answered (Connection: close) during the delay, stats count it."""
    from aiograceful import ShutdownPhase
    from aiograceful.hypercorn import Control, serve

    control = Control()
    dropin = functools.partial(serve, drain_delay=0.6, control=control)
    async with hypercorn_serving(dropin) as (port, stop):
        before = control.stats
        assert not control.notice.is_set()
        stop.set()
        await asyncio.sleep(0.2)
        during = control.stats
        assert control.notice.is_set()
        sock = await asyncio.to_thread(socket.create_connection, (HOST, port), 5)
        with sock:
            sock.settimeout(10)
            await asyncio.to_thread(sock.sendall, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            answer_bytes, _error = await asyncio.to_thread(recv_until_eof, sock)
    assert before.phase is ShutdownPhase.SERVING, before
    assert during.phase is ShutdownPhase.DRAIN_DELAY, during
    assert answer_bytes.startswith(b"HTTP/1.1 200"), answer_bytes
    assert b"connection: close" in answer_bytes.lower(), answer_bytes
    after = control.stats
    assert after.phase is ShutdownPhase.DONE, after
    assert after.closed == 1, after
    assert after.active == 0, after
    assert after.shutdown_duration is not None, after
    # A difference of two loop.time() readings: 0.6 can come out as 0.59999999999945.
    assert after.shutdown_duration >= 0.6 - 1e-9, after


@pytest.mark.parametrize("loop", LOOPS)
def test_hypercorn_stalled_stream_client_gets_what_stock_delivers(loop: str) -> None:
    """A client that stops reading an event stream at SIGTERM gets, once the server is gone,
    what stock hypercorn leaves it when killed (the kernel's buffer, then a FIN), in bounds."""
    grace = "1.0"
    stock = [python(), "tests/_serve_main.py", "hypercorn", "stock", loop, grace]
    dropin = [python(), "tests/_serve_main.py", "hypercorn", "dropin", loop, grace]
    # Stock hypercorn waits on the stalled client without a bound: a supervisor
    # kills it (the kernel still delivers what it holds). The drop-in's bound:
    # its grace and the force (1 s).
    assert_stalled_stream_gets_what_stock_delivers(stock, dropin, 1.0 + 1.0, stock_kill_after=5)


@pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="stock hypercorn's side differs on Python >= 3.12 (its WebSocket ends 1006 after a "
    "timeout; its cancel reaches no handler): not yet measured there",
)
@pytest.mark.parametrize("loop", LOOPS)
def test_hypercorn_websocket_shutdown_goes_away(loop: str) -> None:
    """At shutdown stock hypercorn's WebSocket gets 1011 after the grace; the drop-in's 1001."""
    stock = websocket_shutdown([*_argv("stock", loop), "2"])
    dropin = websocket_shutdown([*_argv("dropin", loop), "2"])
    assert (stock.code, stock.ended) == (1011, "fin"), stock  # the app cancelled: internal error
    assert (dropin.code, dropin.ended) == (1001, "fin"), dropin
    assert dropin.in_order, dropin
    assert len(dropin.messages) == MESSAGES, dropin
    assert dropin.exited < 2.0, dropin  # within the grace, not after it


async def _stream_at_shutdown(dropin: bool) -> tuple[bytes, OSError | None, float]:
    """An event stream's client, hypercorn shut down 0.3 s in: what it read, its error, seconds.

    The app ends its stream once ``control.notice`` is set (the drop-in's);
    stock hypercorn has none.
    """
    from hypercorn.asyncio import serve as stock_serve

    from aiograceful.hypercorn import Control
    from aiograceful.hypercorn import serve as dropin_serve

    control = Control()
    app = event_stream(lambda: dropin and control.notice.is_set())
    serve = functools.partial(dropin_serve, control=control) if dropin else stock_serve
    loop = asyncio.get_running_loop()
    async with hypercorn_serving(serve, app=app, graceful_timeout=1.0) as (port, stop):
        sock = await asyncio.to_thread(socket.create_connection, (HOST, port), 10)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n")
        reading = asyncio.ensure_future(asyncio.to_thread(read_stream_and_close, sock))
        await asyncio.sleep(0.3)
        began = loop.time()
        stop.set()
    took = loop.time() - began
    got, error = await asyncio.wait_for(reading, 10)
    return got, error, took


@pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="stock hypercorn's side differs on Python >= 3.12 (its WebSocket ends 1006 after a "
    "timeout; its cancel reaches no handler): not yet measured there",
)
async def test_hypercorn_stream_ends_itself_at_the_notice(
    loop_exception_guard: list[dict[str, Any]],
) -> None:
    """A stream that reads Control.notice ends itself; stock hypercorn cuts it after the grace."""
    stock, _stock_error, stock_took = await _stream_at_shutdown(dropin=False)
    # Stock hypercorn's cancel of the app reaches the loop's exception handler
    # (a CancelledError in asyncio's streams callback): shown, then cleared.
    stock_reports = list(loop_exception_guard)
    loop_exception_guard.clear()
    assert stock_reports, "stock hypercorn's cancel reported nothing"
    assert all(isinstance(c.get("exception"), asyncio.CancelledError) for c in stock_reports)
    got, error, took = await _stream_at_shutdown(dropin=True)
    # Stock: no notice to read; the app is cancelled after the grace, its stream cut.
    assert not stock.endswith(b"0\r\n\r\n"), stock[-64:]
    assert stock_took >= 1.0, stock_took
    assert error is None, error
    assert got.endswith(b"event: bye\ndata: shutting down\n\n\r\n0\r\n\r\n"), got[-64:]
    assert took < 1.0, took  # at the notice, not after the grace


@pytest.mark.parametrize("loop", LOOPS)
def test_hypercorn_websocket_send_after_close_is_dropped(loop: str) -> None:
    """An app still sending after the drop-in's close frame is not failed by hypercorn."""
    # The client is slow to answer the close frame: the app sends in between.
    dropin = websocket_shutdown([*_argv("dropin", loop), "2"], path="/chatty", echo=False)
    assert (dropin.code, dropin.ended) == (1001, "fin"), dropin
    assert dropin.in_order, dropin
    assert len(dropin.messages) >= MESSAGES, dropin
    assert b"UnexpectedMessageError" not in dropin.log, dropin.log.decode()
