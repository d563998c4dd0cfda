"""What a worker leaving its SO_REUSEPORT group does to its queue; run inside a network namespace.

``python tests/_reuseport_probe.py`` prints one JSON object. It writes
``net.ipv4.tcp_migrate_req`` (a per-namespace sysctl), so run it only in a
namespace made for it (test_reuseport.py does: ``ip netns exec``).

* ``raw``: two listeners A and B in one group on 127.0.0.1; clients connect
  (the kernel hashes them onto A's or B's queue) and send a byte; B's queue
  is accepted dry; a thread waits in ``epoll_wait`` on B; A is closed with
  its queue full. Counted: A's queue, clients reset, connections B accepts
  afterwards, and whether B's waiter woke (the kernel calls B's
  ``sk_data_ready`` after migrating: "tcp: call sk_data_ready() after
  listener migration"; without it, a worker asleep in epoll does not learn
  of the migrated connections until another one arrives).
* ``graceful``: the same, A being an aiograceful server that never accepted
  (``start_serving=False``): its shutdown drains the queue first.
* ``load``: two aiograceful workers on one port, clients making new
  connections back to back; one worker shuts down in the middle. Counted:
  requests failed, by type, over several rounds.

``python tests/_reuseport_probe.py leave ROUNDS [LEAVERS]`` prints another,
``leave``: worker processes (``WORKERS``, each ``python
tests/_reuseport_probe.py worker``: an aiograceful server with
``reuse_port=True`` spending ``WORK_S`` of CPU per request) and
``LEAVE_CLIENTS`` client threads making a new connection per request; one
worker (or ``LEAVERS`` at once) is SIGTERMed in the middle of each round.
Counted: requests answered, failed (by type), and delayed past
``DELAYED_S`` (a SYN dropped and retransmitted a second later), with the
worker's SYN filter only (``steer`` 0: the fallback) and with its group
steering new connections to a sibling first (``steer`` 1), rounds
alternating. tcp_migrate_req is left off.
"""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiograceful import start_server
from aiograceful._socket import TCPI_UNACKED, tcp_info_u32
from aiograceful._tools.demo import available_loops
from aiograceful._tools.restart import REQUEST, Load, _answer

HOST = "127.0.0.1"
CLIENTS = 64
_MIGRATE = "/proc/sys/net/ipv4/tcp_migrate_req"


def _set_migrate(value: int) -> None:
    with open(_MIGRATE, "w") as f:
        f.write(str(value))


def _listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    sock.listen(1024)
    return sock


def _queue(sock: socket.socket) -> int:
    info = tcp_info_u32(sock, TCPI_UNACKED)
    return -1 if info is None else info[0]


def _accept_all(sock: socket.socket) -> list[socket.socket]:
    sock.setblocking(False)
    got = []
    for _ in range(10_000):
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            break
        got.append(conn)
    return got


def _clients(port: int) -> list[socket.socket]:
    clients = []
    for _ in range(CLIENTS):
        c = socket.create_connection((HOST, port), timeout=5)
        c.sendall(REQUEST)
        clients.append(c)
    return clients


def _resets(clients: list[socket.socket]) -> int:
    time.sleep(0.2)
    count = 0
    for c in clients:
        c.setblocking(False)
        try:
            c.recv(10)
        except ConnectionResetError:
            count += 1
        except BlockingIOError:
            pass
    return count


def _waiter(sock: socket.socket, woke: list[float]) -> threading.Thread:
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN)

    def wait() -> None:
        started = time.monotonic()
        events = ep.poll(1.0)
        woke.append(time.monotonic() - started if events else -1.0)
        ep.close()

    thread = threading.Thread(target=wait)
    thread.start()
    return thread


