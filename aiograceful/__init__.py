"""aiograceful: end asyncio TCP connections without losing data.

See the README for the hazards this library exists for and how to use it.
"""

from ._linger import (
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
from ._server import (
    DEFAULT_BACKLOG,
    DEFAULT_FORCE_TIMEOUT,
    DEFAULT_GRACE,
    AcceptQueueStats,
    GracefulServer,
    ShutdownReport,
    create_server,
    start_server,
)
from ._state import HalfCloseState
from ._streams import abort, graceful_close

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
    "ShutdownReport",
    "abort",
    "create_server",
    "graceful_close",
    "start_server",
]

__version__ = "0.1.0"
