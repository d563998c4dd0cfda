"""Listener handoff and inherited sockets: a successor takes the listening sockets, nothing lost.

In-process cases run both servers on one loop (the successor takes its
sockets in a thread), over real Unix and TCP sockets on loopback; the
process-level load tests are in test_restarts.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from _util import port_of

from aiograceful import GracefulServer, listen_fds, start_server
from aiograceful._handoff import check_handoff, take_listeners

HOST = "127.0.0.1"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def tagged(tag: bytes) -> Handler:
    """A handler answering one line with ``tag`` and the line."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(tag + b" " + line)

    return handler


async def ask(port: int, line: bytes = b"hi\n") -> bytes:
    """One connection: send ``line``, read the answer to EOF."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(line)
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def start(tag: bytes, path: Path, port: int | None = 0, **kw: object) -> GracefulServer:
    host = HOST if port is not None else None
    return await start_server(tagged(tag), host, port, handoff=path, grace=2.0, **kw)  # type: ignore[arg-type]


async def handed_over(server: GracefulServer) -> None:
    """Wait (bounded) until ``server``'s shutdown, begun by a handoff, is done."""
    async with asyncio.timeout(5):
        await server.notice.wait()
        await server.shutdown()
    assert server.handed_off


# -- the handoff -------------------------------------------------------------------------


async def test_handoff_successor_takes_the_listener_and_predecessor_stops(tmp_path: Path) -> None:
    """B takes A's listening socket (same port, same kernel socket); A shuts down; B answers."""
    path = tmp_path / "h.sock"
    a = await start(b"A", path)
    port = port_of(a)
    assert await ask(port) == b"A hi\n"
    # A connection A accepted before the handoff is still answered by A.
    reader, writer = await asyncio.open_connection(HOST, port)
    await asyncio.sleep(0.05)
    serving = asyncio.ensure_future(a.serve_forever())
    b = await start(b"B", path)
    try:
        assert port_of(b) == port
        writer.write(b"late\n")
        async with asyncio.timeout(5):
            assert await reader.read() == b"A late\n"
            writer.close()
            await serving  # A's serve_forever returns once its shutdown is done
        assert a.handed_off
        assert not a.is_serving()
        assert not b.handed_off
        assert b.is_serving()
        assert await ask(port) == b"B hi\n"
        # PATH is B's offer now, mode 0600.
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        writer.close()
        await b.shutdown()
    assert not path.exists()  # withdrawn at a plain shutdown


async def test_handoff_queued_connections_are_the_successors(tmp_path: Path) -> None:
    """Connections queued (never accepted) on A when it hands off are accepted by B, not reset."""
    path = tmp_path / "h.sock"
    # A listens and accepts nothing: every connection stays queued.
    a = await start(b"A", path, None, sock=socket.create_server((HOST, 0)), start_serving=False)
    port = port_of(a)
    clients = [socket.create_connection((HOST, port), timeout=5) for _ in range(5)]
    for c in clients:
        c.sendall(b"queued\n")
    b = await start(b"B", path)
    try:
        await handed_over(a)
        assert a.handed_off
        for c in clients:
            data = await asyncio.to_thread(c.recv, 100)
            assert data == b"B queued\n"
    finally:
        for c in clients:
            c.close()
        await b.shutdown()


async def test_handoff_stale_path_binds_normally_and_takes_the_path(tmp_path: Path) -> None:
    """A socket file nobody listens on (a crashed server's) is replaced: bind, then offer."""
    path = tmp_path / "h.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(ConnectionRefusedError), socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(path))
    a = await start(b"A", path)
    try:
        assert await ask(port_of(a)) == b"A hi\n"
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))  # PATH is A's offer now
    finally:
        await a.shutdown()


async def test_handoff_path_that_is_not_a_socket_is_refused_untouched(tmp_path: Path) -> None:
    """A regular file at PATH: ValueError naming handoff, nothing bound, the file intact."""
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match="handoff"):
        await start(b"A", path, port)
    assert path.read_text() == "keep me"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=1).close()


