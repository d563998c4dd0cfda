"""aiograceful.uvicorn's protocol with a 1 MiB discard cap, as a subclass (for ``--http``)."""

from __future__ import annotations

from typing import ClassVar

from aiograceful import LingerOptions
from aiograceful import uvicorn as graceful_uvicorn


class H11Protocol(graceful_uvicorn.H11Protocol):
    """The drop-in, lingering over at most 1 MiB of unread body."""

    linger: ClassVar[LingerOptions] = LingerOptions(max_discard=1 << 20)
