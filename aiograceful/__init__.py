"""aiograceful: end asyncio TCP connections without losing data.

See README.md and the docs (docs/) for the hazards it exists for and how to use it.
"""

# First: it picks the compiled close path or the Python one (see _compiled),
# before any module of the close is imported.
from . import _compiled  # noqa: F401
from ._accept import DEFAULT_BACKLOG, AcceptQueueStats
from ._api import create_server, create_unix_server, start_server, start_unix_server
from ._handoff import listen_fds
from ._options import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_DISCARD,
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_TIMEOUT,
    UNSET,
    CloseOutcome,
    CloseResult,
    LingerOptions,
)
from ._protocol import GracefulProtocol
from ._server import DEFAULT_FORCE_TIMEOUT, DEFAULT_GRACE, GracefulServer
from ._shutdown import ShutdownNotice, ShutdownPhase
from ._state import HalfCloseState
from ._stats import ServerStats, ShutdownReport
from ._streams import abort, graceful_close
from ._versions import UntestedServerWarning

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_FORCE_TIMEOUT",
    "DEFAULT_GRACE",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_DISCARD",
    "DEFAULT_SEND_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "UNSET",
    "AcceptQueueStats",
    "CloseOutcome",
    "CloseResult",
    "GracefulProtocol",
    "GracefulServer",
    "HalfCloseState",
    "LingerOptions",
    "ServerStats",
    "ShutdownNotice",
    "ShutdownPhase",
    "ShutdownReport",
    "UntestedServerWarning",
    "abort",
    "create_server",
    "create_unix_server",
    "graceful_close",
    "listen_fds",
    "start_server",
    "start_unix_server",
]

__version__ = "0.1.0"
