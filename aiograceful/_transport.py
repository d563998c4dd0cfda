"""A transport view for the drop-ins: the server's own ``close()`` calls become lingering closes.

uvicorn's and aiohttp's protocols (and their request objects) call
``transport.close()`` in many places. Rather than override each one, the
drop-in hands the protocol a :class:`ClosingView` of its transport: the same
transport, except that ``close()`` goes to the drop-in's closer.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

__all__ = ["Closer", "ClosingView"]


class Closer(Protocol):
    """What a :class:`ClosingView` closes through."""

    @property
    def closing(self) -> bool:
        """True once the close has begun (writes are dropped from then on)."""
        ...

    def close(self) -> None:
        """Begin the lingering close (idempotent)."""
        ...


class ClosingView(asyncio.Transport):
    """What a server's protocol sees as its transport, so that its every ``close()`` is graceful.

    Everything goes to the real transport, except ``close()``, which starts
    the connection's lingering close, and ``is_closing()``, which is true from
    then on (uvicorn checks it before arming its keep-alive timer, say).
    Writes after the close are dropped: the closer has half-closed already.
    """

    __slots__ = ("_end", "_raw")

    def __init__(self, raw: asyncio.Transport, end: Closer) -> None:
        super().__init__()
        self._raw = raw
        self._end = end

    def close(self) -> None:
        self._end.close()

    def is_closing(self) -> bool:
        return self._end.closing or self._raw.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._end.closing:
            self._raw.write(data)

    def writelines(self, list_of_data: Any) -> None:
        if not self._end.closing:
            self._raw.writelines(list_of_data)

    def abort(self) -> None:
        self._raw.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._raw.get_extra_info(name, default)

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def pause_reading(self) -> None:
        if not self._end.closing:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._raw.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._raw.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._raw.can_write_eof()

    def write_eof(self) -> None:
        self._raw.write_eof()

    def __repr__(self) -> str:
        return f"<ClosingView closing={self.is_closing()} {self._raw!r}>"
