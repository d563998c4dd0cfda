"""Small helpers shared by the test files: loopback servers, raw peers, TCP states.

Everything here talks to real sockets on 127.0.0.1; nothing is mocked.

* :func:`tcp_states` / :func:`close_wait_count`: the kernel's view of the
  sockets on a port, parsed from ``/proc/net/tcp`` (no ``ss`` needed).
* :func:`tcp_state`: one socket's own state, from ``TCP_INFO`` (Linux).
* :func:`stream_server`: an ``asyncio.start_server`` on 127.0.0.1:0 as an
  async context manager yielding the port.
* :func:`wait_until`: poll a condition no callback announces.
* :func:`port_of` / :func:`free_port`: a server's port; a port nothing listens on.
* :func:`paced_read`: a client reading at a set rate (TCP, Unix or TLS).
* :func:`connect`: a blocking client socket with a timeout; :func:`recv_until_eof`
  reads until the peer's FIN or RST and says which.
* :func:`http_post`: stdlib ``http.client`` POST of a large body, run in a
  thread; returns the status or the exception it met.
* :func:`make_cert`: a self-signed certificate made with ``openssl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from aiograceful import GracefulServer

HOST = "127.0.0.1"

#: For tests that read the kernel's counters of a socket (SIOCINQ, TCP_INFO).
linux_only = pytest.mark.skipif(
    sys.platform != "linux", reason="reads Linux socket counters (SIOCINQ, TCP_INFO)"
)

#: Linux TCP states (include/net/tcp_states.h), as /proc/net/tcp and TCP_INFO give them.
TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8

#: A request line and headers announcing a body, ending where a server stops reading.
UPLOAD_HEAD = (
    b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: %d\r\n\r\n"
)
#: The early answer a server gives to an upload it refuses.
REPLY_413 = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"
)


def tcp_states(port: int) -> list[tuple[int, int, int]]:
    """``(local_port, remote_port, state)`` of every IPv4/IPv6 TCP socket touching ``port``."""
    found: list[tuple[int, int, int]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if port in (local, remote):
                found.append((local, remote, int(fields[3], 16)))
    return found


def close_wait_count(port: int) -> int:
    """How many sockets whose local port is ``port`` sit in CLOSE_WAIT."""
    return sum(
        1 for local, _, state in tcp_states(port) if local == port and state == TCP_CLOSE_WAIT
    )


def tcp_state(sock: socket.socket) -> int:
    """The kernel's state of ``sock`` (first byte of ``struct tcp_info``, Linux)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return int(info[0])


async def wait_until(
    predicate: Callable[[], bool],
    within: float = 2.0,
    *,
    what: str = "the condition held",
    every: float = 0.005,
    fail: bool = True,
) -> bool:
    """Poll ``predicate`` every ``every`` s until it holds (True), for at most ``within`` s.

    Past ``within`` the test fails ("timed out waiting until ``what``"); with
    ``fail=False`` it returns False instead, for the caller's own assertion.
    For conditions no callback announces: kernel socket states, bytes a
    protocol under test has collected, a server's first accepted connection.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            if fail:
                pytest.fail(f"timed out after {within} s waiting until {what}")
            return False
        await asyncio.sleep(every)
    return True


async def wait_for_tcp_state(sock: socket.socket, state: int, within: float = 2.0) -> int:
    """Poll ``sock``'s state until it is ``state`` or ``within`` seconds pass; return the last."""
    deadline = time.monotonic() + within
    current = tcp_state(sock)
    while current != state and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        current = tcp_state(sock)
    return current


@contextlib.asynccontextmanager
async def stream_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    **kwargs: object,
) -> AsyncIterator[int]:
    """Serve ``handler`` on 127.0.0.1, an ephemeral port; yield the port."""
    server = await asyncio.start_server(handler, HOST, 0, **kwargs)  # type: ignore[arg-type]
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def port_of(server: asyncio.Server | GracefulServer) -> int:
    """The port of ``server``'s first listening socket."""
    return int(server.sockets[0].getsockname()[1])


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    """A blocking client socket connected to 127.0.0.1:``port``."""
    return socket.create_connection((HOST, port), timeout=timeout)


def set_linger_zero(sock: socket.socket) -> None:
    """Make ``sock.close()`` send a RST (SO_LINGER {1, 0})."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def recv_until_eof(
    sock: socket.socket, limit: int = 64 * 1024 * 1024
) -> tuple[bytes, OSError | None]:
    """Read until the peer's FIN (error None) or an error such as a RST; at most ``limit``."""
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        try:
            chunk = sock.recv(256 * 1024)
        except OSError as exc:
            return b"".join(chunks), exc
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks), None


