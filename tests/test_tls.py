"""The lingering close over TLS, on both loops (certificates made by the test; needs openssl).

asyncio's SSL transport cannot half-close. Closing it while the client is
still uploading makes asyncio's SSL shutdown meet the client's next record and
fail: the client never reads our early answer. aiograceful keeps the
connection open, reading and discarding until the client's close_notify or
FIN, and only then closes (with close_notify).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import pathlib
import shutil
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from _util import HOST, REPLY_413, SMALL_RCVBUF, linux_only, paced_read, wait_until

import aiograceful
from aiograceful import CloseOutcome, CloseResult, GracefulProtocol, graceful_close

UPLOAD = 4 << 20
ROUNDS = 4
SIZE = 3 << 19  # 1.5 MiB: about 2 s at RATE
RATE = 768 << 10
CHUNK = 64 << 10
REPLY_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"
)

Contexts = tuple[ssl.SSLContext, ssl.SSLContext]


def is_uvloop() -> bool:
    return type(asyncio.get_running_loop()).__module__.startswith("uvloop")


def https_post(port: int, client: ssl.SSLContext, size: int = UPLOAD) -> int | str:
    """POST ``size`` bytes over HTTPS with stdlib http.client: the status, or the error's name."""
    conn = http.client.HTTPSConnection(HOST, port, timeout=10, context=client)
    try:
        conn.request("POST", "/upload", body=b"x" * size)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError as exc:
        return type(exc).__name__
    finally:
        conn.close()


async def posts(port: int, client: ssl.SSLContext, rounds: int = ROUNDS) -> list[int | str]:
    return [await asyncio.to_thread(https_post, port, client) for _ in range(rounds)]


async def test_tls_early_413_read_every_round(tls_contexts: Contexts) -> None:
    """An early 413 over TLS: the naive close loses it on asyncio; graceful_close never does."""
    server_ctx, client_ctx = tls_contexts
    results: list[CloseResult] = []

    async def naive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(REPLY_413)
        writer.close()

    async def graceful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(REPLY_413)
        results.append(await graceful_close(writer))

    plain = await asyncio.start_server(naive, HOST, 0, ssl=server_ctx)
    try:
        naive_got = await posts(plain.sockets[0].getsockname()[1], client_ctx)
    finally:
        plain.close()
    server = await aiograceful.start_server(graceful, HOST, 0, ssl=server_ctx)
    async with server:
        got = await posts(server.sockets[0].getsockname()[1], client_ctx)
    if not is_uvloop():
        # asyncio's SSL shutdown resets the client that is still sending.
        assert naive_got.count(413) < ROUNDS, naive_got
    assert got == [413] * ROUNDS, got
    assert results
    assert all(r.outcome is CloseOutcome.CLEAN for r in results), results
    assert all(r.discarded > 0 for r in results), results


