"""A real WebSocket client (wsproto over a raw socket) for the drop-in shutdown tests.

:func:`websocket_shutdown` runs a server (``_dropins.server_process``), opens
``/ws``, reads the messages the application sends on accept, sends SIGTERM
and then reads to the end: the close code, the messages and how long the
server took to exit.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

import wsproto
import wsproto.events as ev
from _dropins import HOST, server_process
from wsproto.connection import ConnectionState

#: What the test applications send on accept ("0" to "99"), before the shutdown.
MESSAGES = 100


@dataclasses.dataclass
class WebSocketEnd:
    """How a WebSocket ended at the server's shutdown, as the client saw it."""

    code: int  # the close frame's code; 1006 when none came (RFC 6455's "abnormal")
    messages: list[str]  # every text message, in order
    ended: str  # "fin" or "reset"
    exited: float  # seconds from SIGTERM to the server's exit
    log: bytes  # what the server wrote

    @property
    def in_order(self) -> bool:
        """Every message from "0" on, none missing."""
        return self.messages == [str(i) for i in range(len(self.messages))]


def _events(conn: wsproto.WSConnection, sock: socket.socket) -> list[ev.Event]:
    data = sock.recv(65536)
    conn.receive_data(data or None)
    return list(conn.events())


def websocket_shutdown(
    argv: Sequence[str], kill_after: float = 20.0, *, echo: bool = True, path: str = "/ws"
) -> WebSocketEnd:
    """Open ``path`` on the server ``argv``, SIGTERM it, and see how the WebSocket ends.

    ``echo=False``: a client that never answers the server's close frame.
    """
    log = bytearray()
    with (
        server_process(argv, log=log) as (proc, port),
        socket.create_connection((HOST, port), timeout=10) as sock,
    ):
        conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        sock.sendall(conn.send(ev.Request(host=f"{HOST}:{port}", target=path)))
        messages: list[str] = []
        code, ended = 1006, "fin"
        accepted = False
        for _ in range(1000):  # bounded: the handshake and the messages on accept
            if accepted and len(messages) >= MESSAGES:
                break
            for event in _events(conn, sock):
                if isinstance(event, ev.AcceptConnection):
                    accepted = True
                elif isinstance(event, ev.TextMessage):
                    messages.append(event.data)
        assert accepted, messages
        assert len(messages) >= MESSAGES, messages
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            for _ in range(10_000):  # bounded by the socket's timeout too
                data = sock.recv(65536)
                if not data:
                    break  # the server's FIN
                conn.receive_data(data)
                for event in conn.events():
                    if isinstance(event, ev.TextMessage):
                        messages.append(event.data)
                    elif isinstance(event, ev.CloseConnection):
                        code = event.code
                        if echo and conn.state is ConnectionState.REMOTE_CLOSING:
                            sock.sendall(conn.send(event.response()))
        except ConnectionResetError:
            ended = "reset"
        except TimeoutError:
            ended = "timeout"
        sock.close()  # as a client does once the server's FIN came
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        exited = time.monotonic() - began
    return WebSocketEnd(code, messages, ended, exited, bytes(log))
