"""``python -m aiograceful probe HOST:PORT``: check a server from the outside.

Theory of operation: three checks (the first one three times over HTTP), each
on its own connection to the one address ``HOST:PORT`` resolved to (nothing
else is ever contacted), each bounded in time, each ending in a
:class:`Verdict` with the evidence seen:

1. *early answer* (hazard H1/H2): send a request that announces a large body,
   then the body, the way most clients do (all of it, then read). A server
   that answers early and closes with the body still unread makes Linux send a
   RST; the client's send fails and it never reads the answer. A lingering
   server reads the body away and the answer survives. Over HTTP the request
   is sent three ways: keep-alive, with ``Connection: close``, and as
   HTTP/1.0, since a server may drain the body only when it means to reuse
   the connection (uvicorn does). The probe also peeks
   (``MSG_PEEK``, which consumes nothing) while it sends, to report when the
   answer came.
2. *answer after half-close* (H3): send complete requests, then
   ``shutdown(SHUT_WR)``. The answers are still due: a FIN only says the client
   has nothing more to send. Over HTTP the request goes alone, then with
   :data:`PIPELINED` requests pipelined before the FIN (each
   :data:`HALF_CLOSE_TRIES` times, until one loses an answer), and every one
   must be answered: a server that ends the connection on the client's FIN
   loses the answers it had not written yet. With one request, a fast
   application answers before the server reads the FIN and the hazard
   hides; the pipelined ones outrun any application on most servers (stock
   uvicorn on uvloop loses one of four behind a fast app as behind a slow
   one), but not all (uvicorn's h11 on asyncio's loop stops reading while
   pipelined requests wait, and so never sees the FIN early): a probe cannot
   slow the application down. A control request without the half-close
   first shows the server answers that request at all.
3. *idle close* (H5): connect (over HTTP: make one keep-alive request and
   read its answer, since many servers time out only a connection that has
   served one), then send nothing and wait up to ``wait`` seconds for the
   server to close; a FIN passes, a RST is a hazard, no close at all is
   inconclusive. Stopping or restarting the server during the wait checks its
   shutdown close instead.

Over HTTP the probe makes five checks: the early answer three ways, then the
other two.

Only blocking sockets with timeouts are used; the probe needs no event loop.
"""

from __future__ import annotations

import dataclasses
import re
import select
import socket
import time
from collections.abc import Callable, Sequence
from typing import Final, Literal

__all__ = [
    "DEFAULT_BODY_SIZE",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WAIT",
    "HALF_CLOSE_TRIES",
    "PIPELINED",
    "VARIANTS",
    "ProbeError",
    "Target",
    "Verdict",
    "exit_status",
    "format_report",
    "parse_target",
    "run_probe",
]

#: Bytes of body sent after the request in the early-answer check: more than
#: loopback's socket buffers hold, so a server that stops reading is noticed.
DEFAULT_BODY_SIZE: Final = 16 * 1024 * 1024
#: Seconds of silence (or of no progress) after which a step gives up.
DEFAULT_TIMEOUT: Final = 5.0
#: Seconds the idle-close check waits for the server to close.
DEFAULT_WAIT: Final = 10.0

Status = Literal["pass", "HAZARD", "inconclusive"]
#: How the early-answer request asks for its connection to end. A server may
#: drain the body of a keep-alive request (to reuse the connection) and still
#: close with it unread when the client asked for the close: uvicorn does.
Variant = Literal["keep-alive", "Connection: close", "HTTP/1.0"]
#: The variants an HTTP probe sends, each on its own connection.
VARIANTS: Final[tuple[Variant, ...]] = ("keep-alive", "Connection: close", "HTTP/1.0")
End = Literal["FIN", "RST", "open"]

#: Requests sent pipelined before the FIN in the half-close check (HTTP).
PIPELINED: Final = 4
#: Tries of the half-close check; the first that loses an answer ends it.
HALF_CLOSE_TRIES: Final = 3
_STATUS_LINE: Final = re.compile(rb"(?:^|\n)HTTP/1\.[01] \d{3} ")
_CLOSE_HEADER: Final = re.compile(rb"\r\nconnection: *close\r\n", re.IGNORECASE)

_CHUNK: Final = b"x" * 65536
_RAW_REQUEST: Final = b"PING\r\n"


