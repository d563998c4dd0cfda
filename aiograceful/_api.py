"""The public constructors: ``start_server``, ``create_server`` and their Unix twins.

Each validates its arguments (a ``TypeError`` or ``ValueError`` naming the
argument, before anything is touched), gathers them in one
:class:`~aiograceful._connections.Settings`, and starts a
:class:`~aiograceful._server.GracefulServer`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from ._accept import default_backlog
from ._connections import NoticeHook, RejectHook, Settings, StreamHandler
from ._ending import QUIET
from ._handoff import check_handoff
from ._options import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_DISCARD,
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_TIMEOUT,
    LingerOptions,
    check_seconds,
)
from ._protocol import GracefulProtocol
from ._server import DEFAULT_FORCE_TIMEOUT, DEFAULT_GRACE, GracefulServer, open_server

__all__ = ["create_server", "create_unix_server", "start_server", "start_unix_server"]


async def _serve(
    handler: StreamHandler | None,
    protocol_factory: Callable[[], GracefulProtocol] | None,
    host: Any,
    port: Any,
    *,
    grace: object,
    force_timeout: object,
    linger_timeout: object,
    linger_idle_timeout: object,
    max_discard: object,
    reset_on_failure: object,
    send_timeout: object,
    max_connections: object,
    on_reject: Any,
    on_notice: Any,
    idle_timeout: object,
    backlog: object,
    reuse_port: bool | None,
    create_kwargs: dict[str, Any],
    drain_delay: object = 0.0,
    handoff: object = None,
    unix: bool = False,
) -> GracefulServer:
    """Validate the options of start_server/create_server, then make and start the server."""
    grace_s = check_seconds("grace", grace, allow_none=False)
    force_s = check_seconds("force_timeout", force_timeout, allow_none=False)
    drain_s = check_seconds("drain_delay", drain_delay, allow_none=False)
    assert grace_s is not None
    assert force_s is not None
    assert drain_s is not None
    handoff_path = check_handoff(handoff)
    try:
        linger = LingerOptions(
            timeout=linger_timeout,  # type: ignore[arg-type]
            idle_timeout=linger_idle_timeout,  # type: ignore[arg-type]
            max_discard=max_discard,  # type: ignore[arg-type]
            reset_on_failure=reset_on_failure,  # type: ignore[arg-type]
            send_timeout=send_timeout,  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as exc:
        # Name the server's argument, not the LingerOptions field.
        message = str(exc)
        for field in ("idle_timeout", "timeout"):
            if message.startswith(field):
                message = "linger_" + message
                break
        raise type(exc)(message) from None
    if max_connections is not None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError(
                f"max_connections must be an int or None, got {type(max_connections).__name__}"
            )
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    for name, hook in (("on_reject", on_reject), ("on_notice", on_notice)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{name} must be callable or None, got {type(hook).__name__}")
    idle_s = check_seconds("idle_timeout", idle_timeout, allow_none=True)
    if idle_s == 0:
        raise ValueError("idle_timeout must be > 0 or None")
    if backlog is None:
        backlog_n = default_backlog()
    elif isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"backlog must be an int or None, got {type(backlog).__name__}")
    elif backlog < 0:
        raise ValueError(f"backlog must be >= 0, got {backlog}")
    else:
        backlog_n = backlog
    settings = Settings(
        linger=linger,
        handler=handler,
        on_notice=on_notice,
        on_reject=on_reject,
        idle_timeout=idle_s,
        quiet=QUIET,
        stream_limit=create_kwargs.pop("limit", 2**16),
    )
    return await open_server(
        (host, port, backlog_n, reuse_port),
        settings=settings,
        protocol_factory=protocol_factory,
        grace=grace_s,
        force_timeout=force_s,
        max_connections=max_connections,
        create_kwargs=create_kwargs,
        drain_delay=drain_s,
        handoff=handoff_path,
        unix=unix,
    )


async def start_server(
    client_connected_cb: StreamHandler,
    host: str | Iterable[str] | None = None,
    port: int | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    linger_timeout: float = DEFAULT_TIMEOUT,
    linger_idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_discard: int | None = DEFAULT_MAX_DISCARD,
    reset_on_failure: bool = False,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    on_notice: NoticeHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    reuse_port: bool | None = None,
    drain_delay: float = 0.0,
    handoff: str | os.PathLike[str] | None = None,
    limit: int = 2**16,
    **kwargs: Any,
) -> GracefulServer:
    """Start a streams server, like ``asyncio.start_server``, that closes without losing data.

    ``client_connected_cb(reader, writer)`` is a coroutine function; when it
    returns (or raises: the exception is logged on the ``aiograceful``
    logger), its writer is closed with :func:`graceful_close`.

    Options (defaults beside nginx's; docs/timing.md has the full table):

    * ``grace``: seconds connections get after the shutdown notice (10 s).
    * ``force_timeout``: linger bound for those still open after ``grace`` (1 s).
    * ``send_timeout``, ``linger_timeout``, ``linger_idle_timeout``,
      ``max_discard``, ``reset_on_failure``: the linger options of every
      graceful close the server does (60 s, 30 s, 5 s, 64 MiB, False; nginx:
      send_timeout 60 s, lingering_time 30 s, lingering_timeout 5 s). A close
      waits ``send_timeout`` at most for each byte of ours to be acknowledged,
      and the other bounds start once all are: a slow download is never cut.
    * ``max_connections``: over it, a connection is rejected: ``on_reject(transport)``
      writes the rejection (a 503, say), then a lingering close reads the
      request away, so the client reads the rejection. Default: no limit.
    * ``on_notice(writer)``: the shutdown notice in protocol terms; may return
      an awaitable. Called once per connection, only while its write side is
      open. Handlers may instead await ``server.notice.wait()``.
    * ``idle_timeout``: seconds without traffic before a graceful close: no
      byte read from the peer or acknowledged by it, nothing buffered either
      way, and the handler waiting on a read (default: None, no idle close;
      nginx keepalive_timeout 75 s). A slow download, or a handler pushing
      events while a read is pending, is not idle.
    * ``backlog``: listen backlog (2048, bounded by ``somaxconn``).
    * ``drain_delay``: on SIGTERM or :meth:`~GracefulServer.shutdown`, first
      set the notice and keep accepting for this long (new connections are
      told at once), so that load balancers stop sending; then the shutdown
      (default 0).
    * ``handoff``: a Unix socket path. On start, take the listening sockets
      of a predecessor offering them there instead of binding; then offer
      this server's at the path. When a successor takes them, this server
      stops accepting (the queue is the successor's now) and shuts down
      gracefully. A restart: start the new process with the same path.
    * ``reuse_port``, ``limit`` and any other ``loop.create_server`` keyword
      (``ssl``, ``sock``, ``start_serving``, ``family``...) pass through.

    Bad arguments raise ``TypeError``/``ValueError`` naming the argument.
    """
    if not callable(client_connected_cb):
        raise TypeError(
            "client_connected_cb must be a coroutine function, "
            f"got {type(client_connected_cb).__name__}"
        )
    return await _serve(
        client_connected_cb,
        None,
        host,
        port,
        grace=grace,
        force_timeout=force_timeout,
        linger_timeout=linger_timeout,
        linger_idle_timeout=linger_idle_timeout,
        max_discard=max_discard,
        reset_on_failure=reset_on_failure,
        send_timeout=send_timeout,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=on_notice,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=reuse_port,
        create_kwargs={**kwargs, "limit": limit},
        drain_delay=drain_delay,
        handoff=handoff,
    )


async def create_server(
    protocol_factory: Callable[[], GracefulProtocol],
    host: str | Iterable[str] | None = None,
    port: int | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    linger_timeout: float = DEFAULT_TIMEOUT,
    linger_idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_discard: int | None = DEFAULT_MAX_DISCARD,
    reset_on_failure: bool = False,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    reuse_port: bool | None = None,
    drain_delay: float = 0.0,
    handoff: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> GracefulServer:
    """Start a protocol server, like ``loop.create_server``, that closes without losing data.

    ``protocol_factory()`` must return a :class:`GracefulProtocol`; its
    ``on_shutdown_notice()`` is the shutdown notice and its
    ``on_idle_timeout()`` the idle close. The options are those of
    :func:`start_server` (but ``on_notice``, which the protocol's hook
    replaces). Idle detection for protocols reads TCP_INFO's
    ``tcpi_last_data_recv``/``tcpi_last_data_sent`` (Linux TCP), so the
    user's ``data_received`` is never wrapped. Where it is missing (Unix
    sockets, other systems) nothing tells when data last moved: the hook is
    called every ``idle_timeout`` only if the protocol overrides
    ``on_idle_timeout`` (and keeps its own account); the default never
    closes a connection it cannot see.
    """
    if not callable(protocol_factory):
        raise TypeError(f"protocol_factory must be callable, got {type(protocol_factory).__name__}")
    return await _serve(
        None,
        protocol_factory,
        host,
        port,
        grace=grace,
        force_timeout=force_timeout,
        linger_timeout=linger_timeout,
        linger_idle_timeout=linger_idle_timeout,
        max_discard=max_discard,
        reset_on_failure=reset_on_failure,
        send_timeout=send_timeout,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=None,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=reuse_port,
        create_kwargs=dict(kwargs),
        drain_delay=drain_delay,
        handoff=handoff,
    )


async def start_unix_server(
    client_connected_cb: StreamHandler,
    path: str | os.PathLike[str] | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    linger_timeout: float = DEFAULT_TIMEOUT,
    linger_idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_discard: int | None = DEFAULT_MAX_DISCARD,
    reset_on_failure: bool = False,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    on_notice: NoticeHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    drain_delay: float = 0.0,
    handoff: str | os.PathLike[str] | None = None,
    limit: int = 2**16,
    **kwargs: Any,
) -> GracefulServer:
    """:func:`start_server` on a Unix stream socket at ``path``, like ``asyncio.start_unix_server``.

    The whole graceful behaviour holds there: on Linux, closing a Unix stream
    socket with unread data makes the peer's ``send()`` fail (``EPIPE``) and
    its ``recv()`` fail with ``ECONNRESET`` once what was queued is read, as
    a TCP reset does, so the lingering close is needed all the same. The
    options are :func:`start_server`'s (``reuse_port`` aside); ``handoff=``
    passes the Unix listening socket to a successor; other keywords go to
    ``loop.create_unix_server`` (``sock``, ``ssl``, ``start_serving``...).
    """
    if not callable(client_connected_cb):
        raise TypeError(
            "client_connected_cb must be a coroutine function, "
            f"got {type(client_connected_cb).__name__}"
        )
    if "reuse_port" in kwargs:
        raise TypeError("reuse_port is not an option of a Unix server")
    return await _serve(
        client_connected_cb,
        None,
        path,
        None,
        grace=grace,
        force_timeout=force_timeout,
        linger_timeout=linger_timeout,
        linger_idle_timeout=linger_idle_timeout,
        max_discard=max_discard,
        reset_on_failure=reset_on_failure,
        send_timeout=send_timeout,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=on_notice,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=None,
        create_kwargs={**kwargs, "limit": limit},
        drain_delay=drain_delay,
        handoff=handoff,
        unix=True,
    )


async def create_unix_server(
    protocol_factory: Callable[[], GracefulProtocol],
    path: str | os.PathLike[str] | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    linger_timeout: float = DEFAULT_TIMEOUT,
    linger_idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    max_discard: int | None = DEFAULT_MAX_DISCARD,
    reset_on_failure: bool = False,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_connections: int | None = None,
    on_reject: RejectHook | None = None,
    idle_timeout: float | None = None,
    backlog: int | None = None,
    drain_delay: float = 0.0,
    handoff: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> GracefulServer:
    """:func:`create_server` on a Unix stream socket at ``path``, like ``loop.create_unix_server``.

    See :func:`start_unix_server`; the options are :func:`create_server`'s.
    """
    if not callable(protocol_factory):
        raise TypeError(f"protocol_factory must be callable, got {type(protocol_factory).__name__}")
    if "reuse_port" in kwargs:
        raise TypeError("reuse_port is not an option of a Unix server")
    return await _serve(
        None,
        protocol_factory,
        path,
        None,
        grace=grace,
        force_timeout=force_timeout,
        linger_timeout=linger_timeout,
        linger_idle_timeout=linger_idle_timeout,
        max_discard=max_discard,
        reset_on_failure=reset_on_failure,
        send_timeout=send_timeout,
        max_connections=max_connections,
        on_reject=on_reject,
        on_notice=None,
        idle_timeout=idle_timeout,
        backlog=backlog,
        reuse_port=None,
        create_kwargs=dict(kwargs),
        drain_delay=drain_delay,
        handoff=handoff,
        unix=True,
    )
