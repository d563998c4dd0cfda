"""``python -m aiograceful probe``: hazards found in a naive server, none in a graceful one.

Each server here exists in two builds that differ only in how they close: a
naive one (``transport.close()``, asyncio's default ``eof_received``) and one
using aiograceful. The probe must call the naive one hazardous (exit 1) and
pass the graceful one (exit 0). Every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from _util import free_port

import aiograceful
from aiograceful import GracefulProtocol, abort, graceful_close, start_server
from aiograceful._tools import cli as _cli
from aiograceful._tools.probe import Verdict, parse_target, run_probe

LIMIT = 1024 * 1024  # bodies over this are answered early with a 413
IDLE = 0.5  # the servers' idle timeout, seconds
PROBE_ARGS = ["--wait", "3", "--timeout", "2", "--body-size", "8M"]


# -- an HTTP server in two builds ----------------------------------------------------


class _NaiveHttp(asyncio.Protocol):
    """A plain asyncio HTTP server: early 413, answers a moment later, closes with close().

    Its ``eof_received`` is asyncio's default, which closes the transport when
    the client half-closes: an answer still being prepared is dropped.
    """

    transport: asyncio.Transport

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.answering = False
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.idle = asyncio.get_running_loop().call_later(IDLE, self.finish)

    def data_received(self, data: bytes) -> None:
        if self.answering:
            return
        self.buffer += data
        head, sep, body = bytes(self.buffer).partition(b"\r\n\r\n")
        if not sep:
            return
        match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
        length = int(match.group(1)) if match else 0
        self.answering = True
        if self.idle is not None:
            self.idle.cancel()
        if length > LIMIT:
            self.transport.write(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.finish()
        elif len(body) >= length:
            # The answer takes a moment (a file, a database): it is written later.
            asyncio.get_running_loop().call_later(0.05, self.respond)

    def respond(self) -> None:
        if self.transport.is_closing():
            return  # the client is gone, as far as this server can tell
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        )
        self.finish()

    def finish(self) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()


class _GracefulHttp(_NaiveHttp, GracefulProtocol):
    """The same server, closing with aiograceful, answering after the client's FIN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        GracefulProtocol.connection_made(self, transport)
        _NaiveHttp.connection_made(self, transport)

    def on_peer_eof(self) -> None:
        if not self.answering:
            self.close_gracefully()
        # else: the answer is on its way; respond() closes after writing it.

    def finish(self) -> None:
        self.close_gracefully()

    def connection_lost(self, exc: Exception | None) -> None:
        _NaiveHttp.connection_lost(self, exc)
        GracefulProtocol.connection_lost(self, exc)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., object]]:
    """Start servers on loopback for one test; close them (and their connections) after."""
    servers: list[asyncio.Server] = []
    protocols: list[asyncio.BaseProtocol] = []

    async def start(factory: Callable[[], asyncio.Protocol]) -> int:
        def tracked() -> asyncio.Protocol:
            proto = factory()
            protocols.append(proto)
            return proto

        server = await asyncio.get_running_loop().create_server(tracked, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
    for proto in protocols:
        transport = getattr(proto, "transport", None)
        if transport is not None and not transport.is_closing():
            abort(transport)
    for proto in protocols:
        if isinstance(proto, GracefulProtocol) and getattr(proto, "transport", None) is not None:
            await asyncio.wait_for(proto.wait_closed(), 5.0)
    for server in servers:
        await server.wait_closed()


async def _probe_cli(*args: str) -> tuple[int, str, str]:
    """Run ``python -m aiograceful probe ARGS`` as a user would; return (status, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiograceful",
        "probe",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _statuses(verdicts: list[Verdict]) -> list[str]:
    return [v.status for v in verdicts]


# -- the checks, one by one, in process ------------------------------------------------


async def test_probe_http_naive_server_hazards(serve: Callable[..., object]) -> None:
    """A naive HTTP server: the early 413 is reset away and the half-closed request unanswered."""
    port = await serve(_NaiveHttp)  # type: ignore[misc]
    _, verdicts = await asyncio.to_thread(
        run_probe, "127.0.0.1", port, http=True, body_size=8 << 20, wait=3, timeout=2
    )
    # The early answer three ways (keep-alive, Connection: close, HTTP/1.0),
    # the half-close, the idle close.
    assert _statuses(verdicts) == ["HAZARD", "HAZARD", "HAZARD", "HAZARD", "pass"], verdicts
    for verdict, variant in zip(
        verdicts[:3], ("keep-alive", "Connection: close", "HTTP/1.0"), strict=True
    ):
        assert variant in verdict.check
        assert "reset" in verdict.evidence
    # Whether the probe's MSG_PEEK saw the 413 before the reset wiped it is a
    # race (on a loaded machine the RST can come first); the reset is the hazard.
    assert "without answering" in verdicts[3].evidence


async def test_probe_http_graceful_server_passes(serve: Callable[..., object]) -> None:
    """The same server closing with aiograceful passes every check."""
    port = await serve(_GracefulHttp)  # type: ignore[misc]
    _, verdicts = await asyncio.to_thread(
        run_probe, "127.0.0.1", port, http=True, body_size=8 << 20, wait=3, timeout=2
    )
    assert _statuses(verdicts) == ["pass"] * 5, verdicts
    assert all("413" in v.evidence for v in verdicts[:3])
    assert "FIN" in verdicts[-1].evidence


async def test_probe_idle_close_reset_is_a_hazard(serve: Callable[..., object]) -> None:
    """A server that ends idle connections with a RST (SO_LINGER 0) fails the idle check."""

    class ResettingIdle(_GracefulHttp):
        def finish(self) -> None:
            if self.answering:
                self.close_gracefully()
            else:
                self.abort()  # the idle timeout: an abortive close

    port = await serve(ResettingIdle)  # type: ignore[misc]
    _, verdicts = await asyncio.to_thread(
        run_probe, "127.0.0.1", port, http=True, body_size=8 << 20, wait=3, timeout=2
    )
    assert verdicts[-1].status == "HAZARD", verdicts
    assert "RST" in verdicts[-1].evidence


async def test_probe_idle_close_inconclusive_without_idle_timeout() -> None:
    """A server that never closes an idle connection leaves the idle check inconclusive."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await start_server(hold, "127.0.0.1", 0, grace=1.0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, verdicts = await asyncio.to_thread(
            run_probe, "127.0.0.1", port, http=False, body_size=1 << 20, wait=1, timeout=1
        )
    assert verdicts[2].status == "inconclusive", verdicts
    assert "still open" in verdicts[2].evidence


