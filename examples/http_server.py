"""An HTTP/1.1 server on h11 that never loses a response to the way it closes.

Run it:  python examples/http_server.py --port 8080   (Ctrl-C or SIGTERM to stop)
Probe it: python -m aiograceful probe 127.0.0.1:8080 --http

What aiograceful does for it:

* A body over ``--max-body`` gets a 413 as soon as its head is read. The
  handler then returns, and the server closes the connection with a lingering
  close: it reads the rest of the upload away, so the client, which is still
  sending, gets to read the 413 (a plain close() would make Linux send a RST).
* Over ``--max-connections``, a connection gets a 503 (``on_reject``), then the
  same lingering close.
* On shutdown (SIGTERM, SIGINT, or ``server.shutdown()``), each connection gets
  a notice (``on_notice``): a request in progress is answered with
  ``Connection: close``; a keep-alive connection waiting between requests is
  closed at once (a FIN, then a short wait for the client's, never a RST).
  After ``--grace`` seconds the rest are closed for them.
* A keep-alive connection silent for ``--idle-timeout`` seconds is closed
  gracefully (the server's ``idle_timeout``).

Every response says how many body bytes it read: ``POST /`` with a body
answers ``200 received N bytes``; ``GET /`` answers ``200 hello``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import weakref
from http import HTTPStatus
from typing import Final

import h11

import aiograceful

MAX_BODY: Final = 1024 * 1024
MAX_CONNECTIONS: Final = 100
IDLE_TIMEOUT: Final = 15.0
GRACE: Final = 10.0
#: Seconds an idle connection closed at shutdown waits for the client's FIN.
IDLE_LINGER: Final = 0.5
MAX_HEAD: Final = 16 * 1024

SERVER_NAME: Final = b"aiograceful-example"
REJECT_503: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: aiograceful-example\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 29\r\nRetry-After: 1\r\n"
    b"Connection: close\r\n\r\ntoo many connections, retry.\n"
)


class _Closing(Exception):
    """The connection is done (the peer closed, or the shutdown found it idle)."""


class HttpConnection:
    """One client connection: h11's state machine plus the shutdown notice."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_body: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.max_body = max_body
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.notice = asyncio.Event()
        #: The shutdown notice found the connection between requests.
        self.idle_at_notice = False

    async def serve(self) -> None:
        """Answer requests until the client or the shutdown ends the connection."""
        try:
            while True:
                event = await self._next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    return  # pragma: no cover - h11 gives a Request first
                if not await self._answer(event):
                    return
                self.h11.start_next_cycle()
        except _Closing:
            return
        except h11.RemoteProtocolError as exc:
            # A malformed request: answer 400 if we still may, then close.
            if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._send(exc.error_status_hint, b"bad request\n", close=True)

    async def _answer(self, request: h11.Request) -> bool:
        """Answer one request; return True if the connection may carry another."""
        length = _content_length(request)
        if length is not None and length > self.max_body:
            # Answer before reading the body. The server's lingering close
            # reads the rest away after we return, so the client reads this.
            await self._send(413, b"body over the limit\n", close=True)
            return False
        received = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                received += len(event.data)
                if received > self.max_body:  # a chunked body that grew too large
                    await self._send(413, b"body over the limit\n", close=True)
                    return False
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False  # the client went away mid-request
        body = b"received %d bytes\n" % received if request.method == b"POST" else b"hello\n"
        # The shutdown notice in HTTP terms: "Connection: close" on this response.
        await self._send(200, body, close=self.notice.is_set())
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _send(self, status: int, body: bytes, *, close: bool) -> None:
        headers = [
            (b"Server", SERVER_NAME),
            (b"Content-Type", b"text/plain"),
            (b"Content-Length", b"%d" % len(body)),
        ]
        if close:
            headers.append((b"Connection", b"close"))
        for event in (
            h11.Response(
                status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode()
            ),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            data = self.h11.send(event)
            if data:
                self.writer.write(data)
        await self.writer.drain()

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # h11's sentinels confuse mypy
            between_requests = self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0]
            data = await self._read(watch_notice=between_requests)
            self.h11.receive_data(data)

    async def _read(self, *, watch_notice: bool) -> bytes:
        """Read some bytes; between requests, give up at once when the shutdown notice comes."""
        if not watch_notice:
            return await self.reader.read(65536)
        if self.notice.is_set():
            raise _Closing
        read = asyncio.ensure_future(self.reader.read(65536))
        notice = asyncio.ensure_future(self.notice.wait())
        try:
            await asyncio.wait({read, notice}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            notice.cancel()
            if not read.done():
                read.cancel()  # StreamReader.read keeps unread bytes in its buffer
            # cancel() only asks: the task is cancelled (or, if bytes came in
            # the same step, done) once it has run. Wait for that.
            await asyncio.wait({read, notice})
        if read.cancelled():
            # An idle keep-alive connection at shutdown: close it now.
            self.idle_at_notice = True
            raise _Closing
        return read.result()  # bytes that raced the notice: answered, with Connection: close


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


async def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    max_body: int = MAX_BODY,
    max_connections: int | None = MAX_CONNECTIONS,
    idle_timeout: float | None = IDLE_TIMEOUT,
    grace: float = GRACE,
) -> aiograceful.GracefulServer:
    """Start the example server; the caller serves it (``serve_forever``) or shuts it down."""
    connections: weakref.WeakKeyDictionary[asyncio.StreamWriter, HttpConnection] = (
        weakref.WeakKeyDictionary()
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = connections[writer] = HttpConnection(reader, writer, max_body)
        await conn.serve()
        if conn.idle_at_notice:
            # Nothing of the client's is unread, and a pooled client reads (so
            # sends its FIN) only when it next uses the connection: a short
            # wait for that FIN, then a plain close (a FIN, never a RST).
            await aiograceful.graceful_close(
                writer, idle_timeout=IDLE_LINGER, reset_on_failure=False
            )
        # Returning hands the writer to the server, which closes it gracefully.

    def on_notice(writer: asyncio.StreamWriter) -> None:
        conn = connections.get(writer)
        if conn is not None:
            conn.notice.set()

    def on_reject(transport: asyncio.BaseTransport) -> None:
        transport.write(REJECT_503)  # type: ignore[attr-defined]

    return await aiograceful.start_server(
        handler,
        host,
        port,
        grace=grace,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=on_notice,
        idle_timeout=idle_timeout,
    )


async def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; print the shutdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-body", type=int, default=MAX_BODY)
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    parser.add_argument("--grace", type=float, default=GRACE)
    args = parser.parse_args(argv)
    server = await serve(
        args.host,
        args.port,
        max_body=args.max_body,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        grace=args.grace,
    )
    names = ", ".join(str(sock.getsockname()) for sock in server.sockets)
    print(f"serving HTTP on {names}; Ctrl-C or SIGTERM to stop", flush=True)
    await server.serve_forever()
    report = await server.shutdown()
    # How each one ended: "clean" is a FIN both ways; the others are spelled out.
    ends = ", ".join(f"{n} {o.value}" for o, n in sorted(report.outcomes.items(), key=str))
    print(
        f"shut down in {report.duration:.2f} s: {report.connections} connection(s), "
        f"{report.closed_clean} closed within the grace period ({ends or 'none'}), "
        f"{report.forced} forced",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
