"""A drop-in for gunicorn's uvicorn workers: the same names, aiograceful's ends.

Use it as::

    gunicorn -k aiograceful.gunicorn.UvicornWorker app:app      # was uvicorn_worker.UvicornWorker
    gunicorn -k aiograceful.gunicorn.UvicornH11Worker app:app   # asyncio's loop and h11

The classes subclass uvicorn-worker's (``uvicorn_worker.UvicornWorker``, the
workers uvicorn moved out of ``uvicorn.workers``, which warns at import and
is deprecated): gunicorn's configuration, logging, TLS options and
``max_requests`` reach uvicorn as there. What changes:

* The connections are served by :mod:`aiograceful.uvicorn`'s protocols
  ("auto": :class:`~aiograceful.uvicorn.HttpToolsProtocol` where httptools is
  installed, else :class:`~aiograceful.uvicorn.H11Protocol`): lingering
  closes, the ``Connection: close`` notice, the quiet window of an idle
  keep-alive connection.
* The worker runs :class:`aiograceful.uvicorn.Server`, whose shutdown (on
  SIGTERM: a SIGHUP reload, the arbiter's stop, ``max_requests``) is the
  library's one order: notice, ``drain_delay``, stop accepting, grace, force,
  let go. The listeners are gunicorn's, shared by every worker and held by
  the arbiter: each worker accepts what is queued when it stops and closes
  only its own descriptor, with no SYN filter (that would turn connections
  away from the other workers).
* gunicorn's ``graceful_timeout`` is the budget of the whole shutdown, so
  that the arbiter never SIGKILLs a worker in the middle of a close::

      room  = graceful_timeout - shutdown_margin
      force = min(force_timeout, room / 2)
      drain = min(drain_delay, room - force)
      grace = room - force - drain

  ``shutdown_margin`` (:data:`SHUTDOWN_MARGIN`, 5 s) covers the order's own
  short waits (up to about 4 s: the cancelled tasks' last answers,
  ``connection_lost``, the tasks' end) and the lifespan shutdown and exit.
  With gunicorn's defaults (30 s) the grace is 24 s and the force 1 s.
* The worker keeps its heartbeat (``notify()``) while it shuts down, so
  that the arbiter's ``timeout`` does not kill a worker that is draining.

The knobs are class attributes (``force_timeout``, ``drain_delay``,
``shutdown_margin``); subclass to change them and pass the subclass to
``-k``. Tested with gunicorn 23.0 and 27.0 and uvicorn-worker 0.4 (the
``aiograceful[gunicorn]`` extra); an older one fails the import, naming
it (uvicorn-worker 0.3 cannot start uvicorn 0.54's loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import math
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Final

try:
    import uvicorn_worker
    from gunicorn.arbiter import Arbiter
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "aiograceful.gunicorn needs gunicorn and uvicorn-worker: "
        "pip install 'aiograceful[gunicorn]' (or: pip install gunicorn uvicorn-worker)"
    ) from exc

from uvicorn.config import Config

from . import uvicorn as graceful_uvicorn
from ._server import DEFAULT_FORCE_TIMEOUT

__all__ = [
    "MINIMUM_VERSIONS",
    "SHUTDOWN_MARGIN",
    "UvicornH11Worker",
    "UvicornWorker",
    "shutdown_budget",
]

#: The oldest versions tested: (distribution, version).
MINIMUM_VERSIONS: Final = (("gunicorn", (23, 0)), ("uvicorn-worker", (0, 4)))


def _check_versions() -> None:
    for name, oldest in MINIMUM_VERSIONS:
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # importable without metadata (a checkout): nothing to compare
        parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
        if parts < oldest:
            raise ImportError(
                f"aiograceful.gunicorn needs {name}>={'.'.join(map(str, oldest))} "
                f"(found {found}): pip install 'aiograceful[gunicorn]'"
            )


_check_versions()

#: Seconds of gunicorn's ``graceful_timeout`` kept for what the shutdown's
#: phases do not bound: its own short waits (about 4 s at most), the
#: lifespan shutdown and the process's exit.
SHUTDOWN_MARGIN: Final = 5.0
#: The longest wait between two heartbeats while a worker shuts down.
_BEAT: Final = 1.0


def shutdown_budget(
    graceful_timeout: float,
    *,
    force_timeout: float = DEFAULT_FORCE_TIMEOUT,
    drain_delay: float = 0.0,
    margin: float = SHUTDOWN_MARGIN,
) -> tuple[float, float, float]:
    """``(drain_delay, grace, force_timeout)`` that fit ``graceful_timeout`` with ``margin``.

    ``room = graceful_timeout - margin``; the force gets at most half of it,
    the drain delay at most what the force leaves, the grace the rest:
    their sum is ``room`` (0 when the margin takes it all).
    """
    room = max(0.0, graceful_timeout - margin)
    force = min(force_timeout, room / 2)
    drain = min(drain_delay, room - force)
    return drain, room - force - drain, force


class _Server(graceful_uvicorn.Server):
    """aiograceful's uvicorn Server with a fixed grace and a heartbeat while it shuts down."""

    def __init__(
        self,
        config: Config,
        *,
        budget: tuple[float, float, float],
        heartbeat: Callable[[], None],
        beat: float,
    ) -> None:
        drain, grace, force = budget
        super().__init__(config, force_timeout=force, drain_delay=drain)
        self._grace = grace
        self._heartbeat = heartbeat
        self._beat = beat

    @property
    def grace(self) -> float:
        """The grace that fits gunicorn's ``graceful_timeout`` (see :func:`shutdown_budget`)."""
        return self._grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The shared order (:class:`aiograceful.uvicorn.Server`), beating the heart meanwhile."""
        beating = asyncio.ensure_future(self._beating())
        try:
            await super().shutdown(sockets)
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

    async def _beating(self) -> None:
        # The shutdown is bounded by the budget and the margin; past that the
        # arbiter's own timeout may judge the worker stuck, as it should.
        total = self.drain_delay + self._grace + self.force_timeout + SHUTDOWN_MARGIN
        for _ in range(math.ceil(total / self._beat) + 1):
            self._heartbeat()
            await asyncio.sleep(self._beat)


class UvicornWorker(uvicorn_worker.UvicornWorker):  # type: ignore[misc]  # untyped base
    """``uvicorn_worker.UvicornWorker`` serving through aiograceful (see the module's notes).

    ``gunicorn -k aiograceful.gunicorn.UvicornWorker app:app``. Class
    attributes: ``force_timeout`` (the linger of what is open when the grace
    ends), ``drain_delay`` (seconds the worker still accepts after the
    notice), ``shutdown_margin`` (see :func:`shutdown_budget`).
    """

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "auto",
        "http": graceful_uvicorn.protocol_class("auto"),
    }
    force_timeout: ClassVar[float] = DEFAULT_FORCE_TIMEOUT
    drain_delay: ClassVar[float] = 0.0
    shutdown_margin: ClassVar[float] = SHUTDOWN_MARGIN

    def run(self) -> None:
        """Serve until SIGTERM (or ``max_requests``), then shut down within ``graceful_timeout``."""
        with asyncio.Runner(loop_factory=self.config.get_loop_factory()) as runner:
            runner.run(self.serve())

    async def serve(self) -> None:
        """The worker's server: aiograceful's, on gunicorn's listeners."""
        self.config.app = self.wsgi
        budget = shutdown_budget(
            float(self.cfg.graceful_timeout),
            force_timeout=self.force_timeout,
            drain_delay=self.drain_delay,
            margin=self.shutdown_margin,
        )
        # self.timeout is the arbiter's timeout halved (0: no timeout).
        beat = min(_BEAT, self.timeout / 2) if self.timeout > 0 else _BEAT
        server = _Server(self.config, budget=budget, heartbeat=self.notify, beat=beat)
        # As uvicorn-worker does: SIGQUIT (gunicorn's quick stop) to the worker.
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGQUIT, self.handle_exit, signal.SIGQUIT, None)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


class UvicornH11Worker(UvicornWorker):
    """``uvicorn_worker.UvicornH11Worker``'s choice (asyncio's loop, h11), served by aiograceful."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "asyncio",
        "http": graceful_uvicorn.H11Protocol,
    }
