"""The accept queue: its drain at a shutdown, and a shared listener stopped for every holder."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from aiograceful._accept import close_and_drain

HOST = "127.0.0.1"


async def _discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@pytest.mark.skipif(sys.platform != "linux", reason="shutdown() of a listener is Linux's")
async def test_close_and_drain_stop_refuses_for_every_holder() -> None:
    """``stop``: the queue is drained, then the port refuses though another descriptor holds it."""
    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]
    other = listener.dup()  # another holder, which never accepts (a stalled successor)
    server = await asyncio.start_server(_discard, sock=listener, start_serving=False)
    queued = socket.create_connection((HOST, port), timeout=5)
    try:
        accepted = await close_and_drain(
            asyncio.get_running_loop(), server, refuse_handshakes=True, stop=True
        )
        assert len(accepted) == 1  # the queued connection is drained, not reset
        for sock in accepted:
            sock.close()
        await server.wait_closed()
        assert not other.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, port), timeout=1).close()
    finally:
        queued.close()
        other.close()
