"""Fault injection at every step of a close.

A close goes through steps: the connection is open, our reply is being
flushed, our FIN is out and we linger (discarding), the peer's FIN came first
and we are flushing the last of our reply. At each step a peer can reset the
connection, stop reading, trickle bytes, or vanish without a FIN or a RST.
Whatever it does, the close must end with a typed :class:`CloseOutcome`,
within its bound, with no timer left armed and nothing reaching the loop's
exception handler (conftest's guard).

Each test runs through the streams API (``graceful_close``) and through a
``GracefulProtocol`` (``close_gracefully``), on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import pytest
from _faults import netns_unavailable, reset_socket, veth_namespace
from _util import wait_until

from aiograceful import CloseOutcome, CloseResult, GracefulProtocol, graceful_close, start_server
from aiograceful._linger import Linger
from aiograceful._streams import linger_of

# Faults injected, per kind, over the whole run (printed with -s).
INJECTED: collections.Counter[str] = collections.Counter()

# The bound every close here is given when only the fault may end it early.
LONG = 10.0
# Margin over a bound, for a loaded machine.
MARGIN = 2.0
# Timers may fire this much before a bound as read from loop.time(): uvloop's
# clock is libuv's cached millisecond time, taken at the start of an iteration.
EARLY = 0.02
# Enough to fill a send buffer that the peer does not read (its SO_RCVBUF is
# tiny), so that the reply is still being flushed when the fault comes.
BIG = 4 * 1024 * 1024

APIS = ["streams", "protocol"]


@pytest.fixture(scope="module", autouse=True)
def _print_figures() -> Iterator[None]:
    """Print the faults injected by this module's tests (visible with -s)."""
    yield
    print("\nfaults injected: " + ", ".join(f"{k}: {v}" for k, v in sorted(INJECTED.items())))


class Sink(GracefulProtocol):
    """Our end, through the protocol API: it keeps what it is given."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.got_eof = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def on_peer_eof(self) -> None:
        # Answer first; the test starts the close.
        self.got_eof.set()


class Ours:
    """Our end of a connection, through the streams API or a GracefulProtocol."""

    def __init__(self, api: str) -> None:
        self.api = api
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.proto: Sink | None = None
        self._linger: Linger | None = None

    async def attach(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if self.api == "streams":
            self.reader, self.writer = await asyncio.open_connection(sock=sock)
        else:
            proto = Sink()
            await loop.connect_accepted_socket(lambda: proto, sock=sock)
            self.proto = proto

    @property
    def transport(self) -> asyncio.Transport:
        if self.writer is not None:
            return self.writer.transport  # type: ignore[return-value]
        assert self.proto is not None
        return self.proto.transport

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def wait_peer_eof(self) -> None:
        if self.reader is not None:
            assert await asyncio.wait_for(self.reader.read(), LONG) == b""
        else:
            assert self.proto is not None
            await asyncio.wait_for(self.proto.got_eof.wait(), LONG)

    async def start_close(self, **options: Any) -> asyncio.Future[CloseResult]:
        """Start the graceful close; return the future of its result once it has begun."""
        if self.writer is not None:
            fut: asyncio.Future[CloseResult] = asyncio.ensure_future(
                graceful_close(self.writer, **options)
            )
        else:
            assert self.proto is not None
            fut = self.proto.close_gracefully(**options)
        await asyncio.sleep(0)
        if self.proto is not None:
            self._linger = self.proto._graceful
        else:
            # None when the connection was gone before the close began.
            self._linger = linger_of(self.transport)
        return fut

    def linger(self) -> Linger:
        assert self._linger is not None, "no graceful close is under way"
        return self._linger

    def check_done(self, result: CloseResult) -> None:
        """After the close: one result, no timer armed, the transport closed."""
        linger = self._linger
        if linger is not None:
            assert linger.result == result
            assert not linger.timer_armed, f"a timer is still armed: {linger!r}"
        assert self.transport.is_closing()


@contextlib.asynccontextmanager
async def connection(
    api: str, *, peer_rcvbuf: int | None = None
) -> AsyncIterator[tuple[Ours, socket.socket]]:
    """A TCP connection on loopback: our end (``api``) and the peer's raw socket."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if peer_rcvbuf is not None:
            # Before connect(), so that the window it advertises stays small.
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
        peer.connect(listener.getsockname())
        sock, _ = listener.accept()
    peer.setblocking(False)
    ours = Ours(api)
    try:
        await ours.attach(sock)
        yield ours, peer
    finally:
        peer.close()
        if not ours.transport.is_closing():
            ours.transport.abort()
        for _ in range(3):
            await asyncio.sleep(0)


