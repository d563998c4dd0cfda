"""The HTTP servers the wrk benchmark measures, one process each.

``python -m benchmarks._wrk_servers KIND LOOP`` binds 127.0.0.1 on a port the
kernel picks, prints ``PORT`` on one line of stdout, and serves until its
stdin closes (or SIGTERM/SIGINT). A line ``stats`` on stdin is answered with
one JSON line: connections closed, connection errors, and the close outcomes
of the aiograceful servers.

Every server answers each request (headers ending in a blank line; wrk sends
no body) with the same minimal response. A request carrying
``Connection: close`` is answered with ``Connection: close`` and ends the
connection the server's way (KIND); any other is answered and the connection
kept open, so the same servers give the keep-alive figures.

KIND:

* ``bare``: ``asyncio.Protocol``, ``transport.close()`` after the reply.
* ``halfclose``: ``asyncio.Protocol``, ``transport.write_eof()`` after the
  reply, and the transport closed by asyncio when the peer's FIN arrives
  (``eof_received`` returns False): a half-close written by hand, with no
  timer and no byte cap. The floor a lingering close can reach.
* ``graceful-eof``: ``GracefulProtocol`` and its ``write_eof()``: the record
  and the state machine, no linger (no timer, no protocol swap).
* ``graceful``: ``GracefulProtocol`` and ``close_gracefully()``.
* ``streams-close``: ``asyncio.start_server``, ``writer.close()`` and
  ``await writer.wait_closed()``.
* ``streams-graceful``: ``aiograceful.start_server``; the handler returns and
  the server closes the writer gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
from typing import Final

import aiograceful
from aiograceful import CloseOutcome, GracefulProtocol

from ._harness import HOST, loop_factory

KINDS: Final = (
    "bare",
    "halfclose",
    "graceful-eof",
    "graceful",
    "streams-close",
    "streams-graceful",
)

_BODY: Final = b"ok"
REPLY_CLOSE: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n"
    b"Connection: close\r\n\r\n" + _BODY
)
REPLY_KEEP: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\n" + _BODY
)
# wrk sends the header as given on its command line (`-H "Connection: close"`).
_CLOSE_HEADER: Final = b"\r\nConnection: close"
_END: Final = b"\r\n\r\n"
_BACKLOG: Final = 1024
_CLEAN: Final = CloseOutcome.CLEAN


class _Stats:
    clean = 0
    closed = 0
    errors = 0
    outcomes: collections.Counter[str] = collections.Counter()  # noqa: RUF012


class _HttpMixin:
    """Split requests at the blank line; answer each; ``finish()`` on ``Connection: close``."""

    _buf = b""
    transport: asyncio.Transport

    def finish(self) -> None:
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(_END)
            if end < 0:
                self._buf = buf
                return
            head = buf[:end]
            buf = buf[end + 4 :]
            if _CLOSE_HEADER in head:
                self._buf = b""
                self.transport.write(REPLY_CLOSE)
                self.finish()
                return
            self.transport.write(REPLY_KEEP)


class Bare(_HttpMixin, asyncio.Protocol):
    """Reply, then ``transport.close()``."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def finish(self) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        _Stats.closed += 1
        if exc is not None:
            _Stats.errors += 1


class HalfClose(Bare):
    """Reply, ``write_eof()``; asyncio closes the transport on the peer's FIN."""

    def finish(self) -> None:
        self.transport.write_eof()

    def eof_received(self) -> bool:
        return False  # both directions are done: let the transport close


class GracefulEof(_HttpMixin, GracefulProtocol):
    """Reply, ``GracefulProtocol.write_eof()``: the record and the state machine, no linger."""

    def finish(self) -> None:
        self.write_eof()

    def on_peer_eof(self) -> None:
        # The peer half-closed before asking to close: answer nothing more.
        self.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        _Stats.closed += 1
        if exc is not None:
            _Stats.errors += 1
        result = self.close_result
        # An identity test on the common path: counting by name costs the
        # graceful servers an Enum property lookup per connection.
        if result is not None and result.outcome is _CLEAN:
            _Stats.clean += 1
        else:
            _Stats.outcomes[result.outcome.name if result else "none"] += 1


class Graceful(GracefulEof):
    """Reply, ``close_gracefully()``."""

    def finish(self) -> None:
        self.close_gracefully()

    def on_peer_eof(self) -> None:
        self.close_gracefully()


async def _serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer requests until one asks to close (or the peer goes)."""
    while True:
        try:
            head = await reader.readuntil(_END)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        if _CLOSE_HEADER in head:
            writer.write(REPLY_CLOSE)
            return
        writer.write(REPLY_KEEP)


async def _handle_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _serve_http(reader, writer)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        _Stats.errors += 1
    _Stats.closed += 1


async def _handle_graceful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # The server closes the writer gracefully once this returns.
    await _serve_http(reader, writer)
    _Stats.closed += 1


async def serve(kind: str) -> None:
    """Serve ``kind`` until stdin closes or a signal arrives."""
    loop = asyncio.get_running_loop()
    server: asyncio.AbstractServer | aiograceful.GracefulServer
    factories: dict[str, type[asyncio.Protocol]] = {
        "bare": Bare,
        "halfclose": HalfClose,
        "graceful-eof": GracefulEof,
        "graceful": Graceful,
    }
    if kind in factories:
        server = await loop.create_server(factories[kind], HOST, 0, backlog=_BACKLOG)
    elif kind == "streams-close":
        server = await asyncio.start_server(_handle_close, HOST, 0, backlog=_BACKLOG)
    elif kind == "streams-graceful":
        server = await aiograceful.start_server(_handle_graceful, HOST, 0, backlog=_BACKLOG)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    port = server.sockets[0].getsockname()[1]
    stop = loop.create_future()

    def on_stdin() -> None:
        line = sys.stdin.buffer.readline()
        if not line:
            if not stop.done():
                stop.set_result(None)
            return
        if line.strip() == b"stats":
            answer = {
                "closed": _Stats.closed,
                "errors": _Stats.errors,
                "outcomes": {
                    **_Stats.outcomes,
                    **({"CLEAN": _Stats.clean} if _Stats.clean else {}),
                },
            }
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    try:
        await stop
    finally:
        loop.remove_reader(sys.stdin.fileno())
        if isinstance(server, aiograceful.GracefulServer):
            await server.shutdown(grace=1.0)
        else:
            server.close()


def main(argv: list[str] | None = None) -> None:
    """The command line: ``KIND LOOP``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._wrk_servers")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("loop", choices=("uvloop", "asyncio"))
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve(args.kind))


if __name__ == "__main__":
    main()