def test_handoff_argument_checks(tmp_path: Path) -> None:
    """Wrong type, empty, missing directory, too long: TypeError/ValueError naming handoff."""
    with pytest.raises(TypeError, match="handoff"):
        check_handoff(3)
    with pytest.raises(ValueError, match="handoff"):
        check_handoff("")
    with pytest.raises(ValueError, match="handoff"):
        check_handoff(tmp_path / "missing" / "h.sock")
    with pytest.raises(ValueError, match="handoff"):
        check_handoff(tmp_path / ("x" * 120))
    assert check_handoff(None) is None
    assert check_handoff(tmp_path / "h.sock") == str(tmp_path / "h.sock")


def fake_successor(path: Path, *, rename_own_offer: bool) -> int:
    """Take the sockets at ``path`` like a successor, then die before the ack; how many came."""
    chan = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    chan.settimeout(5)
    chan.connect(str(path))
    _data, fds, _flags, _ = socket.recv_fds(chan, 65536, 16)
    if rename_own_offer:
        # As a real successor does before its ack: its own offer over PATH.
        own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        own.bind(str(path) + ".fake")
        own.listen()
        os.rename(str(path) + ".fake", path)
        own.close()  # ...and it dies: PATH is stale
    for fd in fds:
        os.close(fd)
    chan.close()
    return len(fds)


@pytest.mark.parametrize("rename_own_offer", [False, True])
async def test_handoff_successor_dying_midway_leaves_the_predecessor_serving(
    tmp_path: Path, rename_own_offer: bool
) -> None:
    """A successor that takes the sockets and dies before its ack: A serves on, offers again."""
    path = tmp_path / "h.sock"
    a = await start(b"A", path)
    try:
        port = port_of(a)
        assert await asyncio.to_thread(fake_successor, path, rename_own_offer=rename_own_offer) == 1
        await asyncio.sleep(0.1)
        # One tuple: after `assert not a.handed_off`, mypy would take it as False for good.
        assert (a.handed_off, a.is_serving()) == (False, True)
        assert await ask(port) == b"A hi\n"  # not reset by the dead one's close
        # PATH leads to A again (offered anew if the dead one had replaced it).
        b = await start(b"B", path)
        try:
            assert port_of(b) == port
            await handed_over(a)
            assert a.handed_off
            assert await ask(port) == b"B hi\n"
        finally:
            await b.shutdown()
    finally:
        await a.shutdown()


async def test_handoff_two_successors_at_once_make_a_chain(tmp_path: Path) -> None:
    """B and C start together: one takes from A, the other from it; one server is left serving."""
    path = tmp_path / "h.sock"
    a = await start(b"A", path)
    port = port_of(a)
    b, c = await asyncio.gather(start(b"B", path), start(b"C", path))
    try:
        assert port_of(b) == port_of(c) == port
        await handed_over(a)
        for _ in range(200):
            if b.handed_off or c.handed_off:
                break
            await asyncio.sleep(0.01)
        assert a.handed_off
        assert [b.handed_off, c.handed_off].count(True) == 1
        last = c if b.handed_off else b
        assert last.is_serving()
        answer = await ask(port)
        assert answer == (b"C hi\n" if last is c else b"B hi\n")
    finally:
        await b.shutdown()
        await c.shutdown()


async def test_handoff_port_mismatch_fails_the_successor_not_the_predecessor(
    tmp_path: Path,
) -> None:
    """A successor asked for another port refuses the sockets (ValueError); A serves on."""
    path = tmp_path / "h.sock"
    a = await start(b"A", path)
    try:
        other = port_of(a) + 1 if port_of(a) < 65535 else port_of(a) - 1
        with pytest.raises(ValueError, match="handoff"):
            await start(b"B", path, other)
        await asyncio.sleep(0.1)
        assert not a.handed_off
        assert await ask(port_of(a)) == b"A hi\n"
    finally:
        await a.shutdown()


async def test_handoff_shutdown_without_successor_drains_as_usual(tmp_path: Path) -> None:
    """A plain shutdown of a server offering a handoff withdraws the offer and drains its queue."""
    path = tmp_path / "h.sock"
    a = await start(b"A", path, None, sock=socket.create_server((HOST, 0)), start_serving=False)
    c = socket.create_connection((HOST, port_of(a)), timeout=5)
    c.sendall(b"queued\n")
    shutdown = asyncio.ensure_future(a.shutdown())
    try:
        assert await asyncio.to_thread(c.recv, 100) == b"A queued\n"
        c.close()
        report = await shutdown
        assert report.drained == 1
        assert not path.exists()
        assert await asyncio.to_thread(take_listeners, str(path), 1.0) is None
    finally:
        c.close()


