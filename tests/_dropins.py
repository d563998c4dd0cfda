"""Helpers for the drop-in tests: a real server in a subprocess, real clients against it.

* :func:`server_process`: start a server command on 127.0.0.1 port 0, read the
  port it logs, yield ``(proc, port)``; stop it (SIGTERM, then SIGKILL) after.
* Early-answer clients, each sending a 16 MiB upload that ``tests/_asgi_app.py``
  answers with an early 413, ``rounds`` times, and counting the 413s seen:
  :func:`httpclient_uploads` (stdlib, with or without ``Connection: close``,
  or as HTTP/1.0), :func:`node_uploads`, :func:`wget_uploads`,
  :func:`curl_uploads` (``-H 'Expect:'``, so it sends the body at once),
  :func:`ab_uploads`. Each returns ``(answered, rounds)``.
* :func:`shutdown_race`: keep-alive clients sending requests back to back
  while the server gets SIGTERM; counts the requests sent on an open
  connection that got no answer.
* :func:`signal_load`: keep-alive and new-connection clients sending
  requests back to back while the server gets a plan of signals (reloads,
  then the stop); counts every request that failed (:class:`LoadCounts`).
* TLS and in-process servers: :func:`https_uploads` (http.client over TLS),
  :func:`queued_connections` / :func:`answer` (connections the server's
  loop has not accepted yet, then a GET on each, over TLS or not),
  :func:`connect_each_iteration` (connections arriving while a shutdown
  begins), :func:`hypercorn_serving` (hypercorn's ``serve`` or the drop-in's,
  in the test's loop).

Every loop is bounded in count and time; every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import pytest

HOST = "127.0.0.1"
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: The upload each early-answer round sends: far more than loopback's buffers.
UPLOAD_SIZE = 16 << 20
_CHUNK = b"x" * 65536
_PORT_RE = re.compile(rb"[Rr]unning on https?://[^\s:]+:(\d+)")

_NODE_UPLOAD = r"""
const http = require('http');
const [port, rounds, size] = process.argv.slice(1).map(Number);
let answered = 0;
const chunk = Buffer.alloc(65536, 120);
function one(i) {
  if (i >= rounds) { console.log(answered); return; }
  let done = false;
  const finish = (ok) => {
    if (done) return; done = true; if (ok) answered++; setImmediate(() => one(i + 1));
  };
  const req = http.request({host: '127.0.0.1', port, method: 'POST', path: '/upload',
    agent: false, headers: {'Content-Length': size}});
  req.setTimeout(10000, () => req.destroy());
  req.on('response', (res) => {
    res.resume(); res.on('end', () => finish(res.statusCode === 413));
  });
  req.on('error', () => finish(false));
  let sent = 0;
  const write = () => {
    while (sent < size) {
      sent += chunk.length;
      if (!req.write(chunk)) { req.once('drain', write); return; }
    }
    req.end();
  };
  write();
}
one(0);
"""


def env() -> dict[str, str]:
    """The subprocess environment: this worktree's aiograceful and the tests' app first."""
    paths = [str(ROOT), str(TESTS)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def server_process(
    argv: Sequence[str],
    *,
    start_timeout: float = 20.0,
    port_re: re.Pattern[bytes] = _PORT_RE,
    log: bytearray | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run ``argv`` (a server that logs ``Running on http://127.0.0.1:PORT``); yield it and PORT.

    ``port_re``: how the server logs its port (group 1), for another server's log line.
    ``log``: gets everything the server writes (stdout and stderr).
    """
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env(),
        cwd=str(ROOT),
    )
    assert proc.stdout is not None
    output = bytearray()
    drain: threading.Thread | None = None
    try:
        deadline = time.monotonic() + start_timeout
        port = None
        while port is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                pytest.fail(f"server did not start: {bytes(output).decode(errors='replace')}")
            ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    continue
                output += chunk
                match = port_re.search(output)
                if match:
                    port = int(match.group(1))
        # Keep draining its output, so a chatty server never blocks on the pipe.
        if log is not None:
            log += output
        drain = threading.Thread(target=_drain, args=(proc, log), daemon=True)
        drain.start()
        yield proc, port
    finally:
        if drain is not None and log is not None and proc.poll() is not None:
            drain.join(5)  # exited: the log is whole once the pipe is read to its end
        stop(proc)


