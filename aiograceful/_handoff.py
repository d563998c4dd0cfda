"""Listening sockets from elsewhere: a predecessor's (handoff), a supervisor's (listen_fds).

Restarts (hazard H7): :class:`HandoffOffer` and :func:`take_listeners` pass
a server's listening sockets to its successor over a Unix socket, so the
kernel socket, and its queue, outlive the process; :func:`listen_fds` takes
the sockets a supervisor (systemd) keeps for the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from ._options import logger
from ._socket import peer_uid

__all__ = [
    "HANDOFF_ACK_TIMEOUT",
    "HANDOFF_TIMEOUT",
    "HandoffOffer",
    "Taken",
    "check_handoff",
    "listen_fds",
    "take_listeners",
]


# -- listen_fds ----------------------------------------------------------------

#: sd_listen_fds(3): the first descriptor systemd passes.
_LISTEN_FDS_START: Final = 3


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets systemd passed this process, for ``sock=`` (sd_listen_fds(3)).

    Socket activation: systemd (or any supervisor speaking the protocol:
    ``systemd-socket-activate``, s6, Circus) binds the sockets, keeps them
    open across restarts of the service and passes them as descriptors 3,
    4, ... with ``LISTEN_FDS`` (how many) and ``LISTEN_PID`` (this process's
    pid; the variables are for no other process). Returns ``[]`` when the
    variables are absent or meant for another process. The descriptors are
    marked close-on-exec, as sd_listen_fds does; with ``unset_environment``
    (the default) the variables are removed, so a child does not take them
    too. A restart then loses nothing: the kernel socket, and its queue,
    stay with the supervisor while the service is down.

    A descriptor that is not open, or not a socket (systemd may pass FIFOs),
    raises ``ValueError`` naming it, before any descriptor is touched; so do
    malformed variables.
    """
    pid_text = os.environ.get("LISTEN_PID")
    count_text = os.environ.get("LISTEN_FDS")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if pid_text is None or count_text is None:
        return []
    try:
        pid = int(pid_text)
    except ValueError:
        raise ValueError(f"LISTEN_PID must be a process id, got {pid_text!r}") from None
    if pid != os.getpid():
        return []
    try:
        count = int(count_text)
    except ValueError:
        raise ValueError(f"LISTEN_FDS must be a count, got {count_text!r}") from None
    if count < 0:
        raise ValueError(f"LISTEN_FDS must be >= 0, got {count}")
    fds = range(_LISTEN_FDS_START, _LISTEN_FDS_START + count)
    # Every descriptor is checked before any is touched (close-on-exec, a
    # socket object): a bad one leaves them all as they were.
    for fd in fds:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise ValueError(f"LISTEN_FDS: descriptor {fd} is not open ({exc.strerror})") from exc
        if not stat.S_ISSOCK(mode):
            raise ValueError(f"LISTEN_FDS: descriptor {fd} is not a socket")
    for fd in fds:
        os.set_inheritable(fd, False)
    return [socket.socket(fileno=fd) for fd in fds]


# -- handoff -------------------------------------------------------------------
#
# Theory of operation. A server started with handoff=PATH offers its listening
# sockets at the Unix stream socket PATH (mode 0600). A successor started with
# the same PATH connects to it, and:
#
#   predecessor                                 successor
#     | <------------- connect(PATH) ------------ |
#     | SO_PEERCRED: same uid, else close         | SO_PEERCRED: same uid, else fail
#     | -- header (JSON) + fds (SCM_RIGHTS) ----> | checks each fd: a listening
#     |    keeps accepting                        | stream socket of the family the
#     |                                           | header says; starts serving on
#     |                                           | them; binds PATH.<pid>~ (0600),
#     |                                           | renames it over PATH
#     | <--------------- "OK\n" ----------------- | (the ack)
#     | stops accepting (no drain: the successor  |
#     | accepts from the same kernel socket),     |
#     | graceful shutdown; serve_forever returns  |
#
# Never both stop: the predecessor stops only on the ack, which the successor
# sends only once it serves. A successor that dies before its ack leaves the
# predecessor serving (it sees EOF on the channel), and the predecessor takes
# PATH back if the successor had renamed its own offer over it. One successor
# at a time: a second one waits in the offer's queue; when the first has taken
# the sockets the old offer is closed, the second sees its channel close
# before any header, and asks PATH again, where the first now offers (a
# restart chain, never two owners). A PATH nobody listens on (connect refused:
# a crashed process) is stale: the server binds normally and takes PATH over.
# A PATH that exists and is not a socket is refused before anything is touched.
#
# A successor that stalls: it took the sockets and never acknowledges (its
# loop blocked, start_serving never called), its process alive. The
# predecessor serves on meanwhile (it still accepts from the shared kernel
# socket), for HANDOFF_ACK_TIMEOUT, or, once its shutdown has begun, until
# its grace runs out (settle's bound): a successor never holds a shutdown
# longer than the grace. Then the predecessor drains its queue as in any
# shutdown, and stops the kernel socket listening (_accept.close_and_drain
# with stop: shutdown(SHUT_RD), Linux), for the stalled holder too: new clients are
# refused at once. Without that stop, they would finish their handshake into
# a queue nobody accepts and hang for as long as the stalled process lives.
# The stop costs nothing when the successor is healthy (it acknowledges in
# milliseconds, and the predecessor just closes its descriptors); a
# successor slower than the predecessor's whole grace finds its listeners
# stopped (the port stays bound to it: a listen() would start them again).

