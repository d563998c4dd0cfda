"""aiograceful.aiohttp against the real aiohttp: its shutdown loses requests, the drop-in not.

aiohttp itself reads away the body of a request it answered early, so its
early 413 reaches every client (shown here for the drop-in too). What it
loses is at shutdown: idle keep-alive connections are closed at once, busy
ones after an answer that did not say Connection: close. The server is
``web.run_app`` or ``aiograceful.aiohttp.run_app`` in a subprocess on
127.0.0.1, on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("aiohttp")

from _dropins import (
    curl_uploads,
    httpclient_uploads,
    node_uploads,
    python,
    server_process,
    shutdown_race,
    wget_uploads,
)

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
    seen = []
    for _ in range(4):
        with server_process(_argv("stock", loop)) as (proc, port):
            counts = shutdown_race(proc, port)
        seen.append(counts)
        assert counts.answered > 0, counts
        if counts.lost:
            break
    assert any(c.lost for c in seen), f"stock aiohttp lost nothing: {seen}"


@pytest.mark.parametrize("loop", LOOPS)
def test_aiohttp_shutdown_race_dropin_loses_nothing(loop: str) -> None:
    """The drop-in at SIGTERM: every request sent on an open connection is answered."""
    for _ in range(2):
        with server_process(_argv("dropin", loop)) as (proc, port):
            counts = shutdown_race(proc, port)
            assert proc.returncode == 0, counts
        assert counts.answered > 0, counts
        assert counts.lost == 0, counts
        assert counts.closes_announced >= 1, counts