def _drain(proc: subprocess.Popen[bytes], log: bytearray | None = None) -> None:
    assert proc.stdout is not None
    with contextlib.suppress(OSError, ValueError):
        while chunk := os.read(proc.stdout.fileno(), 65536):
            if log is not None:
                log += chunk


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()
    assert proc.returncode is not None
    return proc.returncode


def need(tool: str) -> str:
    """The path of ``tool``, or skip the test naming it."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


# -- early-answer clients ------------------------------------------------------------------


def httpclient_uploads(port: int, rounds: int, variant: str = "keep-alive") -> tuple[int, int]:
    """http.client POSTs of the upload, the usual way (send it all, then read).

    ``variant``: "keep-alive", "Connection: close", or "HTTP/1.0".
    """
    answered = 0
    body = b"x" * UPLOAD_SIZE
    for _ in range(rounds):
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        if variant == "HTTP/1.0":
            conn._http_vsn = 10  # type: ignore[attr-defined]
            conn._http_vsn_str = "HTTP/1.0"  # type: ignore[attr-defined]
        headers = {"Content-Type": "application/octet-stream"}
        if variant == "Connection: close":
            headers["Connection"] = "close"
        try:
            conn.request("POST", "/upload", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            answered += response.status == 413
        except (OSError, http.client.HTTPException):
            pass  # the answer was lost
        finally:
            conn.close()
    return answered, rounds


def _body_file() -> Path:
    path = Path(tempfile.gettempdir(), f"aiograceful-upload-{UPLOAD_SIZE}.bin")
    if not path.exists() or path.stat().st_size != UPLOAD_SIZE:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(b"x" * UPLOAD_SIZE)
        tmp.replace(path)
    return path


def node_uploads(port: int, rounds: int) -> tuple[int, int]:
    """node's http.request, one upload per round (no agent: a new connection each)."""
    node = need("node")
    out = subprocess.run(
        [node, "-e", _NODE_UPLOAD, str(port), str(rounds), str(UPLOAD_SIZE)],
        capture_output=True,
        timeout=30 + 10 * rounds,
        check=True,
    )
    return int(out.stdout.strip()), rounds


def wget_uploads(port: int, rounds: int) -> tuple[int, int]:
    """``wget --post-file``, once per round, no retries; the 413 counted from ``-S``."""
    wget = need("wget")
    body = _body_file()
    answered = 0
    for _ in range(rounds):
        out = subprocess.run(
            [
                wget,
                "-S",
                "-t",
                "1",
                "-T",
                "10",
                "-O",
                os.devnull,
                f"--post-file={body}",
                f"http://{HOST}:{port}/upload",
            ],
            capture_output=True,
            timeout=30,
        )
        answered += b" 413 " in out.stderr
    return answered, rounds


def curl_uploads(port: int, rounds: int, *extra: str) -> tuple[int, int]:
    """``curl -H 'Expect:' --data-binary``: the body is sent at once, not after a 100."""
    curl = need("curl")
    body = _body_file()
    answered = 0
    for _ in range(rounds):
        out = subprocess.run(
            [
                curl,
                "-s",
                "-o",
                os.devnull,
                "-w",
                "%{http_code}",
                "-H",
                "Expect:",
                *extra,
                "--max-time",
                "20",
                "--data-binary",
                f"@{body}",
                f"http://{HOST}:{port}/upload",
            ],
            capture_output=True,
            timeout=30,
        )
        answered += out.stdout.strip() == b"413"
    return answered, rounds


