"""A line-protocol server on aiograceful's protocols API, with an asymmetric shutdown.

Run it:   python examples/line_server.py --port 9000   (Ctrl-C or SIGTERM to stop)
Talk:     nc 127.0.0.1 9000, then type PING, ECHO hello, TIME, QUIT.
Probe it: python -m aiograceful probe 127.0.0.1:9000

The protocol: one command per line, one answer line per command.

    PING        -> PONG
    ECHO text   -> text
    TIME        -> seconds since the epoch
    QUIT        -> BYE, then the server closes (gracefully)
    anything    -> ERR unknown command

What aiograceful does for it:

* Shutdown is asymmetric (hazard H3): the server sends ``NOTICE shutting down``
  and keeps both directions open. The client stops sending, half-closes when
  it has its answers, and the server answers every line it received before
  that FIN. Only then does it close. (A server that half-closed first could
  no longer answer requests that crossed its FIN.)
* A line longer than ``--max-line`` gets ``ERR line too long``, then a
  lingering close: the rest of the line is read away, so the client still
  sending it reads the error instead of a RST.
* A connection silent for ``--idle-timeout`` seconds is closed gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Final

import aiograceful

MAX_LINE: Final = 4096
IDLE_TIMEOUT: Final = 60.0
GRACE: Final = 10.0
NOTICE: Final = b"NOTICE shutting down\r\n"


class LineProtocol(aiograceful.GracefulProtocol):
    """Answers each line; on the shutdown notice, says so and keeps answering."""

    max_line: int = MAX_LINE

    def __init__(self) -> None:
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[: end + 1]
            if not self._answer(line):
                return
        if len(self.buffer) > self.max_line:
            self.buffer.clear()
            self.transport.write(b"ERR line too long\r\n")
            # The rest of the line is still coming: linger so the client reads the error.
            self.close_gracefully()

    def _answer(self, line: bytes) -> bool:
        command, _, argument = line.partition(b" ")
        command = command.upper()
        if command == b"PING":
            self.transport.write(b"PONG\r\n")
        elif command == b"ECHO":
            self.transport.write(argument + b"\r\n")
        elif command == b"TIME":
            self.transport.write(b"%.3f\r\n" % time.time())
        elif command == b"QUIT":
            self.transport.write(b"BYE\r\n")
            self.close_gracefully()
            return False
        else:
            self.transport.write(b"ERR unknown command\r\n")
        return True

    def on_shutdown_notice(self) -> None:
        # Not close_gracefully(): requests may be on their way to us. The client
        # half-closes when it is done, and on_peer_eof() closes our side then.
        self.transport.write(NOTICE)

    def on_idle_timeout(self) -> None:
        self.close_gracefully()


async def serve(
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    max_line: int = MAX_LINE,
    idle_timeout: float | None = IDLE_TIMEOUT,
    grace: float = GRACE,
) -> aiograceful.GracefulServer:
    """Start the example server; the caller serves it (``serve_forever``) or shuts it down."""

    def factory() -> LineProtocol:
        protocol = LineProtocol()
        protocol.max_line = max_line
        return protocol

    return await aiograceful.create_server(
        factory, host, port, grace=grace, idle_timeout=idle_timeout
    )


async def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; print the shutdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--max-line", type=int, default=MAX_LINE)
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    parser.add_argument("--grace", type=float, default=GRACE)
    args = parser.parse_args(argv)
    server = await serve(
        args.host,
        args.port,
        max_line=args.max_line,
        idle_timeout=args.idle_timeout,
        grace=args.grace,
    )
    names = ", ".join(str(sock.getsockname()) for sock in server.sockets)
    print(f"serving lines on {names}; Ctrl-C or SIGTERM to stop", flush=True)
    await server.serve_forever()
    report = await server.shutdown()
    print(
        f"shut down in {report.duration:.2f} s: {report.connections} connection(s), "
        f"{report.closed_clean} closed within the grace period, {report.forced} forced",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
