"""aiograceful: end asyncio TCP connections without losing data.

See the README for the hazards this library exists for and how to use it.
"""

from ._linger import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_DISCARD,
    DEFAULT_TIMEOUT,
    UNSET,
    CloseOutcome,
    CloseResult,
    LingerOptions,
)
from ._protocol import GracefulProtocol
from ._state import HalfCloseState
from ._streams import abort, graceful_close

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_DISCARD",
    "DEFAULT_TIMEOUT",
    "UNSET",
    "CloseOutcome",
    "CloseResult",
    "GracefulProtocol",
    "HalfCloseState",
    "LingerOptions",
    "abort",
    "graceful_close",
]

__version__ = "0.1.0"
