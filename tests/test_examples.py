"""examples/: the h11 HTTP server and the line server keep their promises over loopback.

The HTTP example is driven with stdlib ``http.client`` (in a thread, since it
blocks) and with curl when it is installed. That the same 413 or 503 is lost
with a plain ``close()`` is shown side by side in tests/test_demo.py and
tests/test_probe.py; here the examples must deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from _util import TCP_CLOSE_WAIT, port_of, tcp_state

from aiograceful._tools.probe import run_probe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


http_example = _load("http_server")
line_example = _load("line_server")


@contextlib.contextmanager
def _http(port: int) -> Iterator[http.client.HTTPConnection]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def _request(
    port: int, method: str = "GET", body: bytes | None = None
) -> tuple[int, str | None, bytes]:
    with _http(port) as conn:
        conn.request(method, "/", body=body)
        response = conn.getresponse()
        return response.status, response.getheader("Connection"), response.read()


def _end_of(sock: socket.socket, timeout: float = 10.0) -> str:
    """How the server ended the connection: 'FIN', 'RST' or 'open'."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return "RST"
    except TimeoutError:
        return "open"
    return "FIN"


# -- the HTTP example ----------------------------------------------------------------


async def test_http_example_keep_alive_requests() -> None:
    """Two requests on one keep-alive connection are both answered."""
    server = await http_example.serve("127.0.0.1", 0)
    async with server:

        def two_requests() -> list[bytes]:
            with _http(port_of(server)) as conn:
                bodies = []
                for body in (None, b"abc"):
                    conn.request("POST" if body else "GET", "/", body=body)
                    bodies.append(conn.getresponse().read())
                return bodies

        assert await asyncio.to_thread(two_requests) == [b"hello\n", b"received 3 bytes\n"]


async def test_http_example_413_reaches_uploading_client() -> None:
    """An upload over the limit gets its 413 read by http.client, not a reset."""
    server = await http_example.serve("127.0.0.1", 0, max_body=64 * 1024)
    async with server:
        status, connection, body = await asyncio.to_thread(
            _request, port_of(server), "POST", b"x" * (4 * 1024 * 1024)
        )
    assert (status, connection, body) == (413, "close", b"body over the limit\n")


async def test_http_example_chunked_body_over_limit_gets_413() -> None:
    """A chunked upload that grows over the limit is answered 413 too."""
    server = await http_example.serve("127.0.0.1", 0, max_body=64 * 1024)
    async with server:

        def chunked() -> int:
            with _http(port_of(server)) as conn:
                conn.request("POST", "/", body=iter([b"y" * 16384] * 64), encode_chunked=True)
                return conn.getresponse().status

        assert await asyncio.to_thread(chunked) == 413


async def test_http_example_503_at_connection_limit() -> None:
    """Over max_connections, a client uploading a form reads the 503."""
    server = await http_example.serve("127.0.0.1", 0, max_connections=1)
    async with server:
        port = port_of(server)
        holder = socket.create_connection(("127.0.0.1", port))
        try:
            async with asyncio.timeout(5):
                while server.connections < 1:  # noqa: ASYNC110 - polls a count
                    await asyncio.sleep(0.01)
            results = await asyncio.gather(
                *(asyncio.to_thread(_request, port, "POST", b"f" * 256 * 1024) for _ in range(3))
            )
        finally:
            holder.close()
    assert [status for status, _, _ in results] == [503, 503, 503]
    assert all(body == b"too many connections, retry.\n" for _, _, body in results)


async def test_http_example_shutdown_closes_idle_keep_alive_at_once() -> None:
    """At shutdown an idle keep-alive connection is closed with a FIN, without waiting grace."""
    server = await http_example.serve("127.0.0.1", 0, grace=30.0)
    port = port_of(server)

    def request_then_stay() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"hello\n"):
            data += sock.recv(4096)
        return sock

    sock = await asyncio.to_thread(request_then_stay)
    with sock:
        started = time.monotonic()
        report = await server.shutdown()
        end = await asyncio.to_thread(_end_of, sock)
    assert end == "FIN"
    assert report.connections == 1
    assert report.forced == 0
    assert time.monotonic() - started < 10.0  # far below grace (30 s)