def ab_uploads(port: int, rounds: int) -> tuple[int, int]:
    """ApacheBench (HTTP/1.0), ``rounds`` POSTs, one at a time.

    ab reads what it can while it sends, but a reset while it sends is a
    failed request for it ("Send request failed!", counted in "Failed
    requests"): those count as lost answers.
    """
    ab = need("ab")
    body = _body_file()
    out = subprocess.run(
        [
            ab,
            "-s",
            "10",
            "-n",
            str(rounds),
            "-p",
            str(body),
            "-T",
            "application/octet-stream",
            f"http://{HOST}:{port}/upload",
        ],
        capture_output=True,
        timeout=30 + 10 * rounds,
    )
    text = out.stdout + out.stderr
    send_failed = text.count(b"Send request failed")
    complete = _ab_count(text, b"Complete requests")
    failed = _ab_count(text, b"Failed requests")
    non_2xx = _ab_count(text, b"Non-2xx responses")
    lost = min(rounds, send_failed + max(0, rounds - complete))
    if failed or non_2xx != rounds:
        lost = max(lost, 1)
    return rounds - lost, rounds


def _ab_count(text: bytes, label: bytes) -> int:
    match = re.search(re.escape(label) + rb":\s+(\d+)", text)
    return int(match.group(1)) if match else 0


# -- the shutdown race -------------------------------------------------------------------------


class RaceCounts:
    """What the keep-alive clients of one shutdown race saw (summed over clients)."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.lost = 0
        self.closes_announced = 0
        #: How each lost request failed (the client's exception), for the report.
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def add(self, sent: int, answered: int, lost: int, announced: int, failure: str) -> None:
        with self._lock:
            if failure:
                self.failures.append(failure)
            self.sent += sent
            self.answered += answered
            self.lost += lost
            self.closes_announced += announced

    def __repr__(self) -> str:
        return (
            f"<RaceCounts sent={self.sent} answered={self.answered} lost={self.lost} "
            f"closes_announced={self.closes_announced} failures={self.failures}>"
        )


def _keepalive_client(port: int, until: float, counts: RaceCounts, go: threading.Event) -> None:
    """GET / back to back on one keep-alive connection; a new one after ``Connection: close``.

    A request written on an open connection that gets no full answer is lost.
    A refused connect ends the client (the server is gone): nothing was sent.
    """
    sent = answered = lost = announced = 0
    failure = ""
    conn: http.client.HTTPConnection | None = None
    go.wait(5)
    try:
        for _ in range(1_000_000):  # bounded by ``until`` too
            if time.monotonic() >= until:
                break
            if conn is None:
                conn = http.client.HTTPConnection(HOST, port, timeout=5)
                try:
                    conn.connect()
                except OSError:
                    break
            try:
                conn.request("GET", "/")
                sent += 1
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                lost += 1
                failure = f"{type(exc).__name__} after {answered} answers"
                break
            answered += 1
            if response.will_close:
                announced += 1
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()
        counts.add(sent, answered, lost, announced, failure)


def shutdown_race(
    proc: subprocess.Popen[bytes], port: int, *, clients: int = 4, before: float = 0.5
) -> RaceCounts:
    """``clients`` keep-alive clients send back to back; SIGTERM after ``before`` s; count."""
    counts = RaceCounts()
    go = threading.Event()
    until = time.monotonic() + before + 8.0
    threads = [
        threading.Thread(target=_keepalive_client, args=(port, until, counts, go), daemon=True)
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    go.set()
    time.sleep(before)
    proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(15)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(20)
    return counts


class LoadCounts:
    """What the clients of one :func:`signal_load` saw (summed over clients)."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        #: Requests written on an open connection that got no full answer.
        self.lost = 0
        #: Connects refused while the server was to be serving (before the stop).
        self.refused = 0
        #: New connections reset before any answer after the stop began: where
        #: the listener's last close reset its queue, and the client's
        #: request, if written at all, was never accepted (counted apart).
        self.unsent = 0
        #: How each failure went (the client's exception), for the report.
        self.failures: list[str] = []
        self._lock = threading.Lock()

    @property
    def failed(self) -> int:
        """Requests lost, and connects refused while the server was to serve."""
        return self.lost + self.refused

    def add(
        self, sent: int, answered: int, lost: int, refused: int, unsent: int, failures: list[str]
    ) -> None:
        with self._lock:
            self.sent += sent
            self.answered += answered
            self.lost += lost
            self.refused += refused
            self.unsent += unsent
            self.failures += failures

    def __repr__(self) -> str:
        return (
            f"<LoadCounts sent={self.sent} answered={self.answered} lost={self.lost} "
            f"refused={self.refused} unsent={self.unsent} failures={self.failures[:10]}>"
        )


