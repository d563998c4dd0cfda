"""Soak: a bounded mixed workload against the example HTTP server, with misbehaving clients.

For ``AIOGRACEFUL_SOAK_SECONDS`` (default 24 s, split between the two loops)
client sessions are started, at most ``CONCURRENCY`` at a time, against
``examples/http_server.py`` (h11 on aiograceful, with a connection limit and
an idle timeout). Then the server is shut down while sessions are still in
flight. Each session is, at random (seeded):

* well-behaved: keep-alive GETs and POSTs; an upload over the body limit,
  sent whole before reading (as ``http.client`` does). Every request sent
  must get its response (200, 413, or the 503 of the connection limit). The
  one exception is HTTP's own: a request sent on a *reused* connection that
  ends before any byte of a response was not processed, and is retried on a
  new connection (as ``http.client``'s users and urllib3 do); a retry that
  is refused because the server has stopped listening is counted, not lost.
* misbehaving: resets mid-request or mid-body, half-closes mid-request, stays
  silent, floods an oversized body and leaves without reading, pipelines and
  resets, or never sends its FIN.

Every connection the server accepted, well-behaved or not, must end with a
typed :class:`CloseOutcome` (observed through the server's per-connection
``on_lost`` hook), and nothing may reach the loop's exception handler. The
figures are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import os
import random
import socket
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import h11
from _faults import LINGER_ZERO

from aiograceful import CloseOutcome, GracefulServer
from aiograceful._linger import Linger

SOAK_SECONDS = float(os.environ.get("AIOGRACEFUL_SOAK_SECONDS", "24"))
CONCURRENCY = 48
MAX_CONNECTIONS = 40  # below CONCURRENCY: some connections meet the limit's 503
MAX_BODY = 64 * 1024
IDLE_TIMEOUT = 1.0
GRACE = 2.0
# No session waits longer than this for anything (a bound, not an expectation).
STEP = 15.0

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

WELL_BEHAVED = {"keepalive": 6, "upload-too-large": 1}
MISBEHAVING = {
    "rst-mid-head": 1,
    "rst-mid-body": 1,
    "half-close-mid-head": 1,
    "silent": 1,
    "flood-and-leave": 1,
    "pipeline-and-rst": 1,
    "never-fin": 1,
}


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak_http_example", EXAMPLES / "http_server.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


http_example = _load_example()


class Lost(Exception):
    """A well-behaved request got no response."""


class Retry(Exception):
    """The reused connection ended before any byte of the response: HTTP says retry."""


# -- what the server saw ----------------------------------------------------------------


class ServerSide:
    """Records, per client port, the typed outcome of every connection the server ended."""

    def __init__(self, server: GracefulServer) -> None:
        self.by_port: dict[int, list[CloseOutcome]] = collections.defaultdict(list)
        self.ports: dict[Linger, int] = {}
        registry = server._registry
        attach: Callable[[Any], None] = registry.attach
        detach: Callable[[Linger], None] = registry.detach

        def on_attach(conn: Any) -> None:
            self._note(conn.ending.linger)
            attach(conn)

        def on_detach(linger: Linger) -> None:
            self._record(linger)
            detach(linger)

        # Instance attributes: attach sets ``linger.on_lost = self.detach``.
        registry.attach = on_attach  # type: ignore[method-assign]
        registry.detach = on_detach  # type: ignore[method-assign]
        side = self

        class Rejected(set[Linger]):
            """The server's set of rejected connections, observed."""

            def add(self, graceful: Linger) -> None:
                side._note(graceful)
                super().add(graceful)

            def discard(self, graceful: object) -> None:  # set.discard takes any object
                assert isinstance(graceful, Linger)
                side._record(graceful)
                super().discard(graceful)

        registry.rejected_live = Rejected(registry.rejected_live)

    def _note(self, graceful: Linger) -> None:
        # uvloop has no peername for a connection reset before connection_made
        # (getpeername fails): such a connection is counted under port 0.
        peer = graceful.transport.get_extra_info("peername")
        self.ports[graceful] = 0 if peer is None else peer[1]

    def _record(self, graceful: Linger) -> None:
        port = self.ports.pop(graceful, None)
        assert port is not None, "a connection ended that was never seen starting"
        assert graceful.result is not None, "connection_lost ran without a result"
        self.by_port[port].append(graceful.result.outcome)


# -- the clients ---------------------------------------------------------------------------