async def test_http_example_shutdown_pooled_idle_client_gets_fin_not_rst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pooled idle client at shutdown: no handler error, our FIN, and no RST after it.

    The client does not read (as a connection pool does not between requests),
    so it never sends its own FIN; the server must not end that wait with a RST.
    """
    server = await http_example.serve("127.0.0.1", 0, grace=30.0)
    port = port_of(server)

    def request_then_idle() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"hello\n"):
            data += sock.recv(4096)
        return sock

    sock = await asyncio.to_thread(request_then_idle)
    with sock, caplog.at_level(logging.ERROR, logger="aiograceful"):
        report = await server.shutdown()
        await asyncio.sleep(0.2)  # a RST, if one was sent, has arrived
        state = tcp_state(sock)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors  # was: InvalidStateError: Result is not set
    assert state == TCP_CLOSE_WAIT, f"TCP state {state}: the FIN was followed by a RST"
    assert report.connections == 1
    assert report.forced == 0


async def test_http_example_shutdown_answers_request_in_progress_with_connection_close() -> None:
    """A request half-received when the shutdown starts is answered, with Connection: close."""
    server = await http_example.serve("127.0.0.1", 0, grace=10.0)
    port = port_of(server)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        await asyncio.to_thread(conn.connect)
        conn.putrequest("POST", "/")
        conn.putheader("Content-Length", "10")
        await asyncio.to_thread(conn.endheaders, b"12345")
        async with asyncio.timeout(5):
            while server.connections < 1:  # noqa: ASYNC110 - polls a count
                await asyncio.sleep(0.01)
        shutdown = asyncio.ensure_future(server.shutdown())
        await asyncio.wait_for(server.notice.wait(), 5)
        await asyncio.to_thread(conn.send, b"67890")
        response = await asyncio.to_thread(conn.getresponse)
        body = await asyncio.to_thread(response.read)
        report = await asyncio.wait_for(shutdown, 15)
    finally:
        conn.close()
    assert (response.status, response.getheader("Connection"), body) == (
        200,
        "close",
        b"received 10 bytes\n",
    )
    assert report.forced == 0


async def test_http_example_idle_timeout_closes_with_fin() -> None:
    """A keep-alive connection silent past idle_timeout is closed gracefully (FIN)."""
    server = await http_example.serve("127.0.0.1", 0, idle_timeout=0.5)
    async with server:
        port = port_of(server)

        def idle() -> tuple[str, float]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                started = time.monotonic()
                return _end_of(sock), time.monotonic() - started

        end, after = await asyncio.to_thread(idle)
    assert end == "FIN"
    assert after < 0.5 + 5.0


async def test_http_example_passes_probe() -> None:
    """``probe --http`` finds no hazard in the HTTP example."""
    server = await http_example.serve("127.0.0.1", 0, idle_timeout=0.5)
    async with server:
        _, verdicts = await asyncio.to_thread(
            run_probe, "127.0.0.1", port_of(server), http=True, body_size=8 << 20, wait=3, timeout=2
        )
    assert [v.status for v in verdicts] == ["pass"] * 5, verdicts  # 3 early-answer variants


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_http_example_with_curl(tmp_path: Path) -> None:
    """curl gets the 200 and, uploading 4 MiB over a 64 KiB limit, reads the 413."""
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"z" * (4 * 1024 * 1024))
    server = await http_example.serve("127.0.0.1", 0, max_body=64 * 1024)
    async with server:
        url = f"http://127.0.0.1:{port_of(server)}/"

        async def curl(*args: str) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                "curl",
                "-sS",
                "-w",
                "\\n%{http_code}",
                "--max-time",
                "20",
                *args,
                url,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode is not None
            return proc.returncode, out.decode()

        get = await curl()
        post = await curl("-H", "Expect:", "--data-binary", f"@{upload}")
    assert get == (0, "hello\n\n200")
    assert post == (0, "body over the limit\n\n413")


def test_http_example_runs_as_a_script_and_stops_on_sigterm() -> None:
    """``python examples/http_server.py`` serves, and SIGTERM shuts it down with exit 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "http_server.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "serving HTTP" in proc.stdout.readline()
        assert _request(port)[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "shut down in" in out


# -- the line example ---------------------------------------------------------------------


async def test_line_example_commands() -> None:
    """PING, ECHO and an unknown command are answered in order; QUIT ends with BYE and a FIN."""
    server = await line_example.serve("127.0.0.1", 0)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(b"PING\r\nECHO hi there\r\nNOPE\r\nQUIT\r\n")
        data = await asyncio.wait_for(reader.read(), 10)  # to the server's FIN
        writer.close()
        await writer.wait_closed()
    assert data == b"PONG\r\nhi there\r\nERR unknown command\r\nBYE\r\n"


async def test_line_example_shutdown_answers_requests_that_raced_the_notice() -> None:
    """After the notice, lines the client sent before its FIN are all answered, then FIN."""
    server = await line_example.serve("127.0.0.1", 0, grace=10.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    writer.write(b"ECHO 0\r\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"0\r\n"
    shutdown = asyncio.ensure_future(server.shutdown())
    # The client keeps sending until it reads the notice: these race it.
    sent = 1
    lines = []
    async with asyncio.timeout(10):
        while True:
            writer.write(b"ECHO %d\r\n" % sent)
            sent += 1
            line = await reader.readline()
            lines.append(line)
            if line == line_example.NOTICE:
                break
    writer.write(b"ECHO last\r\n")
    writer.write_eof()  # done: the server may close once it has answered
    rest = await asyncio.wait_for(reader.read(), 10)
    report = await asyncio.wait_for(shutdown, 15)
    writer.close()
    await writer.wait_closed()
    answers = [line for line in lines if line != line_example.NOTICE]
    answers += [line + b"\n" for line in rest.split(b"\n") if line]
    expected = [b"%d\r\n" % i for i in range(1, sent)] + [b"last\r\n"]
    assert answers == expected
    assert report.forced == 0


async def test_line_example_long_line_gets_error_not_reset() -> None:
    """A client still sending a 4 MiB line reads ``ERR line too long`` and a FIN."""
    server = await line_example.serve("127.0.0.1", 0)
    async with server:
        port = port_of(server)

        def send_long_line() -> tuple[bytes, str]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"x" * (4 * 1024 * 1024) + b"\r\n")
                sock.shutdown(socket.SHUT_WR)
                data = b""
                sock.settimeout(10)
                try:
                    while chunk := sock.recv(65536):
                        data += chunk
                except ConnectionResetError:
                    return data, "RST"
                return data, "FIN"

        assert await asyncio.to_thread(send_long_line) == (b"ERR line too long\r\n", "FIN")


async def test_line_example_passes_probe() -> None:
    """The raw probe finds no hazard in the line example."""
    server = await line_example.serve("127.0.0.1", 0, idle_timeout=0.5)
    async with server:
        _, verdicts = await asyncio.to_thread(
            run_probe, "127.0.0.1", port_of(server), body_size=8 << 20, wait=3, timeout=2
        )
    assert [v.status for v in verdicts] == ["pass", "pass", "pass"], verdicts