async def test_handoff_stalled_successor_holds_neither_the_shutdown_nor_a_client(
    tmp_path: Path,
) -> None:
    """A successor that takes the sockets and never acks: A ends within its grace, then refuses."""
    path = tmp_path / "h.sock"
    a = await start(b"A", path)  # grace 2 s, force_timeout 1 s (the default)
    port = port_of(a)
    # The module's own taking function; no ack follows: it holds A's listener and stalls.
    taken = await asyncio.to_thread(take_listeners, str(path), 5.0)
    assert taken is not None
    try:
        shutdown = asyncio.ensure_future(a.shutdown())
        await asyncio.sleep(0.2)
        assert await ask(port) == b"A hi\n"  # A serves on while it waits for the ack
        async with asyncio.timeout(2.0 + 1.0 + 3.0):  # grace + force_timeout + a few
            report = await shutdown
        assert (a.handed_off, a.is_serving(), report.forced) == (False, False, 0)
        # The listener the stalled successor still holds no longer queues anyone.
        async with asyncio.timeout(1.0):
            with pytest.raises(ConnectionRefusedError):
                await ask(port)
    finally:
        taken.abandon()


# -- permissions: only the same user takes over ---------------------------------------------

_NOBODY = 65534
_RAW_CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(sys.argv[1])
    except OSError as exc:
        print(json.dumps({"connect": type(exc).__name__}))
        raise SystemExit
    data, fds, _, _ = socket.recv_fds(s, 65536, 16)
    print(json.dumps({"connect": "ok", "fds": len(fds), "data": len(data)}))
    """
)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is under a 0700 one)."""
    with tempfile.TemporaryDirectory(prefix="aiog-", dir="/tmp") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def _write(script: Path, text: str) -> None:
    """Write a child's script, readable by every user."""
    with open(script, "w") as f:
        f.write(text)
    os.chmod(script, 0o644)