class ProbeError(Exception):
    """The probe could not run: bad target, or the server cannot be reached."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to probe: the text given, and the one address it resolved to."""

    host: str
    port: int
    family: socket.AddressFamily
    address: tuple[object, ...]

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The result of one check."""

    check: str
    status: Status
    evidence: str


def parse_target(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6); raise ``ValueError`` if malformed."""
    if "://" in text:
        scheme, _, rest = text.partition("://")
        shown = rest.split("/", 1)[0] or "HOST:PORT"
        raise ValueError(
            f"expected HOST:PORT, not a URL: give {shown!r}"
            + (" with --http" if scheme.lower() in ("http", "https") else "")
        )
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, as [{host}]:{port_text}")
    if not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError(f"bad port {port_text!r}: not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}: must be 1..65535")
    return host, port


def resolve(host: str, port: int, timeout: float) -> Target:
    """Resolve ``host`` and connect once to find the address every check will use."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ProbeError(f"cannot resolve {host!r}: {exc.strerror}") from exc
    last: OSError | None = None
    for family, _, _, _, address in infos:
        target = Target(host, port, socket.AddressFamily(family), tuple(address))
        try:
            sock = _connect(target, timeout)
        except OSError as exc:
            last = exc
            continue
        sock.close()
        return target
    reason = _describe(last) if last is not None else "no address"
    shown = f"[{host}]" if ":" in host else host
    raise ProbeError(f"cannot connect to {shown}:{port}: {reason}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _connect(target: Target, timeout: float) -> socket.socket:
    sock = socket.socket(target.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(target.address)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_to_end(sock: socket.socket, timeout: float, limit: int = 1 << 20) -> tuple[bytes, End]:
    """Read until FIN, RST, or ``timeout`` seconds of silence (at most ``4 * timeout`` in all)."""
    deadline = time.monotonic() + 4 * timeout
    data = bytearray()
    while len(data) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(min(timeout, remaining))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), "RST"
        except TimeoutError:
            break
        if not chunk:
            return bytes(data), "FIN"
        data += chunk
    return bytes(data), "open"


def _first_line(data: bytes) -> str:
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    text = line[:80].decode("latin-1")
    return repr(text + ("..." if len(line) > 80 else ""))


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


class _Requests:
    """The bytes each check sends, for HTTP or for a raw protocol."""

    def __init__(self, target: Target, http: bool, path: str, send: bytes | None) -> None:
        self.http = http
        self.path = path
        self.host = str(target) if target.port not in (80, 443) else target.host
        self.raw = send if send is not None else _RAW_REQUEST
        self.prefix = send if send is not None else b""

    def upload_head(self, body_size: int, variant: Variant = "keep-alive") -> bytes:
        if not self.http:
            # A line with no end (after --send, if given): a server with a line
            # limit, or one that rejects what it cannot parse, answers early.
            return self.prefix
        version = "1.0" if variant == "HTTP/1.0" else "1.1"
        connection = "Connection: close\r\n" if variant == "Connection: close" else ""
        return (
            f"POST {self.path} HTTP/{version}\r\nHost: {self.host}\r\n"
            "User-Agent: aiograceful-probe\r\nContent-Type: application/octet-stream\r\n"
            f"{connection}Content-Length: {body_size}\r\n\r\n"
        ).encode("latin-1")

    def simple(self, *, keep_alive: bool = False) -> bytes:
        if not self.http:
            return self.raw
        connection = "" if keep_alive else "Connection: close\r\n"
        return (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"User-Agent: aiograceful-probe\r\n{connection}\r\n"
        ).encode("latin-1")

    def pipelined(self, count: int) -> bytes:
        """``count`` GETs back to back, the last one asking for the close (HTTP)."""
        keep = self.simple(keep_alive=True)
        return keep * (count - 1) + self.simple()


# -- check 1: early answer while the client still sends ------------------------------


@dataclasses.dataclass
class _Upload:
    sent: int = 0
    answer_at: int | None = None  # bytes sent when the answer was first seen
    answer_peek: bytes = b""
    fin_at: int | None = None  # bytes sent when the server's FIN was seen
    error: OSError | None = None
    stalled: bool = False


def _upload(sock: socket.socket, head: bytes, body_size: int, timeout: float) -> _Upload:
    """Send ``head`` and ``body_size`` bytes, peeking at (never consuming) what comes back."""
    up = _Upload()
    total = len(head) + body_size
    pending = memoryview(head)
    sock.setblocking(False)
    progress = time.monotonic()
    try:
        while up.sent < total:
            if time.monotonic() - progress > timeout:
                up.stalled = True
                return up
            watch_read = up.answer_at is None and up.fin_at is None
            readable, writable, _ = select.select([sock] if watch_read else [], [sock], [], timeout)
            if readable:
                try:
                    peek = sock.recv(4096, socket.MSG_PEEK)
                except (ConnectionResetError, BrokenPipeError) as exc:
                    up.error = exc
                    return up
                except BlockingIOError:
                    peek = None
                if peek:
                    up.answer_at, up.answer_peek = up.sent, peek
                elif peek is not None:
                    up.fin_at = up.sent
            if not writable:
                if not readable:
                    up.stalled = True
                    return up
                continue
            if not pending:
                left = total - up.sent
                pending = memoryview(_CHUNK)[: min(len(_CHUNK), left)]
            try:
                n = sock.send(pending)
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError) as exc:
                up.error = exc
                return up
            up.sent += n
            pending = pending[n:]
            progress = time.monotonic()
    finally:
        sock.setblocking(True)
    return up


def check_early_answer(
    target: Target,
    requests: _Requests,
    body_size: int,
    timeout: float,
    variant: Variant = "keep-alive",
) -> Verdict:
    """Check 1: is an early answer still readable by a client that sends everything first?"""
    name = "early answer while the client is still sending"
    if requests.http:
        name += f" ({variant})"
    head = requests.upload_head(body_size, variant)
    total = len(head) + body_size
    what = (
        f"POST {requests.path} announcing a {_size(body_size)} body ({variant})"
        if requests.http
        else f"{requests.prefix!r} then {_size(body_size)} with no line end"
        if requests.prefix
        else f"{_size(body_size)} with no line end"
    )
    try:
        sock = _connect(target, timeout)
    except OSError as exc:
        return Verdict(name, "inconclusive", f"could not connect: {_describe(exc)}")
    with sock:
        up = _upload(sock, head, body_size, timeout)
        early = ""
        if up.answer_at is not None:
            early = (
                f"the server answered {_first_line(up.answer_peek)} after {_size(up.answer_at)} "
                f"of {_size(total)}"
            )
        if up.error is not None:
            evidence = (
                f"sent {what}; the connection was reset ({type(up.error).__name__}) after "
                f"{_size(up.sent)} of {_size(total)} sent"
            )
            if up.fin_at is not None:
                evidence += f"; the server's FIN had come after {_size(up.fin_at)}"
            if early:
                evidence += (
                    f"; {early}, and a client that sends its whole request before reading "
                    "(http.client, node, wget, ab) never reads that answer"
                )
            return Verdict(name, "HAZARD", evidence + ".")
        if up.stalled:
            if early:
                return Verdict(
                    name,
                    "inconclusive",
                    f"sent {what}; {early}, then stopped reading without closing "
                    f"(no progress for {timeout:g} s): a client that sends first would hang.",
                )
            return Verdict(
                name,
                "inconclusive",
                f"sent {what}; the server stopped reading after {_size(up.sent)} and did not "
                f"answer within {timeout:g} s: no early answer to judge.",
            )
        data, end = _read_to_end(sock, timeout)
    if not data:
        how = {
            "FIN": "closed with a FIN without answering",
            "RST": "reset the connection without answering",
            "open": f"did not answer within {timeout:g} s",
        }[end]
        status: Status = "HAZARD" if end == "RST" else "inconclusive"
        return Verdict(name, status, f"sent all of {what}; the server {how}.")
    if end == "RST":
        return Verdict(
            name,
            "HAZARD",
            f"sent all of {what}; read {_first_line(data)}, then the connection was reset: "
            "a slower reader would have lost the answer.",
        )
    ending = "then a FIN" if end == "FIN" else "the connection stayed open"
    if up.answer_at is None:
        return Verdict(
            name,
            "inconclusive",
            f"sent all of {what}; the server answered {_first_line(data)} only after the "
            f"whole request, {ending}: no early answer to judge (try a larger --body-size).",
        )
    return Verdict(
        name,
        "pass",
        f"sent {what}; {early}, kept reading while the client sent the rest; the client read "
        f"the answer afterwards ({_size(len(data))}), {ending}.",
    )


# -- check 2: answer after the client's half-close -------------------------------------


def check_half_close(target: Target, requests: _Requests, timeout: float) -> Verdict:
    """Check 2: does the server still answer a request followed by the client's FIN?"""
    name = "answer after the client half-closes"
    request = requests.simple()
    shown = _first_line(request)
    try:
        with _connect(target, timeout) as sock:
            sock.sendall(request)
            control, control_end = _read_to_end(sock, timeout)
    except OSError as exc:
        return Verdict(name, "inconclusive", f"control request failed: {_describe(exc)}")
    if not control:
        return Verdict(
            name,
            "inconclusive",
            f"the server did not answer {shown} even without a half-close "
            f"(ended: {control_end}): nothing to compare.",
        )
    # The request alone, then (HTTP) pipelined ones, a few times: whether the
    # server has written an answer when it reads the FIN is a race on its
    # loop, and one answer lost in any try is a loss.
    single = (1, request, shown)
    tries = [single]
    if requests.http:
        tries += [(PIPELINED, requests.pipelined(PIPELINED), f"{PIPELINED} pipelined {shown}")]
        tries *= HALF_CLOSE_TRIES
    for count, sent, shown in tries:  # the last try is the one reported
        try:
            with _connect(target, timeout) as sock:
                sock.sendall(sent)
                sock.shutdown(socket.SHUT_WR)
                data, end = _read_to_end(sock, timeout)
        except OSError as exc:
            return Verdict(
                name, "HAZARD", f"sending {shown} and a half-close failed: {_describe(exc)}."
            )
        answered = len(_STATUS_LINE.findall(data)) if requests.http else (1 if data else 0)
        if answered < count and not (data and _said_close(data)):
            break
    control_seen = f"without the half-close it answered {_first_line(control)}"
    if data and answered < count and not _said_close(data):
        return Verdict(
            name,
            "HAZARD",
            f"sent {shown}, then shutdown(SHUT_WR); the server answered {answered} of "
            f"{count}, then ended the connection ({end}): the answers not yet written "
            "when it read the client's FIN were lost.",
        )
    if not data:
        how = {
            "FIN": "closed with a FIN without answering",
            "RST": "reset the connection without answering",
            "open": f"gave no answer within {timeout:g} s",
        }[end]
        return Verdict(
            name,
            "HAZARD",
            f"sent {shown}, then shutdown(SHUT_WR); the server {how} ({control_seen}).",
        )
    if end == "RST":
        return Verdict(
            name,
            "HAZARD",
            f"sent {shown}, then shutdown(SHUT_WR); read {_first_line(data)}, then a RST.",
        )
    after = (
        "then closed with a FIN"
        if end == "FIN"
        else f"but left the connection open {timeout:g} s after the client's FIN"
    )
    every = f"all {count}, " if count > 1 else ""
    if answered < count:
        # Its last answer said Connection: close: HTTP lets a server stop
        # there, and the client sends the rest again on a new connection.
        every = f"{answered} of {count} (the last with Connection: close), "
    return Verdict(
        name,
        "pass",
        f"sent {shown}, then shutdown(SHUT_WR); the server still answered {every}"
        f"{_first_line(data)} ({_size(len(data))}), {after}.",
    )