async def read_until_eof(peer: socket.socket) -> bytes:
    """The peer reads until our FIN."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(peer, 65536), LONG):
        data += chunk
    return bytes(data)


async def finish(fut: Awaitable[CloseResult], bound: float) -> CloseResult:
    return await asyncio.wait_for(fut, bound + MARGIN)


# -- a peer that resets ---------------------------------------------------------

RESET_STEPS = ["open", "flush", "linger", "flush-after-peer-fin"]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("step", RESET_STEPS)
async def test_close_peer_reset_at_each_step_ends_peer_reset(api: str, step: str) -> None:
    """A peer RST at any step of the close ends it PEER_RESET at once, not at a timer."""
    loop = asyncio.get_running_loop()
    async with connection(api, peer_rcvbuf=4096) as (ours, peer):
        if step == "open":
            # The reset comes before anyone starts a close.
            reset_socket(peer)
            await wait_until(
                ours.transport.is_closing, LONG, what="our side saw the reset", every=0.002
            )
            fut = await ours.start_close(timeout=LONG)
        elif step == "flush":
            # Our reply does not fit the peer's window: still being flushed.
            ours.write(b"r" * BIG)
            fut = await ours.start_close(timeout=LONG, idle_timeout=0.1)
            await asyncio.sleep(0.05)
            assert ours.transport.get_write_buffer_size() > 0
            assert ours.linger().state.name == "LINGERING"
            reset_socket(peer)
        elif step == "linger":
            # The reply and our FIN are through; the peer keeps sending, then resets.
            ours.write(b"reply")
            fut = await ours.start_close(timeout=LONG, idle_timeout=None)
            assert await read_until_eof(peer) == b"reply"
            await loop.sock_sendall(peer, b"d" * 1000)
            await wait_until(
                lambda: ours.linger().discarded >= 1000,
                LONG,
                what="the bytes were discarded",
                every=0.002,
            )
            reset_socket(peer)
        else:
            # The peer half-closed first; our long reply is still being
            # flushed (FLUSHING: nothing left to read, our bytes not yet
            # acknowledged) when it resets.
            peer.shutdown(socket.SHUT_WR)
            await ours.wait_peer_eof()
            ours.write(b"r" * BIG)
            fut = await ours.start_close(timeout=LONG)
            await asyncio.sleep(0.05)
            assert ours.transport.get_write_buffer_size() > 0
            assert ours.linger().state.name == "FLUSHING"
            reset_socket(peer)
        INJECTED[f"peer RST during {step}"] += 1
        started = loop.time()
        result = await finish(fut, 0.0)
        assert result.outcome is CloseOutcome.PEER_RESET, result
        assert loop.time() - started < LONG / 2, "the close waited for a timer"
        if step == "linger":
            assert result.discarded == 1000
        ours.check_done(result)


# -- a peer that stops reading ----------------------------------------------------


async def test_naive_close_peer_not_reading_never_ends() -> None:
    """The hazard: a plain close() waits without bound for a peer that stopped reading."""
    async with connection("streams", peer_rcvbuf=4096) as (ours, _peer):
        assert ours.writer is not None
        ours.writer.write(b"r" * BIG)
        ours.writer.close()
        waiter = asyncio.ensure_future(ours.writer.wait_closed())
        done, _ = await asyncio.wait([waiter], timeout=1.0)
        assert not done, "the plain close ended: the peer read after all"
        assert ours.transport.get_write_buffer_size() > 0
        ours.transport.abort()
        with contextlib.suppress(OSError):
            await waiter


@pytest.mark.parametrize("api", APIS)
async def test_close_peer_not_reading_flush_bounded_by_send_timeout(api: str) -> None:
    """A peer that stops reading cannot hold the flush open past ``send_timeout``."""
    loop = asyncio.get_running_loop()
    async with connection(api, peer_rcvbuf=4096) as (ours, peer):
        ours.write(b"r" * BIG)
        started = loop.time()
        # Neither the total nor the idle bound may end it: they start once our
        # bytes are acknowledged. The peer acknowledges none: send_timeout does.
        fut = await ours.start_close(timeout=0.1, idle_timeout=0.05, send_timeout=0.5)
        INJECTED["peer stops reading"] += 1
        result = await finish(fut, 0.5)
        elapsed = loop.time() - started
        assert result.outcome is CloseOutcome.IDLE_TIMEOUT, result
        assert result.unacked is not None
        assert result.unacked > 0
        assert 0.5 - EARLY <= elapsed < 0.5 + MARGIN
        ours.check_done(result)
        # The close let go as close() does: the kernel still sends what it
        # holds, then our FIN, once the peer reads again.
        rest = await read_until_eof(peer)
        assert 0 < len(rest) <= BIG


# -- a peer that trickles -----------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
async def test_close_trickling_peer_ends_at_total_timeout(api: str) -> None:
    """One byte every half ``idle_timeout`` keeps the idle bound away; ``timeout`` still ends it."""
    loop = asyncio.get_running_loop()
    timeout, idle = 0.8, 0.2
    async with connection(api) as (ours, peer):
        ours.write(b"reply")
        fut = await ours.start_close(timeout=timeout, idle_timeout=idle)
        started = loop.time()
        assert await read_until_eof(peer) == b"reply"
        sent = 0

        async def trickle() -> None:
            nonlocal sent
            # Bounded: at most 10 s of trickling; the close ends it long before.
            for _ in range(int(LONG / (idle / 2))):
                try:
                    await loop.sock_sendall(peer, b"t")
                except OSError:
                    return
                sent += 1
                INJECTED["trickled bytes"] += 1
                await asyncio.sleep(idle / 2)

        trickler = asyncio.ensure_future(trickle())
        try:
            result = await finish(fut, timeout)
        finally:
            trickler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickler
        elapsed = loop.time() - started
        assert result.outcome is CloseOutcome.TIMEOUT, result
        assert timeout - EARLY <= elapsed < timeout + MARGIN
        # Every byte but the last few in flight was read and discarded.
        assert 0 < result.discarded <= sent
        assert result.discarded >= (timeout / (idle / 2)) / 2
        ours.check_done(result)


# -- a peer that vanishes (network namespace) ------------------------------------------

_NETNS_SKIP = netns_unavailable() if sys.platform == "linux" else "Linux only"

# The peer: runs inside the namespace; connects, sends a request line, then
# neither reads nor closes until the test kills it.
_VANISHING_PEER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET\n")
sys.stdin.read()
"""