def raw(migrate: int) -> dict[str, Any]:
    _set_migrate(migrate)
    a = _listener(0)
    port = a.getsockname()[1]
    b = _listener(port)
    clients = _clients(port)
    on_a = _queue(a)
    early = _accept_all(b)  # B's own share: its queue is now empty
    woke: list[float] = []
    thread = _waiter(b, woke)
    time.sleep(0.1)  # the waiter is in epoll_wait
    a.close()
    thread.join(5)
    late = _accept_all(b)
    reset = _resets(clients)
    for s in [*clients, *early, *late, b]:
        s.close()
    return {
        "migrate": migrate,
        "queued_on_closed": on_a,
        "reset": reset,
        "accepted_by_other_after": len(late),
        "other_woke_after_s": woke[0] if woke else None,
    }


async def _graceful(migrate: int) -> dict[str, Any]:
    _set_migrate(migrate)
    a_sock = _listener(0)
    port = a_sock.getsockname()[1]
    b = _listener(port)
    a = await start_server(_answer, sock=a_sock, start_serving=False, grace=2.0)
    clients = await asyncio.to_thread(_clients, port)
    on_a = _queue(a_sock)
    early = _accept_all(b)
    shutdown = asyncio.ensure_future(a.shutdown())
    seen = await asyncio.to_thread(_replies, clients, on_a)
    report = await shutdown
    late = _accept_all(b)
    for s in [*early, *late, b]:
        s.close()
    return {
        "migrate": migrate,
        "queued_on_closed": on_a,
        "drained": report.drained,
        "answered": seen.get("answered", 0),
        "reset": seen.get("ConnectionResetError", 0),
        "accepted_by_other_after": len(late),
    }


def _replies(clients: list[socket.socket], expect: int, within: float = 2.0) -> dict[str, int]:
    """Read every client's reply to EOF (all at once, bounded); count answers and errors by name.

    Stops once ``expect`` connections have ended. Clients whose connection sits
    on the other listener get no answer (it never serves them): "no answer".
    """
    seen: dict[str, int] = {}
    data = dict.fromkeys(clients, b"")
    for c in clients:
        c.setblocking(False)
    open_ = set(clients)
    deadline = time.monotonic() + within
    while len(clients) - len(open_) < expect and time.monotonic() < deadline:
        readable, _, _ = select.select(list(open_), [], [], max(0.0, deadline - time.monotonic()))
        for c in readable:
            try:
                chunk = c.recv(4096)
            except OSError as exc:
                key = type(exc).__name__
            else:
                if chunk:
                    data[c] += chunk
                    continue
                key = "answered" if data[c].startswith(b"HTTP/1.0 200") else "no answer"
            seen[key] = seen.get(key, 0) + 1
            open_.discard(c)
    seen["no answer"] = seen.get("no answer", 0) + len(open_)
    for c in clients:
        c.close()
    return seen


async def _load(migrate: int, rounds: int) -> dict[str, Any]:
    _set_migrate(migrate)
    failed: dict[str, int] = {}
    bad_replies: list[str] = []
    ok = 0
    for _ in range(rounds):
        a = await start_server(_answer, HOST, 0, reuse_port=True, grace=2.0)
        port = a.sockets[0].getsockname()[1]
        b = await start_server(_answer, HOST, port, reuse_port=True, grace=2.0)
        load = Load(port, threads=4).start()
        await asyncio.sleep(0.3)
        await a.shutdown()
        await asyncio.sleep(0.3)
        result = await asyncio.to_thread(load.stop)
        await b.shutdown()
        ok += result.ok
        for name, count in result.failed.items():
            failed[name] = failed.get(name, 0) + count
        bad_replies += [repr(reply) for reply in result.bad_replies]
    return {
        "migrate": migrate,
        "rounds": rounds,
        "ok": ok,
        "failed": failed,
        "bad_replies": bad_replies,
    }


WORKERS = 3
WORK_S = 0.002
LEAVE_CLIENTS = 24
DELAYED_S = 0.9
ROUND_S = 1.6