def _load_client(
    port: int, until: float, counts: LoadCounts, keepalive: bool, stopping: threading.Event
) -> None:
    """GET / back to back until ``until``, on one keep-alive connection or a new one each.

    A keep-alive client opens a new connection after ``Connection: close`` or
    a failure. A request written on an open connection that gets no full
    answer is lost; a refused connect before ``stopping`` is set is a
    failure, after it the end (the server is gone), and so is a new
    connection reset without an answer after it (counted apart, ``unsent``).
    """
    sent = answered = lost = refused = unsent = 0
    failures: list[str] = []
    conn: http.client.HTTPConnection | None = None
    used = False  # whether a request was written on ``conn``
    try:
        for _ in range(1_000_000):  # bounded by ``until`` too
            if time.monotonic() >= until:
                break
            if conn is None:
                conn = http.client.HTTPConnection(HOST, port, timeout=5)
                used = False
                try:
                    conn.connect()
                except OSError as exc:
                    conn = None
                    if stopping.is_set():
                        break
                    refused += 1
                    failures.append(f"connect: {type(exc).__name__}")
                    time.sleep(0.01)
                    continue
            try:
                fresh, wrote = not used, False
                used = True
                conn.request("GET", "/", headers={} if keepalive else {"Connection": "close"})
                wrote = True
                sent += 1
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                if fresh and stopping.is_set() and isinstance(exc, ConnectionResetError):
                    # A new connection reset before any answer once the stop
                    # began: the listener's last close reset its queue (or
                    # the server reset an accepted one: told apart only by
                    # the server). Counted apart, and the end, as a refusal.
                    sent -= wrote
                    unsent += 1
                    break
                lost += 1
                failures.append(f"{type(exc).__name__} after {answered} answers")
                conn.close()
                conn = None
                continue
            answered += 1
            if response.will_close or not keepalive:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()
        counts.add(sent, answered, lost, refused, unsent, failures)


def signal_load(
    proc: subprocess.Popen[bytes],
    port: int,
    plan: Sequence[tuple[float, signal.Signals]],
    *,
    keepalive: int = 4,
    fresh: int = 4,
    tail: float = 3.0,
) -> LoadCounts:
    """Load from ``keepalive`` keep-alive and ``fresh`` new-connection clients while ``plan`` runs.

    ``plan``: (seconds after the load began, signal for ``proc``), in order;
    a SIGTERM or SIGINT is the stop, after which a refused connect ends a
    client. The clients run until ``tail`` s after the last signal (at most
    60 s in all); then the server is waited for (20 s).
    """
    counts = LoadCounts()
    stopping = threading.Event()
    start = time.monotonic()
    until = start + min(60.0, (plan[-1][0] if plan else 0.0) + tail)
    threads = [
        threading.Thread(
            target=_load_client, args=(port, until, counts, i < keepalive, stopping), daemon=True
        )
        for i in range(keepalive + fresh)
    ]
    for thread in threads:
        thread.start()
    for at, sig in plan:
        time.sleep(max(0.0, start + at - time.monotonic()))
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping.set()
        proc.send_signal(sig)
    for thread in threads:
        thread.join(max(1.0, until - time.monotonic() + 10))
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(20)
    return counts


def python() -> str:
    """The interpreter running the tests (the one with the servers installed)."""
    return sys.executable


def assert_stock_loses_in_race(argv: list[str], name: str, rounds: int = 4) -> None:
    """Stock server at SIGTERM: at least one of ``rounds`` races loses a request.

    Each round can lose one request per client, or none: the hazard is a race.
    """
    seen = []
    for _ in range(rounds):
        with server_process(argv) as (proc, port):
            counts = shutdown_race(proc, port)
        seen.append(counts)
        assert counts.answered > 0, counts
        if counts.lost:
            return
    raise AssertionError(f"stock {name} lost nothing: {seen}")