# -- raw line servers --------------------------------------------------------------------


async def _line_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """PING -> PONG; a line over the 64 KiB limit gets an error and the end."""
    try:
        while line := await asyncio.wait_for(reader.readline(), IDLE):
            writer.write(b"PONG\r\n" if line.strip() == b"PING" else b"ERR unknown\r\n")
    except ValueError:  # the line limit: StreamReader.readline raises ValueError
        writer.write(b"ERR line too long\r\n")
    except TimeoutError:
        pass


async def test_probe_raw_naive_line_server_hazard() -> None:
    """A line server that answers an over-long line then close()s resets the sender."""

    async def naive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _line_handler(reader, writer)
        writer.close()

    server = await asyncio.start_server(naive, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        status, out, err = await _probe_cli(f"127.0.0.1:{port}", *PROBE_ARGS)
    assert status == 1, out + err
    assert "[HAZARD] early answer" in out
    # The reset is the hazard. Whether the probe's MSG_PEEK saw the error line
    # before the RST wiped it is a race, as for the HTTP server above.
    assert "reset" in out


async def test_probe_raw_graceful_line_server_passes() -> None:
    """The same line server closing with graceful_close passes: exit 0."""

    async def graceful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _line_handler(reader, writer)
        await graceful_close(writer, timeout=5.0)

    server = await asyncio.start_server(graceful, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        status, out, err = await _probe_cli(f"127.0.0.1:{port}", *PROBE_ARGS)
    assert status == 0, out + err
    assert out.count("[pass]") == 3, out


# -- the command line ----------------------------------------------------------------------


async def test_probe_cli_naive_http_exit_1(serve: Callable[..., object]) -> None:
    """``probe --http`` against the naive server prints the hazards and exits 1."""
    port = await serve(_NaiveHttp)  # type: ignore[misc]
    status, out, err = await _probe_cli(f"127.0.0.1:{port}", "--http", *PROBE_ARGS)
    print(out)
    assert status == 1, out + err
    assert out.count("[HAZARD]") == 4, out
    assert "result: 4 hazard(s) found" in out
    assert err == ""


async def test_probe_cli_graceful_http_exit_0(serve: Callable[..., object]) -> None:
    """``probe --http`` against the graceful server exits 0."""
    port = await serve(_GracefulHttp)  # type: ignore[misc]
    status, out, err = await _probe_cli(f"127.0.0.1:{port}", "--http", *PROBE_ARGS)
    print(out)
    assert status == 0, out + err
    assert "result: no hazard found: 5 passed" in out


async def test_probe_cli_unreachable_exit_2() -> None:
    """Nothing listening: one line on stderr, exit 2, no traceback."""
    status, out, err = await _probe_cli(f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert status == 2
    assert err.count("\n") == 1, err
    assert "cannot connect" in err
    assert "Traceback" not in out + err
    assert out == "", "the header line is printed only once the server is reached"


async def test_probe_cli_unreachable_ipv6_keeps_brackets() -> None:
    """The refusal names an IPv6 target as it was given, in brackets."""
    status, _out, err = await _probe_cli("[::1]:1", "--timeout", "2")
    assert status == 2, err
    assert "[::1]:1" in err, err


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:http", "bad port"),
        ("127.0.0.1:70000", "bad port"),
        ("::1:80", "brackets"),
        ("http://127.0.0.1:8080", "not a URL: give '127.0.0.1:8080' with --http"),
        ("http://[::1]:8080/x", "not a URL: give '\\[::1\\]:8080' with --http"),
    ],
)
def test_parse_target_rejects_bad_targets(target: str, message: str) -> None:
    """Malformed HOST:PORT is refused with a message that says what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_target(target)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("16M", 16 << 20),
        ("16MiB", 16 << 20),
        ("16MB", 16_000_000),
        ("64k", 64 << 10),
        ("100", 100),
        ("100B", 100),
    ],
)
def test_cli_body_size_accepts_units(text: str, size: int) -> None:
    """``--body-size`` takes K/M/G (binary), KiB/MiB/GiB, KB/MB/GB (SI), up to 1G."""
    assert _cli._size(text) == size


@pytest.mark.parametrize("text", ["2G", "0", "", "M", "16X", "1.5M", "-1"])
def test_cli_body_size_refuses_bad_sizes(text: str) -> None:
    """A size over 1G, zero, or without digits is refused with a message."""
    with pytest.raises(argparse.ArgumentTypeError):
        _cli._size(text)


def test_parse_target_accepts_ipv6_in_brackets() -> None:
    """``[::1]:8080`` is host ``::1``, port 8080."""
    assert parse_target("[::1]:8080") == ("::1", 8080)
    assert parse_target("localhost:1") == ("localhost", 1)


# -- nginx with lingering_close on, when it is installed --------------------------------

_NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 1m;
    lingering_close on;
    client_header_timeout 2s;
    keepalive_timeout 2s;
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/www;
        location / {{ return 200 "hello\\n"; }}
    }}
}}
"""


@pytest.fixture
def nginx() -> object:
    """nginx on 127.0.0.1:<free port>, foreground, config in a temp dir; killed after."""
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light to run this test)")
    with tempfile.TemporaryDirectory(prefix="aiograceful-nginx-") as tmp:
        port = free_port()
        Path(tmp, "www").mkdir()
        conf = Path(tmp, "nginx.conf")
        conf.write_text(_NGINX_CONF.format(tmp=tmp, port=port))
        proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", tmp, "-e", f"{tmp}/error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.skip(f"nginx did not start: {err.strip()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                pytest.fail("nginx did not listen within 10 s")
            yield port
        finally:
            proc.kill()
            proc.wait(10)
            if proc.stderr:
                proc.stderr.close()


async def test_probe_cli_nginx_lingering_close_exit_0(nginx: int) -> None:
    """nginx with ``lingering_close on`` passes every check: exit 0."""
    status, out, err = await _probe_cli(f"127.0.0.1:{nginx}", "--http", *PROBE_ARGS)
    print(out)
    assert status == 0, out + err
    assert "[pass] early answer" in out
    assert "413" in out


def test_probe_public_api_untouched() -> None:
    """The probe is private: it adds no public name to aiograceful."""
    assert not any("probe" in name.lower() for name in aiograceful.__all__)