async def _worker(port: int, steer: bool) -> None:
    """One worker: ``200`` after ``WORK_S`` of CPU per request, until SIGTERM."""
    import aiograceful._accept

    aiograceful._accept.STEER_REUSEPORT = steer

    async def work(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        until = time.process_time() + WORK_S
        while time.process_time() < until:
            pass
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    server = await start_server(work, HOST, port, reuse_port=True, grace=2.0)
    print("READY", flush=True)
    await server.serve_forever()


class _Timed:
    """``LEAVE_CLIENTS`` threads, a new connection per request; latencies and failures."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port = port
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.ok = 0
        self.delayed: list[float] = []
        self.failed: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._run) for _ in range(LEAVE_CLIENTS)]

    def _run(self) -> None:
        for _ in range(100_000):
            if time.monotonic() > self.deadline:
                return
            started = time.monotonic()
            try:
                with socket.create_connection((HOST, self.port), timeout=5) as c:
                    c.sendall(REQUEST)
                    reply = b""
                    for _n in range(16):
                        chunk = c.recv(4096)
                        if not chunk:
                            break
                        reply += chunk
                key = "ok" if reply.endswith(b"ok") else "bad reply"
            except OSError as exc:
                key = type(exc).__name__
            took = time.monotonic() - started
            with self.lock:
                if key == "ok":
                    self.ok += 1
                    if took > DELAYED_S:
                        self.delayed.append(round(took, 3))
                else:
                    self.failed[key] = self.failed.get(key, 0) + 1
                    time.sleep(0.001)


def _spawn(port: int, steer: bool, loop: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, __file__, "worker", str(port), str(int(steer)), loop]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    if not ready or not proc.stdout.readline().startswith(b"READY"):
        proc.kill()
        raise RuntimeError("a worker did not start")
    return proc


def leave(rounds: int, leavers: int = 1) -> list[dict[str, Any]]:
    """Rounds of ``WORKERS`` workers, ``leavers`` SIGTERMed at once under load; steer off and
    on, alternating."""
    out: list[dict[str, Any]] = []
    loops = list(available_loops())
    for i in range(2 * rounds):
        steer = bool(i % 2)
        loop = loops[(i // 2) % len(loops)]
        reserve = _listener(0)  # holds the port between rounds of workers
        port = reserve.getsockname()[1]
        reserve.close()
        workers = [_spawn(port, steer, loop) for _ in range(WORKERS)]
        load = _Timed(port, ROUND_S)
        for t in load.threads:
            t.start()
        time.sleep(ROUND_S / 2)
        first = (i // 2) % len(workers)  # each place in the group in turn
        leaving = [workers[(first + n) % len(workers)] for n in range(leavers)]
        for proc in leaving:
            proc.send_signal(signal.SIGTERM)
        code = max(abs(proc.wait(10)) for proc in leaving)
        for t in load.threads:
            t.join(10)
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(5)
            if w.stdout is not None:
                w.stdout.close()
        out.append(
            {
                "steer": int(steer),
                "loop": loop,
                "exit": code,
                "ok": load.ok,
                "failed": load.failed,
                "delayed": len(load.delayed),
                "delayed_s": load.delayed[:5],
            }
        )
    return out


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        port, steer, loop = int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
        factory = available_loops()[loop]
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_worker(port, steer))
        return
    if sys.argv[1:2] == ["leave"]:
        _set_migrate(0)
        leavers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
        print(json.dumps({"leave": leave(int(sys.argv[2]), leavers)}))
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    out: dict[str, Any] = {"raw": [], "graceful": [], "load": []}
    for migrate in (0, 1):
        out["raw"].append(raw(migrate))
        for name, factory in available_loops().items():
            with asyncio.Runner(loop_factory=factory) as runner:
                out["graceful"].append({"loop": name, **runner.run(_graceful(migrate))})
                out["load"].append({"loop": name, **runner.run(_load(migrate, rounds))})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