def assert_dropin_loses_nothing_in_race(
    argv: list[str], exits: tuple[int, ...] = (0,), rounds: int = 2
) -> None:
    """The drop-in at SIGTERM: every request sent on an open connection is answered.

    The answers after the notice say ``Connection: close`` (at least one does).
    """
    for _ in range(rounds):
        with server_process(argv) as (proc, port):
            counts = shutdown_race(proc, port)
            assert proc.returncode in exits, counts
        assert counts.answered > 0, counts
        assert counts.lost == 0, counts
        assert counts.closes_announced >= 1, counts


# -- TLS and in-process servers ------------------------------------------------------------------


def https_uploads(
    port: int, rounds: int, context: ssl.SSLContext, size: int, *, close: bool = True
) -> list[int | str]:
    """http.client POSTs of ``size`` bytes over TLS, ``rounds`` times: each status, or the error.

    With ``close``, each request says ``Connection: close`` (the server
    closes after its early answer while the body is still arriving).
    """
    body = b"x" * size
    headers = {"Content-Type": "application/octet-stream"}
    if close:
        headers["Connection"] = "close"
    got: list[int | str] = []
    for _ in range(rounds):
        conn = http.client.HTTPSConnection(HOST, port, timeout=10, context=context)
        try:
            conn.request("POST", "/upload", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            got.append(response.status)
        except (OSError, http.client.HTTPException) as exc:
            got.append(type(exc).__name__)  # the answer was lost
        finally:
            conn.close()
    return got


def queued_connections(port: int, n: int, timeout: float = 3.0) -> list[socket.socket]:
    """``n`` TCP connections to ``port``, made with blocking connects.

    Made from the server's own loop thread, they finish the handshake in the
    kernel and wait in the accept queue: the loop accepts none of them
    before it runs again.
    """
    return [socket.create_connection((HOST, port), timeout=timeout) for _ in range(n)]


def answer(
    sock: socket.socket,
    context: ssl.SSLContext | None = None,
    request: bytes = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n",
) -> bytes | str:
    """On a connected ``sock`` (TLS if ``context``): send ``request`` (a keep-alive GET /), read
    to the end; the bytes or the error's name.

    Closes ``sock``. Over TLS the handshake happens here, once the server has
    accepted the connection; it runs over memory BIOs on the plain socket
    (``wrap_socket`` of a socket reset before its handshake leaks the
    SSLSocket on 3.11, which warnings-as-errors would fail the test for).
    """
    try:
        with sock:
            if context is None:
                sock.sendall(request)
                return _read_to_end(sock.recv)
            return _tls_exchange(sock, context, request)
    except OSError as exc:  # ssl.SSLError is an OSError
        return type(exc).__name__


def _read_to_end(recv: Callable[[int], bytes]) -> bytes:
    data = b""
    for _ in range(1000):  # bounded; each read is bounded by the socket's timeout
        chunk = recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _tls_exchange(sock: socket.socket, context: ssl.SSLContext, request: bytes) -> bytes:
    """A TLS client over ``sock``: handshake, send ``request``, read until close_notify or EOF."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=HOST)

    def run(op: Callable[[], Any]) -> Any:
        for _ in range(10_000):  # bounded; each recv is bounded by the socket's timeout
            try:
                result = op()
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    sock.sendall(pending)
                data = sock.recv(65536)
                if data:
                    incoming.write(data)
                else:
                    incoming.write_eof()
                continue
            if pending := outgoing.read():
                sock.sendall(pending)
            return result
        raise TimeoutError("TLS exchange did not finish")

    run(tls.do_handshake)
    run(lambda: tls.write(request))
    data = b""
    for _ in range(1000):
        try:
            chunk = run(lambda: tls.read(65536))
        except ssl.SSLZeroReturnError:  # the server's close_notify
            break
        except ssl.SSLEOFError:
            if data:
                break  # a FIN without close_notify, after the answer
            raise
        if not chunk:
            break
        data += chunk
    return data


#: Seconds a loopback connect waits for the handshake in connect_each_iteration.
_SYN_WAIT: Final = 0.2


def connect_each_iteration(
    loop: asyncio.AbstractEventLoop, port: int, socks: list[socket.socket], limit: int = 50
) -> None:
    """From now on, one blocking connect to ``port`` per loop iteration, into ``socks``.

    A loop busy as under load: connections keep arriving while a shutdown
    runs, each made in a callback, so that some arrive in the very iteration
    in which the server closes its listener. Stops at the first connect
    refused (the listener is gone) or left unanswered (a draining listener
    drops new SYNs), or after ``limit`` connections. On loopback a listener
    that takes connections completes one at once; a dropped SYN would be
    retried a second later, so the connect gives up after ``_SYN_WAIT``
    (it blocks the loop while it waits).
    """

    def step() -> None:
        if len(socks) >= limit:
            return
        try:
            sock = socket.create_connection((HOST, port), timeout=_SYN_WAIT)
        except OSError:
            return  # refused, or no handshake: the listener is closing
        sock.settimeout(3)
        socks.append(sock)
        loop.call_soon(step)

    loop.call_soon(step)


@contextlib.asynccontextmanager
async def hypercorn_serving(
    serve: Callable[..., Awaitable[None]],
    *,
    tls: tuple[Path, Path] | None = None,
    app: Any = None,
    sndbuf: int | None = None,
    **options: Any,
) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """Run ``serve(app, config)`` (hypercorn's or the drop-in's) on the test's loop.

    Yields the port (127.0.0.1, listening already) and the event that
    triggers the shutdown; on exit sets it and waits for ``serve`` (bounded).
    ``tls``: (certificate, key) files; ``app``: the ASGI app (``_asgi_app``'s
    by default); ``sndbuf``: SO_SNDBUF of the accepted connections (set on
    the listener, which they inherit). ``options`` go to hypercorn's Config.
    """
    from hypercorn.config import Config

    if app is None:
        from _asgi_app import app
    listener = socket.socket()
    if sndbuf is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    listener.bind((HOST, 0))
    listener.listen(128)  # connections queue from now on, before hypercorn runs
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]
    config.graceful_timeout = 5.0
    if tls is not None:
        config.certfile, config.keyfile = str(tls[0]), str(tls[1])
    for name, value in options.items():
        setattr(config, name, value)
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait))
    try:
        yield port, stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def stalled_stream(argv: Sequence[str], kill_after: float = 30.0) -> tuple[int, str, float]:
    """A client that stops reading an endless stream at SIGTERM and resumes once the server exited.

    A server still running ``kill_after`` seconds after SIGTERM is killed, as
    a supervisor would. Returns the bytes the client read after it resumed,
    how the stream ended (``"fin"`` or ``"reset"``) and the seconds from
    SIGTERM to the server's exit.
    """
    with server_process(argv) as (proc, port):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(20)
            sock.connect((HOST, port))
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: test\r\n\r\n")
            head = b""
            while len(head) < 8192:
                head += sock.recv(4096)
            time.sleep(0.5)  # the server's buffers fill up; the client has stopped reading
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(kill_after)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            exited = time.monotonic() - began
            got, end = 0, "fin"
            try:
                while chunk := sock.recv(65536):
                    got += len(chunk)
            except ConnectionResetError:
                end = "reset"
        return got, end, exited


def assert_stalled_stream_gets_what_stock_delivers(
    stock: Sequence[str], dropin: Sequence[str], bound: float, stock_kill_after: float = 30.0
) -> None:
    """The drop-in's stalled stream client gets what the stock server's exit leaves it.

    Both end with a FIN; the drop-in's client reads at least 80 % of what the
    stock one read (the kernel's buffers, which the kernel sizes itself), and
    the drop-in exits within ``bound`` (its grace and force) plus 3 s. A
    stock server that waits on the stalled client is killed after
    ``stock_kill_after`` seconds (the kernel then delivers its buffer all the same).
    """
    stock_got, stock_end, _stock_exit = stalled_stream(stock, stock_kill_after)
    got, end, exited = stalled_stream(dropin)
    assert (stock_end, end) == ("fin", "fin"), (stock_got, got)
    assert stock_got > 64 * 1024, stock_got  # the kernel held far more than the 4 KiB window
    assert got >= stock_got * 0.8, (got, stock_got)
    assert exited < bound + 3.0, exited