class Session:
    """One client connection (with h11 on the client side)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.h11 = h11.Connection(h11.CLIENT)
        self.local_port = 0

    async def open(self, kind: str, ports: dict[int, list[str]]) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), STEP
        )
        self.reader, self.writer = reader, writer
        self.local_port = writer.get_extra_info("sockname")[1]
        ports[self.local_port].append(kind)

    def send(self, *events: h11.Event) -> None:
        assert self.writer is not None
        for event in events:
            data = self.h11.send(event)
            if data:
                self.writer.write(data)

    async def response(self) -> tuple[int, bytes, bool]:
        """Read one response: (status, body, whether any byte of it came)."""
        assert self.reader is not None
        status, body, started = 0, bytearray(), False
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await asyncio.wait_for(self.reader.read(65536), STEP)
                except (ConnectionError, TimeoutError) as exc:
                    raise Lost(f"{type(exc).__name__} while waiting for a response") from exc
                if data:
                    started = True
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(body), started
            elif isinstance(event, h11.ConnectionClosed):
                if status == 0 and not started:
                    raise Retry
                raise Lost("the connection ended in the middle of a response")

    def reset(self) -> None:
        """RST now: SO_LINGER {1, 0}, then abort."""
        if self.writer is None:
            return
        with contextlib.suppress(OSError):
            self.writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO
            )
        self.writer.transport.abort()

    async def close_after_server(self) -> None:
        """Wait (bounded) for the server to close first, then close."""
        assert self.reader is not None
        with contextlib.suppress(OSError, TimeoutError):
            while await asyncio.wait_for(self.reader.read(65536), STEP):
                pass
        await self.close()

    async def close(self) -> None:
        """Our FIN, then read until the server's, then close (bounded)."""
        writer, reader = self.writer, self.reader
        if writer is None or reader is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            if not writer.is_closing():
                writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError):
            while await asyncio.wait_for(reader.read(65536), STEP):
                pass
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _request(method: bytes, body: bytes = b"") -> list[h11.Event]:
    headers = [(b"Host", b"soak")]
    events: list[h11.Event] = []
    if method == b"POST":
        headers.append((b"Content-Length", b"%d" % len(body)))
    events.append(h11.Request(method=method, target=b"/", headers=headers))
    if body:
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    return events


class Figures:
    """What the soak counted."""

    def __init__(self) -> None:
        self.sessions: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.replies: collections.Counter[int] = collections.Counter()
        self.lost: list[str] = []
        self.retried = 0
        self.refused_after_shutdown = 0
        self.faults: collections.Counter[str] = collections.Counter()
        # Client port -> the kinds of the sessions that used it, in order.
        self.ports: dict[int, list[str]] = collections.defaultdict(list)


async def well_behaved(kind: str, port: int, rng: random.Random, fig: Figures, server: Any) -> None:
    """Requests whose every response must arrive."""
    if kind == "keepalive":
        work = [
            (b"POST", b"p" * rng.randrange(1, 8192)) if rng.random() < 0.4 else (b"GET", b"")
            for _ in range(rng.randrange(1, 5))
        ]
    else:
        work = [(b"POST", b"u" * (4 * MAX_BODY))]
    session: Session | None = None
    reused = False
    try:
        while work:
            if session is None:
                session = Session(port)
                try:
                    await session.open(kind, fig.ports)
                except ConnectionRefusedError:
                    if server.notice.is_set():
                        fig.refused_after_shutdown += 1
                        return
                    raise
                reused = False
            method, body = work[0]
            session.send(*_request(method, body))
            fig.requests += 1
            try:
                status, got, _ = await session.response()
            except Retry:
                fig.requests -= 1  # not processed; sent again below
                if not reused:
                    raise Lost("a new connection ended without a response") from None
                fig.retried += 1
                await session.close()
                session = None
                continue
            fig.replies[status] += 1
            work.pop(0)
            expected = {b"GET": b"hello\n", b"POST": b"received %d bytes\n" % len(body)}[method]
            if status == 200:
                assert got == expected, (got, expected)
            elif status in (413, 503):
                assert status != 413 or len(body) > MAX_BODY
                work.clear()  # the connection closes after these
            else:
                raise AssertionError(f"unexpected status {status}")
            if session.h11.our_state is h11.MUST_CLOSE or session.h11.their_state is h11.MUST_CLOSE:
                await session.close()
                session = None
            else:
                session.h11.start_next_cycle()
                reused = True
    except Lost as exc:
        fig.lost.append(f"{kind}: {exc}")
    finally:
        if session is not None:
            await session.close()