def http_post(port: int, size: int) -> int | OSError:
    """POST ``size`` bytes with stdlib http.client; the reply's status, or the error met."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("POST", "/upload", body=b"x" * size)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError as exc:
        return exc
    finally:
        conn.close()


def make_cert(directory: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate and key for 127.0.0.1 in ``directory``; None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


#: A small receive buffer, so that a slow reader's bytes wait in the server's
#: kernel as they do on a real link (Linux doubles the value it is given).
SMALL_RCVBUF = 64 * 1024


def paced_read(
    address: int | str,
    request: bytes,
    rate: float,
    *,
    expect: int | None = None,
    half_close: bool = False,
    timeout: float = 20.0,
    rcvbuf: int = SMALL_RCVBUF,
    resume: threading.Event | None = None,
    started: threading.Event | None = None,
    context: ssl.SSLContext | None = None,
    bufsize: int = 16 * 1024,
) -> tuple[int, str]:
    """Connect with a small receive buffer, send ``request``, read at ``rate`` bytes/s.

    ``address`` is a port on 127.0.0.1, or the path of a Unix stream socket.
    Returns the bytes read and how the stream ended: ``"FIN"``, or the name of
    the error met (``ConnectionResetError`` for a RST). With ``expect``, stop
    (and close) after that many bytes. ``half_close`` sends our FIN after the
    request. With ``resume``, read nothing until it is set (a reader that
    stalls, its window closed once ``rcvbuf`` is full), at most ``timeout``
    seconds. ``started`` is set once 128 KiB have been read (or the reading
    ended). With ``context``, the stream is TLS over the connection. Reads
    take up to ``bufsize`` bytes at a time; a ``rate`` of ``math.inf`` reads
    as fast as it can. Bounded by ``timeout`` seconds of silence.
    """
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer: str | tuple[str, int] = address
    else:
        sock = socket.socket()
        peer = (HOST, address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    got = 0
    try:
        sock.connect(peer)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=HOST)
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        if resume is not None:
            resume.wait(timeout)
        while expect is None or got < expect:
            chunk = sock.recv(bufsize)
            if not chunk:
                return got, "FIN"
            got += len(chunk)
            if started is not None and got > 128 * 1024:
                started.set()
            time.sleep(len(chunk) / rate)
        return got, "stopped"
    except OSError as exc:
        return got, type(exc).__name__
    finally:
        if started is not None:
            started.set()
        sock.close()


def paced_sink(listener: socket.socket, rate: float, timeout: float = 20.0) -> tuple[int, str]:
    """Accept one connection on ``listener`` and read it at ``rate`` bytes/s until it ends."""
    listener.settimeout(timeout)
    conn, _addr = listener.accept()
    conn.settimeout(timeout)
    got = 0
    try:
        while True:
            chunk = conn.recv(16 * 1024)
            if not chunk:
                return got, "FIN"
            got += len(chunk)
            time.sleep(len(chunk) / rate)
    except OSError as exc:
        return got, type(exc).__name__
    finally:
        conn.close()


def small_rcvbuf_listener() -> socket.socket:
    """A listening socket on 127.0.0.1 whose accepted connections have a small receive buffer."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    listener.bind((HOST, 0))
    listener.listen()
    return listener


def connect_outcome(host: str, port: int, timeout: float = 0.5) -> str:
    """A blocking connect: ``"connected"`` (then closed), or the error's name.

    ``"TimeoutError"`` on loopback means the SYN went unanswered (a listener
    refusing new handshakes drops it).
    """
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return type(exc).__name__
    return "connected"


async def assert_still_accepts(keeper: socket.socket, host: str, port: int) -> None:
    """The kernel socket ``keeper`` also holds takes a new connection after a shutdown.

    A server that drained a listener it shares must not leave the SYN filter
    on it (close_and_drain's ``refuse_handshakes``): the connect would then
    go unanswered, for every holder, for good.
    """
    assert await asyncio.to_thread(connect_outcome, host, port) == "connected"
    keeper.settimeout(5)
    conn, _ = keeper.accept()
    conn.close()


def silent_handshake(host: str, port: int) -> socket.socket:
    """A client that sends its SYN and never answers the SYN-ACK (its filter drops all it gets).

    The listener holds the handshake under way (SYN_RECV) for as long as it
    retransmits its SYN-ACK, about a minute, as for a client that vanished.
    Close it to end it (the listener's request sock lives on). Linux.
    """
    import ctypes

    drop_all = struct.pack("HBBI", 0x06, 0, 0, 0)  # ret #0
    buffer = ctypes.create_string_buffer(drop_all, len(drop_all))
    fprog = struct.pack("@HP", 1, ctypes.addressof(buffer))
    client = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, 26, fprog)  # SO_ATTACH_FILTER
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        client.connect((host, port))
    return client


def read_stream_and_close(sock: socket.socket) -> tuple[bytes, OSError | None]:
    """Read to the stream's last chunk or the server's FIN, then close, as a client does.

    (After a last chunk the connection is an idle keep-alive one: the drop-in
    would keep it for its quiet window, and the client closes it here.)
    """
    got = b""
    try:
        for _ in range(100_000):  # bounded by the socket's timeout too
            chunk = sock.recv(65536)
            got += chunk
            if not chunk or got.endswith(b"\r\n0\r\n\r\n"):
                break
    except OSError as exc:
        return got, exc
    finally:
        sock.close()
    return got, None