# -- check 3: idle close ----------------------------------------------------------------


def check_idle_close(
    target: Target, wait: float, timeout: float, requests: _Requests | None = None
) -> Verdict:
    """Check 3: when the server closes an idle connection, is it a FIN or a RST?

    Over HTTP (``requests`` given, ``http``) the connection first serves one
    keep-alive request, whose answer is read: many servers time out only a
    connection that has served one (uvicorn, for one, leaves a connection
    that never sent a request open).
    """
    name = "idle (or shutdown) close"
    try:
        sock = _connect(target, timeout)
    except OSError as exc:
        return Verdict(name, "inconclusive", f"could not connect: {_describe(exc)}")
    if requests is not None and requests.http:
        try:
            sock.sendall(requests.simple(keep_alive=True))
            answer = _read_answer(sock, timeout)
        except OSError as exc:
            sock.close()
            return Verdict(name, "inconclusive", f"the first request failed: {_describe(exc)}")
        if not answer or _said_close(answer):
            # The server ends the connection after this answer (no keep-alive):
            # what is left to judge is its close of a connection never used.
            sock.close()
            try:
                sock = _connect(target, timeout)
            except OSError as exc:
                return Verdict(name, "inconclusive", f"could not connect: {_describe(exc)}")
    started = time.monotonic()
    deadline = started + wait
    received = 0
    end: End = "open"
    with sock:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                end = "RST"
                break
            except TimeoutError:
                break
            if not chunk:
                end = "FIN"
                break
            received += len(chunk)
    after = time.monotonic() - started
    got = f" (after {_size(received)} from the server)" if received else ""
    if end == "FIN":
        return Verdict(
            name,
            "pass",
            f"the server closed an idle connection after {after:.1f} s with a FIN{got}.",
        )
    if end == "RST":
        return Verdict(
            name,
            "HAZARD",
            f"the server closed an idle connection after {after:.1f} s with a RST{got}: "
            "an abortive close, which destroys data still in flight.",
        )
    return Verdict(
        name,
        "inconclusive",
        f"an idle connection was still open after {wait:g} s{got}: no close to judge "
        "(raise --wait, or stop the server during the wait to check its shutdown close).",
    )