async def misbehaving(kind: str, port: int, rng: random.Random, fig: Figures, server: Any) -> None:
    """A client that breaks the rules; only its bound matters to it."""
    session = Session(port)
    try:
        await session.open(kind, fig.ports)
    except ConnectionRefusedError:
        if server.notice.is_set():
            fig.refused_after_shutdown += 1
            return
        raise
    writer = session.writer
    reader = session.reader
    assert writer is not None
    assert reader is not None
    fig.faults[kind] += 1
    head = b"POST / HTTP/1.1\r\nHost: soak\r\nContent-Length: 10000\r\n"
    try:
        if kind == "rst-mid-head":
            writer.write(head[: rng.randrange(1, len(head))])
            await asyncio.sleep(rng.random() * 0.05)
            session.reset()
        elif kind == "rst-mid-body":
            writer.write(head + b"\r\n" + b"b" * 3000)
            await asyncio.sleep(rng.random() * 0.05)
            session.reset()
        elif kind == "half-close-mid-head":
            writer.write(head[: rng.randrange(1, len(head))])
            await session.close()
        elif kind == "silent":
            # Sends nothing; the server's idle timeout closes it, we answer its FIN.
            await session.close_after_server()
        elif kind == "flood-and-leave":
            big = 8 * MAX_BODY
            writer.write(b"POST / HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n" % big)
            writer.write(b"f" * big)
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.drain(), 2.0)
            writer.close()  # the 413 is unread: our kernel sends a RST
        elif kind == "pipeline-and-rst":
            writer.write(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n" * rng.randrange(2, 8))
            await asyncio.sleep(rng.random() * 0.05)
            session.reset()
        elif kind == "never-fin":
            session.send(*_request(b"GET"))
            with contextlib.suppress(Lost, Retry):
                await session.response()
            # Holds the connection without a FIN and without reading, for
            # longer than the server's idle timeout, then resets.
            await asyncio.sleep(IDLE_TIMEOUT + rng.random() * 2.0)
            session.reset()
    except OSError:
        pass
    finally:
        if not writer.is_closing():
            session.reset()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# -- the soak ---------------------------------------------------------------------------------


async def test_http_example_soak_mixed_clients_lose_nothing() -> None:
    """Mixed clients for a while, then a shutdown: 0 lost replies, every connection typed."""
    loop = asyncio.get_running_loop()
    loop_name = type(loop).__module__.split(".")[0]
    rng = random.Random(f"aiograceful-soak-{loop_name}")
    server = await http_example.serve(
        "127.0.0.1",
        0,
        max_body=MAX_BODY,
        max_connections=MAX_CONNECTIONS,
        idle_timeout=IDLE_TIMEOUT,
        grace=GRACE,
    )
    seen = ServerSide(server)
    port = server.sockets[0].getsockname()[1]
    fig = Figures()
    kinds = {**WELL_BEHAVED, **MISBEHAVING}
    names, weights = list(kinds), list(kinds.values())
    slots = asyncio.Semaphore(CONCURRENCY)
    tasks: set[asyncio.Task[None]] = set()

    def release(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        slots.release()

    end = loop.time() + SOAK_SECONDS / 2
    try:
        while loop.time() < end:
            await slots.acquire()
            kind = rng.choices(names, weights)[0]
            fig.sessions[kind] += 1
            run = well_behaved if kind in WELL_BEHAVED else misbehaving
            seed = rng.random()
            task = loop.create_task(run(kind, port, random.Random(seed), fig, server))
            tasks.add(task)
            task.add_done_callback(release)
        # The shutdown comes while sessions are in flight.
        report = await asyncio.wait_for(server.shutdown(), GRACE + 10.0)
        if tasks:
            done, pending = await asyncio.wait(set(tasks), timeout=2 * STEP)
            assert not pending, f"{len(pending)} client sessions did not end"
            for task in done:
                task.result()  # a client bug would surface here
    finally:
        await server.shutdown()
        for task in set(tasks):
            task.cancel()

    # Every connection a client made was seen by the server and ended typed.
    # A client port is reused only once its previous connection is gone, so
    # per port the client's sessions and the server's outcomes pair up in order.
    assert not seen.ports, f"{len(seen.ports)} connections never ended"
    unknown = len(seen.by_port.pop(0, []))
    assert not set(seen.by_port) - set(fig.ports), "the server saw connections no client made"
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    unmatched = 0
    for client_port, session_kinds in fig.ports.items():
        ended = seen.by_port.get(client_port, [])
        assert len(ended) <= len(session_kinds)
        unmatched += len(session_kinds) - len(ended)
        for kind, outcome in zip(session_kinds, ended, strict=False):
            outcomes[kind][outcome.name] += 1
    assert unmatched == unknown, (
        f"{unmatched} connections without a typed outcome ({unknown} unattributed)"
    )
    connections = sum(len(k) for k in fig.ports.values())

    total = sum(fig.sessions.values())
    print(
        f"\n[{loop_name}] soak {SOAK_SECONDS / 2:.0f} s: {total} sessions, "
        f"{connections} connections, {fig.requests} well-behaved requests, "
        f"replies {dict(fig.replies)}, lost {len(fig.lost)}, retried {fig.retried}, "
        f"refused after shutdown {fig.refused_after_shutdown}, "
        f"reset before the server saw their address {unknown}"
    )
    print(f"[{loop_name}] faults injected: {dict(fig.faults)}")
    for kind in kinds:
        print(f"[{loop_name}]   {kind}: {dict(outcomes.get(kind, {}))}")
    print(
        f"[{loop_name}] shutdown: {report.connections} connections, {report.closed_clean} "
        f"closed within grace, {report.forced} forced, drained {report.drained}, "
        f"rejected over the limit {report.rejected}, {report.duration:.2f} s"
    )

    assert not fig.lost, f"{len(fig.lost)} lost replies: {fig.lost[:5]}"
    assert sum(fig.replies.values()) == fig.requests
    assert fig.requests > 0
    assert sum(fig.faults.values()) > 0