#: Bound on a successor's take (connecting, receiving the sockets, retries).
HANDOFF_TIMEOUT: Final = 10.0
#: Bound on the predecessor's wait for the successor's ack, after sending the sockets.
HANDOFF_ACK_TIMEOUT: Final = 60.0
_HANDOFF_VERSION: Final = 1
_ACK: Final = b"OK\n"
_MAX_FDS: Final = 64
_HEADER_MAX: Final = 64 * 1024
_LENGTH: Final = struct.Struct("!I")
# sizeof(sockaddr_un.sun_path) on Linux, less the terminating NUL.
_SUN_PATH_MAX: Final = 107
# Pause before a successor asks PATH again (its channel closed before a header).
_RETRY_PAUSE: Final = 0.02


def _temp_name(path: str) -> str:
    return f"{path}.{os.getpid()}~"


def check_handoff(path: object) -> str | None:
    """Validate a ``handoff`` argument; the path as ``str``, or None.

    ``TypeError``/``ValueError`` naming ``handoff`` for a wrong type, an empty
    path, one too long for a Unix socket address, a missing directory, or a
    path that exists and is not a socket.
    """
    if path is None:
        return None
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"handoff must be a path (str or os.PathLike) or None, got {type(path).__name__}"
        )
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text or "\0" in text:
        raise ValueError(f"handoff must be a non-empty path without NUL, got {text!r}")
    if len(os.fsencode(_temp_name(text))) > _SUN_PATH_MAX:
        raise ValueError(
            f"handoff path is too long for a Unix socket address ({_SUN_PATH_MAX} bytes "
            f"with a suffix of ours): {text!r}"
        )
    try:
        mode = os.lstat(text).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISSOCK(mode):
        raise ValueError(f"handoff: {text!r} exists and is not a socket")
    parent = os.path.dirname(text) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"handoff: the directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        # The offer is bound there (a temporary name, renamed over the path).
        raise ValueError(f"handoff: this user may not create files in {parent!r}")
    return text


def _address_text(address: object) -> object:
    """A listener's address as JSON can carry it (abstract Unix names are bytes)."""
    if isinstance(address, bytes):
        return address.decode("latin-1")
    return address


class Taken:
    """Listening sockets a successor received from its predecessor, not yet acknowledged."""

    __slots__ = ("_channel", "addresses", "pid", "sockets")

    def __init__(
        self,
        sockets: list[socket.socket],
        addresses: list[object],
        pid: int,
        channel: socket.socket,
    ) -> None:
        self.sockets = sockets
        self.addresses = addresses
        self.pid = pid
        self._channel: socket.socket | None = channel

    def ack(self) -> bool:
        """Tell the predecessor this process serves; it stops accepting. False if it had gone."""
        channel = self._channel
        if channel is None:
            return False
        self._channel = None
        with channel:
            try:
                channel.sendall(_ACK)
            except OSError:
                return False
        return True

    def abandon(self) -> None:
        """Give up: close the sockets and the channel; the predecessor keeps serving."""
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        channel = self._channel
        self._channel = None
        if channel is not None:
            channel.close()

    def __repr__(self) -> str:
        state = "acknowledged" if self._channel is None else "pending"
        return f"<Taken from pid {self.pid} {state} addresses={self.addresses}>"


class _ChannelClosed(Exception):
    """The predecessor closed the channel before sending its sockets."""


