"""The close options the server drop-ins share (uvicorn, hypercorn, aiohttp).

Defined once here; each drop-in re-exports the ones it uses under the same
public names (``aiograceful.uvicorn.LINGER`` is ``aiograceful.aiohttp.LINGER``).
No server is imported here.
"""

from __future__ import annotations

from typing import Final

from ._options import LingerOptions

__all__ = [
    "IDLE_LINGER",
    "LINGER",
    "SHUTDOWN_QUIET",
    "WEBSOCKET_CLOSE_CODE",
    "WEBSOCKET_CLOSE_TIMEOUT",
]

#: The lingering close of a connection that ends with a request in it.
LINGER: Final = LingerOptions()
#: The close of an idle keep-alive connection (keep-alive timeout, end of the
#: quiet window, a half-closed idle client). Nothing of ours is unread there,
#: and a pooled client reads (and so sends its FIN) only when it next uses the
#: connection: a short wait for that FIN, then a plain close, not a RST.
IDLE_LINGER: Final = LingerOptions(timeout=5.0, idle_timeout=0.5, reset_on_failure=False)
#: Seconds an idle keep-alive connection stays open after the shutdown notice,
#: so that a request already on the wire is answered (nginx's
#: ``keepalive_min_timeout`` is the precedent).
SHUTDOWN_QUIET: Final = 1.0
#: The close code an open WebSocket gets at the shutdown notice: 1001, going
#: away (RFC 6455, 7.4.1). uvicorn's own is 1012 (service restart), hypercorn's
#: 1011 (internal error, after its grace); aiohttp sends none.
WEBSOCKET_CLOSE_CODE: Final = 1001
#: Seconds a WebSocket waits, after its close frame, for the client's close
#: frame back; then the lingering close begins anyway.
WEBSOCKET_CLOSE_TIMEOUT: Final = 2.0
