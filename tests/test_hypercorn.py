"""aiograceful.hypercorn against the real hypercorn: stock loses answers, the drop-in does not.

The server is hypercorn's own ``serve()`` or ``aiograceful.hypercorn.serve()``
with ``tests/_asgi_app.py``, in a subprocess on 127.0.0.1, on asyncio's loop
and on uvloop. Each check first shows the stock server losing, then the
drop-in delivering every time.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("hypercorn")

from _dropins import (
    HOST,
    ab_uploads,
    assert_dropin_loses_nothing_in_race,
    assert_stock_loses_in_race,
    curl_uploads,
    httpclient_uploads,
    node_uploads,
    python,
    server_process,
    wget_uploads,
)

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