@contextlib.contextmanager
def _peer_in(ns_name: str, host: str, port: int) -> Any:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns_name, sys.executable, "-c", _VANISHING_PEER, host, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.stderr is not None:
            proc.stderr.close()


async def _vanishing_peer_close(
    reply_size: int, naive: bool, timeout: float, idle: float, send: float = 60.0
) -> tuple[CloseResult | None, float]:
    """Serve one request from a peer in a namespace, set the link down, then close.

    Returns the close's result (None for the naive close, which is expected
    never to end within the bound) and how long the close took.
    """
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[tuple[CloseResult | None, float]] = loop.create_future()
    with veth_namespace() as ns:

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                assert await reader.readline() == b"GET\n"
                # From here, every packet either way vanishes: no FIN, no RST.
                await asyncio.to_thread(ns.link_down)
                INJECTED["peer vanished (link down)"] += 1
                writer.write(b"x" * reply_size)
                started = loop.time()
                if naive:
                    writer.close()
                    try:
                        await asyncio.wait_for(writer.wait_closed(), 2 * timeout)
                    except TimeoutError:
                        outcome.set_result((None, loop.time() - started))
                        writer.transport.abort()
                        return
                    outcome.set_result((CloseResult(CloseOutcome.CLEAN, 0, 0.0), 0.0))
                else:
                    result = await graceful_close(
                        writer, timeout=timeout, idle_timeout=idle, send_timeout=send
                    )
                    outcome.set_result((result, loop.time() - started))
            except BaseException as exc:
                if not outcome.done():
                    outcome.set_exception(exc)
                raise

        server = await start_server(handler, ns.host_addr, 0, grace=0.5, force_timeout=0.2)
        try:
            port = server.sockets[0].getsockname()[1]
            with _peer_in(ns.name, ns.host_addr, port):
                return await asyncio.wait_for(outcome, timeout + 3 * MARGIN)
        finally:
            await server.shutdown()


@pytest.mark.skipif(_NETNS_SKIP is not None, reason=f"no network namespace: {_NETNS_SKIP}")
async def test_close_vanished_peer_small_reply_ends_idle_timeout() -> None:
    """A peer gone without FIN or RST: its acknowledgement never comes; send_timeout ends it."""
    result, elapsed = await _vanishing_peer_close(100, naive=False, timeout=3.0, idle=0.3, send=0.5)
    assert result is not None
    assert result.outcome is CloseOutcome.IDLE_TIMEOUT, result
    assert result.unacked == 100, result  # the reply, still in the kernel's queue
    assert 0.5 - EARLY <= elapsed < 0.5 + MARGIN


@pytest.mark.skipif(_NETNS_SKIP is not None, reason=f"no network namespace: {_NETNS_SKIP}")
async def test_close_vanished_peer_unsent_reply_naive_hangs_graceful_times_out() -> None:
    """A peer gone with our reply unsent: a plain close never ends; ours ends at send_timeout."""
    naive, naive_elapsed = await _vanishing_peer_close(BIG, naive=True, timeout=1.0, idle=0.3)
    assert naive is None, "the naive close ended: the fault was not injected"
    assert naive_elapsed >= 2.0 - EARLY
    result, elapsed = await _vanishing_peer_close(BIG, naive=False, timeout=0.2, idle=0.1, send=1.0)
    assert result is not None
    # The reply is still queued: no byte acknowledged for send_timeout.
    assert result.outcome is CloseOutcome.IDLE_TIMEOUT, result
    assert result.unacked is not None
    assert result.unacked > 0
    assert 1.0 - EARLY <= elapsed < 1.0 + MARGIN