def _python_for_nobody() -> str | None:
    for candidate in ("/usr/bin/python3", sys.executable):
        probe = subprocess.run(
            [candidate, "-c", "pass"], user=_NOBODY, capture_output=True, check=False, timeout=30
        )
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run a client as another user")
async def test_handoff_other_user_gets_no_sockets(public_dir: Path) -> None:
    """Mode 0600 refuses another user's connect; with the mode opened, SO_PEERCRED refuses it."""
    python = await asyncio.to_thread(_python_for_nobody)
    if python is None:
        pytest.skip("no Python the nobody user may run")
    path = public_dir / "h.sock"
    script = public_dir / "client.py"
    _write(script, _RAW_CLIENT)
    a = await start(b"A", path)

    def as_nobody() -> dict[str, object]:
        out = subprocess.run(
            [python, str(script), str(path)],
            user=_NOBODY,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return dict(json.loads(out.stdout))

    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert await asyncio.to_thread(as_nobody) == {"connect": "PermissionError"}
        os.chmod(path, 0o666)  # as if someone opened it up: the credentials check still holds
        assert await asyncio.to_thread(as_nobody) == {"connect": "ok", "fds": 0, "data": 0}
        assert not a.handed_off
        assert a.is_serving()
    finally:
        await a.shutdown()


# -- listen_fds: systemd socket activation ---------------------------------------------------

_ACTIVATED_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import aiograceful

    async def answer(reader, writer):
        await reader.readline()
        writer.write(b"activated\\n")

    async def main():
        socks = aiograceful.listen_fds()
        server = await aiograceful.start_server(answer, sock=socks[0], grace=1.0)
        print("READY", len(socks), flush=True)
        await server.serve_forever()
        print("DONE", server.stats.closed, flush=True)

    if sys.argv[1] == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.SelectorEventLoop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    """
)


_ROOT = str(Path(__file__).resolve().parent.parent)


# What systemd does between fork and exec: the socket to descriptor 3, LISTEN_FDS,
# and LISTEN_PID set to the service's own pid (exec keeps it).
_SUPERVISOR = textwrap.dedent(
    """
    import os, sys
    fd = int(sys.argv[1])
    os.dup2(fd, 3)
    os.close(fd)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
    """
)


def _activate(script: Path, fd: int) -> subprocess.Popen[str]:
    """Run the child with ``fd`` as its socket-activated descriptor 3."""
    _write(script, _ACTIVATED_CHILD)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-c", _SUPERVISOR, str(fd), str(script), _loop_name()],
        pass_fds=[fd],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _loop_name() -> str:
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


async def test_listen_fds_serves_the_socket_systemd_passes(tmp_path: Path) -> None:
    """A child given fd 3, LISTEN_FDS=1 and its own LISTEN_PID serves on it, as under systemd."""
    listener = socket.create_server((HOST, 0))
    port = listener.getsockname()[1]
    # Connected before the service even runs: it waits in the queue the supervisor holds.
    early = socket.create_connection((HOST, port), timeout=10)
    early.sendall(b"early\n")
    proc = _activate(tmp_path / "child.py", listener.fileno())
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.split() == ["READY", "1"]
        listener.close()  # the parent's copy: the child's keeps the socket listening
        assert await asyncio.to_thread(early.recv, 100) == b"activated\n"
        assert await ask(port) == b"activated\n"
        proc.terminate()
        rest = await asyncio.wait_for(asyncio.to_thread(proc.stdout.read), 20)
        assert rest.split() == ["DONE", "2"]
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        early.close()
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_listen_fds_not_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variables, or LISTEN_PID of another process: no sockets, and the variables go."""
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert listen_fds() == []
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert "LISTEN_PID" not in os.environ
    assert "LISTEN_FDS" not in os.environ


def test_listen_fds_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Malformed variables raise ValueError naming the variable."""
    monkeypatch.setenv("LISTEN_PID", "x")
    monkeypatch.setenv("LISTEN_FDS", "1")
    with pytest.raises(ValueError, match="LISTEN_PID"):
        listen_fds()
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "-1")
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        listen_fds(unset_environment=False)
    monkeypatch.setenv("LISTEN_FDS", "one")
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        listen_fds()


@contextlib.contextmanager
def _descriptors(*wanted: socket.socket | None) -> Iterator[None]:
    """Make descriptors 3, 4, ... ``wanted`` (a socket's dup, or closed for None); then restore."""
    saved: list[tuple[int, int | None, bool]] = []
    try:
        for fd, sock in enumerate(wanted, start=3):
            try:
                saved.append((fd, os.dup(fd), os.get_inheritable(fd)))
            except OSError:
                saved.append((fd, None, False))
            if sock is None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            else:
                os.dup2(sock.fileno(), fd, inheritable=True)
        yield
    finally:
        for fd, copy, inheritable in saved:
            if copy is None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            else:
                os.dup2(copy, fd, inheritable=inheritable)
                os.close(copy)


def test_listen_fds_closed_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed descriptor in LISTEN_FDS: ValueError naming both; the open ones untouched."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    with socket.create_server((HOST, 0)) as listener, _descriptors(listener, None):
        with pytest.raises(ValueError, match="LISTEN_FDS: descriptor 4 is not open") as info:
            listen_fds()
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.EBADF
        # Checked before anything was touched: descriptor 3 is still inheritable.
        assert os.get_inheritable(3)
        assert "LISTEN_FDS" not in os.environ  # unset all the same, as sd_listen_fds does


async def test_handoff_during_drain_delay_ends_it_at_once(tmp_path: Path) -> None:
    """A successor taking over during drain_delay ends the delay: no drain, the shutdown goes on."""
    path = tmp_path / "h.sock"
    a = await start(b"A", path, drain_delay=30.0)
    port = port_of(a)
    shutdown = asyncio.ensure_future(a.shutdown())
    await asyncio.sleep(0.05)
    assert a.notice.is_set()
    assert await ask(port) == b"A hi\n"  # still accepting during the delay
    b = await start(b"B", path)
    try:
        async with asyncio.timeout(5):  # far less than the 30 s delay
            report = await shutdown
        assert a.handed_off
        assert report.drained == 0
        assert await ask(port) == b"B hi\n"
    finally:
        shutdown.cancel()
        await b.shutdown()