async def test_tls_early_413_asyncio_streams_client(tls_contexts: Contexts) -> None:
    """An asyncio streams client over TLS, still uploading, reads the server's early 413."""
    server_ctx, client_ctx = tls_contexts

    async def graceful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(REPLY_413)
        await graceful_close(writer)

    server = await aiograceful.start_server(graceful, HOST, 0, ssl=server_ctx)
    async with server:
        reader, writer = await asyncio.open_connection(
            HOST, server.sockets[0].getsockname()[1], ssl=client_ctx
        )
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % UPLOAD)
        for _ in range(UPLOAD // CHUNK):
            writer.write(b"x" * CHUNK)
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        result = await graceful_close(writer)
    assert answer == REPLY_413
    assert result.outcome in (CloseOutcome.CLEAN, CloseOutcome.PEER_RESET), result


async def test_tls_503_at_the_limit_is_read(tls_contexts: Contexts) -> None:
    """max_connections=1 over TLS: the second client, uploading, reads the 503."""
    server_ctx, client_ctx = tls_contexts
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()

    def reject(transport: asyncio.Transport) -> None:
        transport.write(REPLY_503)

    server = await aiograceful.start_server(
        hold, HOST, 0, ssl=server_ctx, max_connections=1, on_reject=reject
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        holder = await asyncio.open_connection(HOST, port, ssl=client_ctx)
        for _ in range(200):
            if server.connections:
                break
            await asyncio.sleep(0.01)
        got = await posts(port, client_ctx)
        release.set()
        holder[1].close()
    assert got == [503] * ROUNDS, got


#: Larger than the kernel's send buffer can hold, so that some of it waits in asyncio's.
TLS_DOWNLOAD = 8 << 20
TLS_RATE = 3 << 20


def tls_paced_read(port: int, client: ssl.SSLContext) -> tuple[int, str]:
    """Read a TLS download at TLS_RATE through a small receive buffer; bytes and how it ended."""
    return paced_read(port, b"GET\n", TLS_RATE, context=client)


async def test_tls_slow_reader_gets_every_byte(tls_contexts: Contexts) -> None:
    """A slow TLS reader gets the whole download where asyncio's TLS shutdown bound cuts it."""
    server_ctx, client_ctx = tls_contexts

    async def download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"x" * TLS_DOWNLOAD)  # buffered: the close starts long before it is sent

    async def naive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await download(reader, writer)
        writer.close()

    # The same TLS shutdown bound (1 s, shorter than the transfer) for both.
    plain = await asyncio.start_server(naive, HOST, 0, ssl=server_ctx, ssl_shutdown_timeout=1.0)
    try:
        naive_got = await asyncio.to_thread(
            tls_paced_read, plain.sockets[0].getsockname()[1], client_ctx
        )
    finally:
        plain.close()
    server = await aiograceful.start_server(
        download,
        HOST,
        0,
        ssl=server_ctx,
        ssl_shutdown_timeout=1.0,
        linger_timeout=0.5,
        linger_idle_timeout=0.3,
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        got = await asyncio.to_thread(tls_paced_read, port, client_ctx)
    assert naive_got[0] < TLS_DOWNLOAD, naive_got
    assert got == (TLS_DOWNLOAD, "FIN"), got


async def test_tls_write_eof_raises_and_the_reply_still_arrives(tls_contexts: Contexts) -> None:
    """write_eof() on TLS raises NotImplementedError, as asyncio does; the reply is not lost."""
    server_ctx, client_ctx = tls_contexts
    raised: list[BaseException] = []
    reply = b"r" * 102_400

    class Answer(GracefulProtocol):
        def data_received(self, data: bytes) -> None:
            self.transport.write(reply)
            try:
                self.write_eof()
            except NotImplementedError as exc:
                raised.append(exc)
            self.close_gracefully()

    server = await aiograceful.create_server(Answer, HOST, 0, ssl=server_ctx)
    async with server:
        reader, writer = await asyncio.open_connection(
            HOST, server.sockets[0].getsockname()[1], ssl=client_ctx
        )
        writer.write(b"request\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert len(raised) == 1
    assert answer == reply


def plain_text_to_tls_port(port: int) -> None:
    """A scanner: plain HTTP to a TLS port; the handshake fails."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass


def https_get(port: int, client: ssl.SSLContext) -> int | str:
    conn = http.client.HTTPSConnection(HOST, port, timeout=10, context=client)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError as exc:
        return type(exc).__name__
    finally:
        conn.close()


@pytest.mark.parametrize("api", ["streams", "protocols"])
async def test_tls_failed_handshakes_free_their_slots(tls_contexts: Contexts, api: str) -> None:
    """Scanners sending plain text to a TLS port at the limit never hold a slot."""
    server_ctx, client_ctx = tls_contexts
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok)

    class Handler(GracefulProtocol):
        def data_received(self, data: bytes) -> None:
            if b"\r\n\r\n" in data:
                self.transport.write(ok)
                self.close_gracefully()

    def reject(transport: asyncio.Transport) -> None:
        transport.write(REPLY_503)

    options: dict[str, object] = {"ssl": server_ctx, "max_connections": 2, "on_reject": reject}
    if api == "streams":
        server = await aiograceful.start_server(handler, HOST, 0, **options)  # type: ignore[arg-type]
    else:
        server = await aiograceful.create_server(Handler, HOST, 0, **options)  # type: ignore[arg-type]
    async with server:
        port = server.sockets[0].getsockname()[1]
        for _ in range(10):
            await asyncio.to_thread(plain_text_to_tls_port, port)
        got = [await asyncio.to_thread(https_get, port, client_ctx) for _ in range(8)]
        for _ in range(200):  # the last one may still be closing
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        assert server.connections == 0
    assert got == [200] * 8, got


#: node's https client: POST a body of argv[3] bytes, print the status or the error's code.
_NODE_POST = r"""
const https = require("https"), fs = require("fs");
const [port, ca, size] = process.argv.slice(1);
const req = https.request({host: "127.0.0.1", port: +port, method: "POST", path: "/upload",
  ca: fs.readFileSync(ca), headers: {"Content-Length": +size}}, (res) => {
  res.resume(); res.on("end", () => console.log(res.statusCode));
});
req.on("error", (e) => console.log(e.code || e.message));
req.setTimeout(10000, () => req.destroy(new Error("timeout")));
const chunk = Buffer.alloc(65536, 120);
let left = +size;
(function pump() {
  while (left > 0) { left -= chunk.length; if (!req.write(chunk)) return req.once("drain", pump); }
  req.end();
})();
"""


async def test_tls_early_413_node_https_client(
    tls_contexts: Contexts, tls_files: tuple[pathlib.Path, pathlib.Path]
) -> None:
    """node's https client, still uploading, reads the early 413 after graceful_close."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot run node's https client")
    server_ctx, _client_ctx = tls_contexts
    cert = tls_files[0]

    async def graceful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(REPLY_413)
        await graceful_close(writer)

    async def node_post(port: int) -> str:
        proc = await asyncio.create_subprocess_exec(
            *(node, "-e", _NODE_POST, str(port), str(cert), str(UPLOAD)),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        return out.decode().strip()

    server = await aiograceful.start_server(graceful, HOST, 0, ssl=server_ctx)
    async with server:
        port = server.sockets[0].getsockname()[1]
        got = [await node_post(port) for _ in range(3)]
    # (node reads an early answer while it uploads, so a naive close loses
    # it only sometimes here: 1 of 3 in a run on asyncio's loop.)
    assert got == ["413"] * 3, got


# -- a busy loop: the TCP transport's buffer under the SSL transport ----------

MIB = 1024 * 1024
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

SLOW_TLS_SIZE = 6 * MIB
SLOW_TLS_RATE = 2 * MIB  # ~3 s: three times send_timeout


def paced_tls_read(port: int, context: ssl.SSLContext, rate: float) -> tuple[int, str]:
    """Send a line over TLS with a 64 KiB receive buffer; read at ``rate`` until the end."""
    got = 0
    raw = socket.create_connection((HOST, port), timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    try:
        with context.wrap_socket(raw, server_hostname=HOST) as sock:
            sock.sendall(b"GET\n")
            start = time.monotonic()
            for _ in range(100_000):
                chunk = sock.recv(16 * 1024)
                if not chunk:
                    return got, "FIN"
                got += len(chunk)
                lag = got / rate - (time.monotonic() - start)
                if lag > 0:
                    time.sleep(lag)
            return got, "stopped"
    except OSError as exc:
        return got, type(exc).__name__
    finally:
        raw.close()


def big_answer(
    close: str, results: list[CloseResult], *, size: int = SLOW_TLS_SIZE, **options: Any
) -> Handler:
    """SO_SNDBUF 64 KiB, read the line, write ``size`` bytes, then close.

    ``close``: "naive" (``writer.close()``), "graceful" (``graceful_close``
    with ``options``, its result into ``results``), or "server" (return:
    aiograceful's server closes).
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        await reader.readline()
        writer.write(b"x" * size)
        if close == "naive":
            writer.close()
        elif close == "graceful":
            results.append(await graceful_close(writer, **options))

    return serve


BUSY_SIZE = 8 * MIB
HOG = 0.02  # s of other work per loop iteration
HOG_LIMIT = 1500  # iterations: at most ~30 s of hogging
R = TypeVar("R")


async def hog(stop: asyncio.Event) -> None:
    """Stand in for other connections' work: block the loop HOG s per iteration."""
    for _ in range(HOG_LIMIT):
        if stop.is_set():
            return
        time.sleep(HOG)  # noqa: ASYNC251 - blocking the loop is the point
        await asyncio.sleep(0)


def tls_read(port: int, context: ssl.SSLContext, timeout: float = 10.0) -> tuple[int, str]:
    """Send a line over TLS and read as fast as possible until the stream ends."""
    got = 0
    try:
        with (
            socket.create_connection((HOST, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=HOST) as sock,
        ):
            sock.sendall(b"GET\n")
            while True:
                chunk = sock.recv(64 * 1024)
                if not chunk:
                    return got, "FIN"
                got += len(chunk)
    except OSError as exc:
        return got, type(exc).__name__


def busy_handler(close: str, results: list[CloseResult]) -> Handler:
    """big_answer of BUSY_SIZE bytes; the graceful close bounded at 0.5 s / 0.3 s."""
    return big_answer(close, results, size=BUSY_SIZE, timeout=0.5, idle_timeout=0.3)


async def while_hogged(
    read: Callable[[int, ssl.SSLContext], R], port: int, client: ssl.SSLContext
) -> R:
    """``read(port, client)`` in a thread while the loop is hogged; what it returned."""
    stop = asyncio.Event()
    hogging = asyncio.ensure_future(hog(stop))
    try:
        return await asyncio.to_thread(read, port, client)
    finally:
        stop.set()
        await hogging


async def busy_tls_download(
    server: asyncio.Server | aiograceful.GracefulServer, client: ssl.SSLContext
) -> tuple[int, str]:
    """One TLS client's reading from ``server`` while the loop is hogged."""
    return await while_hogged(tls_read, server.sockets[0].getsockname()[1], client)


@linux_only
async def test_tls_busy_loop_close_is_not_cut_by_timeout(tls_contexts: Contexts) -> None:
    """TLS, 8 MiB in one write, a loop hogged 20 ms per iteration, timeout=0.5: all 8 MiB.

    The SSL transport reports an empty buffer once its bytes are encrypted
    into the TCP transport below; the close must not take a drained kernel
    queue for "all acknowledged" while tcpi_bytes_acked still moves. Covers
    graceful_close and start_server(linger_timeout=0.5, linger_idle_timeout=0.3).
    """
    server_ctx, client_ctx = tls_contexts
    plain = await asyncio.start_server(busy_handler("naive", []), HOST, 0, ssl=server_ctx)
    naive = await busy_tls_download(plain, client_ctx)
    plain.close()
    await plain.wait_closed()
    assert naive == (BUSY_SIZE, "FIN")

    results: list[CloseResult] = []
    plain = await asyncio.start_server(busy_handler("graceful", results), HOST, 0, ssl=server_ctx)
    graceful = await busy_tls_download(plain, client_ctx)
    await wait_until(lambda: len(results) == 1, 5)
    plain.close()
    await plain.wait_closed()
    assert graceful == (BUSY_SIZE, "FIN"), results
    assert results[0].outcome is CloseOutcome.CLEAN, results

    server = await aiograceful.start_server(
        busy_handler("server", []),
        HOST,
        0,
        ssl=server_ctx,
        linger_timeout=0.5,
        linger_idle_timeout=0.3,
    )
    served = await busy_tls_download(server, client_ctx)
    await server.shutdown(grace=1.0)
    assert served == (BUSY_SIZE, "FIN"), server.stats
    assert server.stats.outcomes[CloseOutcome.CLEAN] == 1, server.stats


# -- send_timeout, max_discard and the shutdown notice watch tcpi_bytes_acked ------


@linux_only
async def test_tls_steady_reader_is_not_cut_by_send_timeout(tls_contexts: Contexts) -> None:
    """TLS, 6 MiB to a reader at 2 MiB/s, send_timeout=1: all of it, CLEAN.

    Over TLS the megabytes wait in the TCP transport under the SSL transport,
    and they keep the kernel's send queue at one level: the count the close
    can see never goes down, though the peer acknowledges 2 MiB/s. Progress
    is then tcpi_bytes_acked growing.
    """
    server_ctx, client_ctx = tls_contexts
    results: list[CloseResult] = []

    def handler(close: str) -> Handler:
        return big_answer(close, results, send_timeout=1.0)

    for close in ("naive", "graceful"):
        server = await asyncio.start_server(handler(close), HOST, 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        got = await asyncio.to_thread(paced_tls_read, port, client_ctx, SLOW_TLS_RATE)
        if close == "graceful":
            await wait_until(lambda: len(results) == 1, 5)
        server.close()
        await server.wait_closed()
        assert got == (SLOW_TLS_SIZE, "FIN"), (close, got, results)
    assert results[0].outcome is CloseOutcome.CLEAN, results


TLS_CAP = 64 * 1024


def uploading_tls_read(port: int, context: ssl.SSLContext) -> tuple[int, str, int]:
    """Over TLS: read, and send 16 KiB after each read (512 KiB in all); (got, end, sent)."""
    got = sent = 0
    raw = socket.create_connection((HOST, port), timeout=10)
    try:
        with context.wrap_socket(raw, server_hostname=HOST) as sock:
            sock.sendall(b"GET\n")
            for _ in range(100_000):
                chunk = sock.recv(64 * 1024)
                if not chunk:
                    return got, "FIN", sent
                got += len(chunk)
                if sent < 512 * 1024:
                    sock.sendall(b"u" * 16384)
                    sent += 16384
            return got, "stopped", sent
    except OSError as exc:
        return got, type(exc).__name__, sent
    finally:
        raw.close()


@linux_only
async def test_tls_max_discard_waits_for_the_answer(tls_contexts: Contexts) -> None:
    """TLS, a 6 MiB answer, max_discard=64 KiB, the peer uploads 512 KiB as it reads: all 6 MiB.

    The loop is hogged (as in test_tls_busy_loop_close_is_not_cut_by_timeout),
    so the kernel's queue runs dry now and then while megabytes wait in the
    TCP transport under the SSL transport.
    The cap is enforced once our bytes are in; over TLS "in" cannot be read
    from the buffers, so the close waits for tcpi_bytes_acked to stop
    moving.
    """
    server_ctx, client_ctx = tls_contexts
    results: list[CloseResult] = []

    def handler(close: str) -> Handler:
        return big_answer(close, results, max_discard=TLS_CAP)

    async def download(close: str) -> tuple[int, str, int]:
        server = await asyncio.start_server(handler(close), HOST, 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            return await while_hogged(uploading_tls_read, port, client_ctx)
        finally:
            if close != "naive":
                await wait_until(lambda: len(results) == 1, 5)
            server.close()
            await server.wait_closed()

    naive = await download("naive")
    if not isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop):
        # uvloop's naive close lets the upload finish and delivers it all
        # (asyncio's resets the uploading client: H1).
        assert naive[0] == SLOW_TLS_SIZE, naive
    got, end, sent = await download("graceful")
    assert sent > TLS_CAP
    assert got == SLOW_TLS_SIZE, (got, end, results)
    # The peer went on uploading past the cap: OVERFLOW once the answer was in.
    assert results[0].outcome in (CloseOutcome.OVERFLOW, CloseOutcome.CLEAN), results


class TLSDownload(GracefulProtocol):
    """Answers a line with SLOW_TLS_SIZE bytes; the default notice closes it once quiet."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        self.asked = False

    def data_received(self, data: bytes) -> None:
        if not self.asked and b"\n" in data:
            self.asked = True
            self.transport.write(b"x" * SLOW_TLS_SIZE)


@linux_only
async def test_tls_shutdown_notice_waits_for_a_download(tls_contexts: Contexts) -> None:
    """TLS: shutdown() during a 6 MiB download; the default notice closes once quiet: all of it.

    "Quiet" (nothing buffered or unacknowledged either way) cannot be read
    from the SSL transport's buffer alone; over TLS it also needs
    tcpi_bytes_acked to have stopped moving. The shutdown still ends by
    itself, CLEAN, once the reader has everything. This test passes without
    that check too (a close begun too early is itself a graceful close, which
    watches tcpi_bytes_acked); it guards that the check lets the quiet come.
    """
    server_ctx, client_ctx = tls_contexts
    server = await aiograceful.create_server(TLSDownload, HOST, 0, ssl=server_ctx, grace=10.0)
    port = server.sockets[0].getsockname()[1]
    client = asyncio.ensure_future(
        asyncio.to_thread(paced_tls_read, port, client_ctx, SLOW_TLS_RATE)
    )
    await wait_until(lambda: server.stats.active >= 1, 5)
    await asyncio.sleep(0.5)  # the download is under way
    report = await asyncio.wait_for(server.shutdown(), 20)
    got = await asyncio.wait_for(client, 20)
    assert got == (SLOW_TLS_SIZE, "FIN"), (got, report)
    assert report.outcomes == {CloseOutcome.CLEAN: 1}, report
    assert report.forced == 0


# -- keep_trailing on a TLS client ---------------------------------------------

LATE_TLS_ANSWER = 1 * MIB
LATE_TLS_DELAY = 0.5  # s the server thinks before answering


async def test_tls_client_keep_trailing_waits_for_the_answer(tls_contexts: Contexts) -> None:
    """A TLS client's graceful_close(keep_trailing=True): the answer sent 0.5 s later is kept.

    The naive client reads to EOF and gets the 1 MiB answer; the close must
    not send close_notify after a short quiet with the answer still to come.
    """
    server_ctx, client_ctx = tls_contexts

    async def answer_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        await asyncio.sleep(LATE_TLS_DELAY)
        writer.write(b"a" * LATE_TLS_ANSWER)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_late, HOST, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(HOST, port, ssl=client_ctx)
            writer.write(b"REQ\n")
            naive = await reader.read()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert naive == b"a" * LATE_TLS_ANSWER

        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(HOST, port, ssl=client_ctx)
            writer.write(b"REQ\n")
            result = await graceful_close(writer, keep_trailing=True)
    finally:
        server.close()
        await server.wait_closed()
    assert result.outcome is CloseOutcome.CLEAN, result
    assert result.trailing == b"a" * LATE_TLS_ANSWER, (len(result.trailing), result)
