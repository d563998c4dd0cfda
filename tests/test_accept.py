"""The accept queue: its drain at a shutdown, and a shared listener stopped for every holder."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
import sys
from pathlib import Path

import pytest
from _util import connect_outcome, silent_handshake

import aiograceful._accept
from aiograceful._accept import close_and_drain
from aiograceful._socket import detach_reuseport_program, foreign_filter

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


def _reuseport_listener(port: int, host: str = HOST) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


@pytest.mark.skipif(sys.platform != "linux", reason="a Linux reuseport program")
@pytest.mark.parametrize("host", [HOST, "::1"], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("place", [0, 1], ids=["first", "second"])
async def test_close_and_drain_steers_new_connections_to_a_sibling(
    monkeypatch: pytest.MonkeyPatch, place: int, host: str
) -> None:
    """A listener leaving its group: while it settles, a new client is answered by its sibling
    (not dropped, not queued on it), whichever place it has; the group's program goes with it.

    The settle is widened by a handshake under way that never completes.
    """
    monkeypatch.setattr(aiograceful._accept, "HANDSHAKE_SETTLE_LIMIT", 1.0)
    first = _reuseport_listener(0, host)
    port = first.getsockname()[1]
    second = _reuseport_listener(port, host)
    leaving, sibling = (first, second) if place == 0 else (second, first)
    server = await asyncio.start_server(_discard, sock=leaving, start_serving=False)
    loop = asyncio.get_running_loop()
    sibling.settimeout(5)
    try:
        with silent_handshake(host, port):
            await asyncio.sleep(0.05)
            drain = asyncio.ensure_future(close_and_drain(loop, server, refuse_handshakes=True))
            await asyncio.sleep(0.3)  # steered and filtered; still settling
            assert not drain.done()
            for _ in range(4):
                outcome = await asyncio.to_thread(connect_outcome, host, port, 0.5)
                assert outcome == "connected"
            accepted = await drain
        assert accepted == []  # none of them was queued on the leaving listener
        peers = []
        for _ in range(5 if place else 4):  # the probe lands on the sibling at index 0
            conn, peer = sibling.accept()
            conn.close()
            peers.append(peer)
        assert len(peers) == (5 if place else 4)
        assert detach_reuseport_program(sibling) is False  # the program left with it
        await server.wait_closed()
    finally:
        sibling.close()


@pytest.mark.skipif(sys.platform != "linux", reason="a Linux socket filter")
async def test_close_and_drain_keeps_a_filter_of_the_users(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A listener with a socket filter of its own: drained, the filter kept, an error logged."""
    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]
    program = struct.pack("HBBI", 0x06, 0, 0, 0xFFFFFFFF)  # ret #-1: keep everything
    buffer = ctypes.create_string_buffer(program, len(program))
    listener.setsockopt(socket.SOL_SOCKET, 26, struct.pack("@HP", 1, ctypes.addressof(buffer)))
    other = listener.dup()
    server = await asyncio.start_server(_discard, sock=listener, start_serving=False)
    queued = socket.create_connection((HOST, port), timeout=5)
    try:
        with caplog.at_level(logging.ERROR, logger="aiograceful"):
            accepted = await close_and_drain(
                asyncio.get_running_loop(), server, refuse_handshakes=True
            )
        assert len(accepted) == 1
        for sock in accepted:
            sock.close()
        assert foreign_filter(other) == "a classic BPF socket filter of 1 instructions"
        assert any("does not replace it" in r.getMessage() for r in caplog.records)
        await server.wait_closed()
    finally:
        queued.close()
        other.close()


@pytest.mark.skipif(sys.platform != "linux", reason="shutdown() of a Unix listener is Linux's")
async def test_close_and_drain_stops_a_unix_listener_before_the_close(sock_dir: Path) -> None:
    """A Unix connect() after the drain would be queued and then reset by the close: the
    listener stops listening first (new connects refused), and its queue is drained after."""
    path = str(sock_dir / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    other = listener.dup()  # shows what the kernel socket does after the drain
    server = await asyncio.start_unix_server(_discard, sock=listener, start_serving=False)
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued.connect(path)
    try:
        accepted = await close_and_drain(asyncio.get_running_loop(), server, refuse_handshakes=True)
        assert len(accepted) == 1
        for sock in accepted:
            sock.close()
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late,
            pytest.raises((ConnectionRefusedError, FileNotFoundError)),  # 3.13 unlinks the path
        ):
            late.connect(path)
        await server.wait_closed()
    finally:
        queued.close()
        other.close()


@pytest.mark.skipif(sys.platform != "linux", reason="a Linux reuseport program")
async def test_close_and_drain_cancelled_leaves_no_program_on_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled while it settles, steered: the group's program is detached all the same
    (left on, it would send every new connection to one socket)."""
    monkeypatch.setattr(aiograceful._accept, "HANDSHAKE_SETTLE_LIMIT", 1.0)
    leaving = _reuseport_listener(0)
    port = leaving.getsockname()[1]
    sibling = _reuseport_listener(port)
    server = await asyncio.start_server(_discard, sock=leaving, start_serving=False)
    loop = asyncio.get_running_loop()
    try:
        with silent_handshake(HOST, port):
            await asyncio.sleep(0.05)
            drain = asyncio.ensure_future(close_and_drain(loop, server, refuse_handshakes=True))
            await asyncio.sleep(0.3)
            assert not drain.done()
            drain.cancel()
            with pytest.raises(asyncio.CancelledError):
                await drain
        assert detach_reuseport_program(sibling) is False
        await server.wait_closed()
    finally:
        sibling.close()
