"""h11's connection for the drop-ins: ``Connection: close`` on an answer the connection ends after.

Imported only by the drop-ins (uvicorn and hypercorn both speak HTTP/1.1 through h11).
"""

from __future__ import annotations

from typing import Final, overload

import h11

__all__ = ["CloseAwareConnection"]

_CLOSE: Final = (b"connection", b"close")


class CloseAwareConnection(h11.Connection):
    """h11's connection, adding ``Connection: close`` to an answer the connection ends after.

    That is when the answer starts while the request body is still arriving
    (an early answer: the rest of the body goes to the closer, bounded), and,
    once :attr:`close_wanted` is set (the shutdown notice, the client's FIN),
    when no further request is already buffered. h11 then knows the
    connection must close, and the server closes it after the answer.
    """

    close_wanted = False

    def wants_close(self) -> bool:
        """Whether answers should close the connection now (:attr:`close_wanted`)."""
        return self.close_wanted

    @overload
    def send(self, event: h11.ConnectionClosed) -> None: ...
    @overload
    def send(
        self,
        event: h11.Request | h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage,
    ) -> bytes: ...
    @overload
    def send(self, event: h11.Event) -> bytes | None: ...

    def send(self, event: h11.Event) -> bytes | None:
        if type(event) is h11.Response and (
            self.their_state is h11.SEND_BODY or (self.wants_close() and not self.trailing_data[0])
        ):
            headers = [(k, v) for k, v in event.headers if k != b"connection"]
            headers.append(_CLOSE)
            event = h11.Response(
                status_code=event.status_code,
                headers=headers,
                reason=event.reason,
                http_version=event.http_version,
            )
        return super().send(event)
