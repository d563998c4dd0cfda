"""Helpers shared by the reliability tests: loops, TCP pairs, peers that misbehave.

Nothing here mocks a transport: every helper works on real sockets on
loopback (or on a veth pair in a network namespace the test creates).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import uvloop

#: The two loops every reliability test runs on, by name.
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}

#: struct linger {l_onoff = 1, l_linger = 0}: close() sends a RST (Linux).
LINGER_ZERO = struct.pack("ii", 1, 0)

#: errno values a socket reports once the other end has reset the connection.
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED})


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking TCP sockets on 127.0.0.1: (ours, peer's)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    peer.setblocking(False)
    return ours, peer


def reset_socket(sock: socket.socket) -> None:
    """Close ``sock`` with SO_LINGER {1, 0}: the kernel sends a RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    sock.close()


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


class ExceptionHandlerRecorder:
    """A loop exception handler that records every context it is given."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(context)

    def describe(self) -> str:
        return "; ".join(f"{c.get('message')}: {c.get('exception')!r}" for c in self.contexts)


# -- network namespaces -------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def netns_unavailable() -> str | None:
    """Why ``ip netns`` cannot be used here, or None when it can (probed, then undone)."""
    name = f"agr-probe-{uuid.uuid4().hex[:8]}"
    try:
        made = _ip("netns", "add", name, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip` could not run: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _free_slash30() -> tuple[str, str]:
    """Two addresses of a private /30 that no address or route here already uses."""
    taken = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "-o", "addr").stdout
    thirds = list(range(200, 256))
    random.shuffle(thirds)
    for third in thirds:
        prefix = f"10.233.{third}."
        if prefix not in taken:
            return f"{prefix}1", f"{prefix}2"
    raise RuntimeError("no free 10.233.x.0/30 for the test's veth pair")


class VethNamespace:
    """A network namespace joined to the root namespace by a veth pair on a private /30.

    ``host_addr`` is on ``host_if`` (root namespace), ``peer_addr`` on the
    other end inside ``name``. :meth:`link_down` sets the root end down: from
    then on every packet between the two vanishes, with neither FIN nor RST.
    """

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"agr-{tag}"
        self.host_if = f"agrh{tag}"
        self.peer_if = f"agrp{tag}"
        self.host_addr, self.peer_addr = _free_slash30()

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        _ip("link", "set", self.peer_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        ns = ("netns", "exec", self.name, "ip")
        _ip(*ns, "addr", "add", f"{self.peer_addr}/30", "dev", self.peer_if)
        _ip(*ns, "link", "set", self.peer_if, "up")
        _ip(*ns, "link", "set", "lo", "up")

    def link_down(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def destroy(self) -> None:
        # Deleting the namespace destroys the veth end inside it, and with it
        # the pair; the explicit link delete covers a half-made setup.
        _ip("netns", "del", self.name, check=False)
        _ip("link", "del", self.host_if, check=False)


@contextlib.contextmanager
def veth_namespace() -> Iterator[VethNamespace]:
    """A :class:`VethNamespace`, always destroyed on the way out."""
    ns = VethNamespace()
    try:
        ns.create()
        yield ns
    finally:
        ns.destroy()


# -- a load of well-defined clients (in this process, or as a subprocess) -------------

REQUEST = b"request\n"
REPLY = b"reply\n"


class LoadClient(asyncio.Protocol):
    """A client that sends one request line, reads the reply, then acts per ``path``.

    * ``clean``/``shutdown``: waits for the server's FIN, then closes (FIN).
    * ``timeout``: never sends its FIN; the server's timer must end it.
    * ``overflow``: floods 4 KiB after the reply.
    * ``reset``: resets (SO_LINGER {1, 0}) as soon as the reply is in.
    * ``abort``: waits; the server aborts.
    """

    def __init__(self, path: str, done: asyncio.Future[bytes]) -> None:
        self.path = path
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.got = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        tr.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.got += data
        if self.got != REPLY or self.transport is None:
            return
        if self.path == "overflow":
            self.transport.write(b"f" * 4096)
        elif self.path == "reset":
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            self.transport.abort()

    def eof_received(self) -> bool:
        # The reply is complete: close our side too (False: the transport
        # closes), except on the timeout path, where the peer keeps its side
        # open. Neither loop reads after EOF, so a RST would go unnoticed:
        # probe with a byte now and then (discarded by the lingering server)
        # until the write fails.
        if self.path == "timeout":
            self._probe()
            return True
        return False

    def _probe(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(b"?")
        asyncio.get_running_loop().call_later(0.05, self._probe)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.got)
        self.transport = None


async def run_clients(
    path: str, host: str, port: int, count: int, concurrency: int
) -> dict[str, int]:
    """Run ``count`` clients, ``concurrency`` at a time; count the replies they read."""
    loop = asyncio.get_running_loop()
    replies: dict[str, int] = {}

    async def one() -> None:
        done: asyncio.Future[bytes] = loop.create_future()
        await loop.create_connection(lambda: LoadClient(path, done), host, port)
        got = (await done).decode(errors="replace")
        replies[got] = replies.get(got, 0) + 1

    for start in range(0, count, concurrency):
        size = min(concurrency, count - start)
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(size))), 60.0)
    return replies


def _main(argv: list[str]) -> None:
    """``python _faults.py PATH HOST PORT COUNT CONCURRENCY``: print the replies (JSON)."""
    import json

    path, host, port, count, concurrency = argv
    replies = uvloop.run(run_clients(path, host, int(port), int(count), int(concurrency)))
    print(json.dumps(replies), flush=True)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