def take_listeners(path: str, timeout: float = HANDOFF_TIMEOUT) -> Taken | None:
    """Take the listening sockets offered at ``path``; None if nobody offers there.

    Blocking (a server runs it in a thread). None when ``path`` does not exist
    or nobody listens there (a stale path); ``PermissionError`` when the
    offer belongs to another user; ``TimeoutError`` after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    for _ in range(10_000):  # the bound is the deadline
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        channel.settimeout(remaining)
        try:
            channel.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            channel.close()
            return None
        except PermissionError as exc:
            channel.close()
            raise PermissionError(
                f"handoff: may not connect to {path!r}: it belongs to another user"
            ) from exc
        except BaseException:
            channel.close()
            raise
        try:
            uid = peer_uid(channel)
            if uid is not None and uid != os.getuid():
                raise PermissionError(
                    f"handoff: {path!r} is offered by uid {uid}, not by this user ({os.getuid()})"
                )
            return _receive(channel, path)
        except _ChannelClosed:
            channel.close()
            time.sleep(_RETRY_PAUSE)
        except TimeoutError:
            channel.close()
            break
        except BaseException:
            channel.close()
            raise
    raise TimeoutError(f"handoff: nothing was handed over at {path!r} within {timeout} s")


def _receive(channel: socket.socket, path: str) -> Taken:
    try:
        data, fds, flags, _addr = socket.recv_fds(channel, _HEADER_MAX, _MAX_FDS)
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise _ChannelClosed from exc
    sockets: list[socket.socket] = []
    try:
        for fd in fds:
            sockets.append(socket.socket(fileno=fd))
    except OSError:
        for fd in fds[len(sockets) :]:
            os.close(fd)
        for sock in sockets:
            sock.close()
        raise RuntimeError(f"handoff: {path!r} passed a descriptor that is not a socket") from None
    try:
        if not data:
            raise _ChannelClosed
        if flags & socket.MSG_CTRUNC:
            raise RuntimeError(f"handoff: {path!r} passed more than {_MAX_FDS} sockets")
        buffer = bytearray(data)
        while len(buffer) < _LENGTH.size or len(buffer) < _LENGTH.size + _length(buffer):
            more = channel.recv(_HEADER_MAX)
            if not more:
                raise _ChannelClosed
            buffer += more
            if len(buffer) > _HEADER_MAX + _LENGTH.size:
                raise RuntimeError(f"handoff: {path!r} sent an oversized header")
        header = json.loads(bytes(buffer[_LENGTH.size : _LENGTH.size + _length(buffer)]))
        listeners = header.get("listeners") if isinstance(header, dict) else None
        if (
            header.get("version") != _HANDOFF_VERSION
            or not isinstance(listeners, list)
            or len(listeners) != len(sockets)
            or not sockets
        ):
            raise RuntimeError(f"handoff: {path!r} sent a header this version cannot read")
        for sock, entry in zip(sockets, listeners, strict=True):
            if (
                sock.type != socket.SOCK_STREAM
                or int(sock.family) != entry.get("family")
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ):
                raise RuntimeError(
                    f"handoff: {path!r} passed a socket that is not the listening "
                    f"stream socket its header names ({entry.get('address')!r})"
                )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return Taken(sockets, [entry.get("address") for entry in listeners], header.get("pid"), channel)


def _length(buffer: bytearray) -> int:
    return int(_LENGTH.unpack_from(buffer)[0])


class HandoffOffer:
    """A server's listening sockets, offered to a successor at the Unix socket ``path``.

    ``listeners()`` gives the sockets to pass (read at each handoff);
    ``on_taken()`` runs once a successor has acknowledged. One successor at a
    time: while one is served the offer socket is not read, and the next
    waits in its queue. See the theory of operation above.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: str,
        listeners: Callable[[], Sequence[Any]],
        on_taken: Callable[[], None],
    ) -> None:
        self._loop = loop
        self.path = path
        self._listeners = listeners
        self._on_taken = on_taken
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._handing: asyncio.Future[None] | None = None
        self.taken = False
        self.closed = False
        #: A successor holds this server's listening sockets without having
        #: acknowledged: it received them and neither acknowledged nor went
        #: away (its channel still open when the wait for it ended). It may
        #: never accept: see "A successor that stalls" above.
        self.unacknowledged = False

    def publish(self) -> None:
        """Bind a fresh offer socket and put it at ``path`` (atomically: bind, then rename)."""
        temp = _temp_name(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)  # left by a crashed process that had our pid
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # On Linux the socket file's mode comes from the socket's inode
            # (less the umask): 0600 from the start, so no other user can
            # connect in the moment before the chmod below. (macOS refuses
            # fchmod on a socket; the file is not at PATH until renamed.)
            with contextlib.suppress(OSError):
                os.fchmod(sock.fileno(), 0o600)
            sock.bind(temp)
            os.chmod(temp, 0o600)
            sock.listen(16)
            sock.setblocking(False)
            st = os.stat(temp)
            os.rename(temp, self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._drop_sock()  # successors queued on the old one see it close, and ask PATH again
        self._sock = sock
        self._inode = (st.st_dev, st.st_ino)
        if self._task is None:
            self._loop.add_reader(sock.fileno(), self._on_readable)

    def owns_path(self) -> bool:
        """True while ``path`` is still this offer's socket file."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    async def settle(self, timeout: float = HANDOFF_ACK_TIMEOUT) -> None:
        """Wait (``timeout`` at most) for a handoff in progress to be acknowledged or to fail.

        A server's shutdown passes what is left of its grace: a successor
        never holds a shutdown longer than that (then ``close()`` gives up on
        it, and ``unacknowledged`` tells whether it holds the sockets).
        """
        handing = self._handing
        if handing is not None and not handing.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(handing), timeout)

    def close(self) -> None:
        """Withdraw the offer: close its socket, and remove ``path`` if it is still ours."""
        if self.closed:
            return
        self.closed = True
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if not self.taken and self.owns_path():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._drop_sock()

    def _drop_sock(self) -> None:
        sock = self._sock
        self._sock = None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    # A reader callback and a non-blocking accept(), not loop.sock_accept():
    # a sock_accept future cancelled while a connection arrives makes
    # CPython 3.11's _sock_accept set the result of a cancelled future
    # (InvalidStateError in the loop's handler) and leak the connection.
    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None or self._task is not None:
            return
        try:
            channel, _addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            logger.exception("handoff: accept() failed on %r", self.path)
            return
        self._loop.remove_reader(sock.fileno())  # one successor at a time
        self._handing = self._loop.create_future()
        self._task = self._loop.create_task(self._serve_one(channel))

    async def _serve_one(self, channel: socket.socket) -> None:
        handing = self._handing
        taken = False
        try:
            with channel:
                taken = await self._hand(channel)
        finally:
            self._task = None
            if handing is not None and not handing.done():
                handing.set_result(None)
        if taken:
            self.taken = True
            logger.info("handoff: a successor took the listening sockets at %r", self.path)
            self.close()
            self._on_taken()
            return
        if self.closed:
            return
        if not self.owns_path():
            # The successor had put its own offer at PATH and died before
            # its ack: PATH must lead to a server that serves.
            try:
                self.publish()
                return
            except OSError:
                logger.exception("handoff: could not offer again at %r", self.path)
        sock = self._sock
        if sock is not None:
            self._loop.add_reader(sock.fileno(), self._on_readable)

    async def _hand(self, channel: socket.socket) -> bool:
        """Pass the sockets to one successor; True once it has acknowledged."""
        channel.setblocking(False)
        uid = peer_uid(channel)
        if uid is not None and uid != os.getuid():
            logger.warning(
                "handoff: refused uid %d at %r (this server runs as uid %d)",
                uid,
                self.path,
                os.getuid(),
            )
            return False
        listeners = list(self._listeners())
        if not listeners:
            return False
        body = json.dumps(
            {
                "version": _HANDOFF_VERSION,
                "pid": os.getpid(),
                "listeners": [
                    {
                        "family": int(sock.family),
                        "type": int(sock.type),
                        "address": _address_text(sock.getsockname()),
                    }
                    for sock in listeners
                ],
            }
        ).encode()
        try:
            # A few hundred bytes into an empty socket buffer: one sendmsg.
            sent = socket.send_fds(
                channel, [_LENGTH.pack(len(body)) + body], [s.fileno() for s in listeners]
            )
        except OSError:
            return False
        if sent != _LENGTH.size + len(body):
            return False
        # From here until its ack, or its channel's close, the successor holds
        # the sockets; a wait cut short (a timeout, a cancel) leaves it so.
        self.unacknowledged = True
        reply = b""
        try:
            async with asyncio.timeout(HANDOFF_ACK_TIMEOUT):
                while len(reply) < len(_ACK):
                    chunk = await self._loop.sock_recv(channel, 16)
                    if not chunk:
                        break
                    reply += chunk
        except TimeoutError:
            logger.warning(
                "handoff: the successor at %r did not acknowledge; serving on", self.path
            )
            return False
        except OSError:
            self.unacknowledged = False
            return False
        self.unacknowledged = False
        if reply != _ACK:
            logger.warning("handoff: the successor at %r went away; serving on", self.path)
            return False
        return True

    def __repr__(self) -> str:
        state = "taken" if self.taken else "closed" if self.closed else "offering"
        if self.unacknowledged:
            state += ", held unacknowledged"
        return f"<HandoffOffer {state} path={self.path!r}>"