def _said_close(data: bytes) -> bool:
    """True if the last HTTP answer in ``data`` has a ``Connection: close`` header."""
    starts = [m.end() for m in _STATUS_LINE.finditer(data)]
    if not starts:
        return False
    head = data[starts[-1] :].split(b"\r\n\r\n", 1)[0] + b"\r\n"
    return _CLOSE_HEADER.search(head) is not None


def _read_answer(sock: socket.socket, timeout: float, limit: int = 1 << 20) -> bytes:
    """Read one HTTP answer: its head, then its body by ``Content-Length`` or to the last chunk.

    Stops early at the server's FIN, after ``limit`` bytes, or after
    ``timeout`` seconds of silence (a body with neither length nor chunks).
    """
    sock.settimeout(timeout)
    data = b""
    for _ in range(10_000):  # each pass reads; the bounds are the limit and the timeout
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].lower()
            body = data[head_end + 4 :]
            length = re.search(rb"\r\ncontent-length: *(\d+)", head)
            if length is not None and len(body) >= int(length.group(1)):
                return data
            if b"\r\ntransfer-encoding: chunked" in head and body.endswith(b"0\r\n\r\n"):
                return data
        if len(data) >= limit:
            return data
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


# -- the whole probe -----------------------------------------------------------------------


def run_probe(
    host: str,
    port: int,
    *,
    http: bool = False,
    path: str = "/",
    send: bytes | None = None,
    body_size: int = DEFAULT_BODY_SIZE,
    wait: float = DEFAULT_WAIT,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[Verdict], None] | None = None,
    started: Callable[[Target], None] | None = None,
) -> tuple[Target, list[Verdict]]:
    """Run the checks against ``host:port`` (with ``http``, the early answer once per variant).

    ``started(target)`` is called once ``host:port`` is reached, before the
    first check. Raises :class:`ProbeError` when ``host:port`` cannot be
    resolved or reached.
    """
    target = resolve(host, port, timeout)
    if started is not None:
        started(target)
    requests = _Requests(target, http, path, send)
    verdicts: list[Verdict] = []
    variants: Sequence[Variant] = VARIANTS if http else ("keep-alive",)

    def early(variant: Variant) -> Callable[[], Verdict]:
        return lambda: check_early_answer(target, requests, body_size, timeout, variant)

    steps: Sequence[Callable[[], Verdict]] = (
        *(early(v) for v in variants),
        lambda: check_half_close(target, requests, timeout),
        lambda: check_idle_close(target, wait, timeout, requests),
    )
    for step in steps:
        verdict = step()
        verdicts.append(verdict)
        if progress is not None:
            progress(verdict)
    return target, verdicts


def exit_status(verdicts: Sequence[Verdict]) -> int:
    """1 when any check found a hazard, else 0 (inconclusive checks do not fail)."""
    return 1 if any(v.status == "HAZARD" for v in verdicts) else 0


def format_verdict(verdict: Verdict) -> str:
    """One check, as printed: ``[status] check`` and its evidence indented below."""
    return f"[{verdict.status}] {verdict.check}\n    {verdict.evidence}"


def format_report(verdicts: Sequence[Verdict]) -> str:
    """The closing line: the counts and what the exit status will be."""
    hazards = sum(v.status == "HAZARD" for v in verdicts)
    passed = sum(v.status == "pass" for v in verdicts)
    unsure = len(verdicts) - hazards - passed
    if hazards:
        return f"result: {hazards} hazard(s) found, {passed} passed, {unsure} inconclusive (exit 1)"
    return f"result: no hazard found: {passed} passed, {unsure} inconclusive (exit 0)"
