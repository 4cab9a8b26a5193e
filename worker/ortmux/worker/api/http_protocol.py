"""The HTTP/1.1 connection the OpenAI-compatible API is served on: uvicorn's h11 protocol with a
request-header timeout, which uvicorn lacks.

uvicorn holds a connection that sends nothing, or trickles the bytes of its request headers, for
as long as the client likes: its keep-alive timer runs only between requests and any byte received
stops it. Here a timer runs from the moment a connection is made, and again from the end of each
response on a kept-alive connection; the headers of the next request must be parsed before it
fires, or the connection is closed. The same timer bounds how long the rest of a refused request's
body (a 413 answered before the body was read) is read and dropped after the answer.

Kept from uvicorn: h11's cap of 16 KiB on a request's headers (a longer head is answered 400 and
the connection closed) and the keep-alive timeout between requests. The body's size and time are
bounded by the application (``openai_http``), which knows the limits of each route. Under TLS the
handshake comes first, bounded by asyncio's own handshake timeout.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 16 * 1024  # h11's default, passed to uvicorn explicitly


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request headers do not arrive within
    ``header_timeout`` seconds. Use :func:`header_timeout_protocol` for a class with its own
    timeout (uvicorn creates the protocol from the class, one instance per connection)."""

    header_timeout: float = 10.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers were parsed: its cycle has begun
            self._disarm()

    def on_response_complete(self) -> None:
        # Armed before uvicorn looks at a pipelined request, which disarms it at once.
        if not self.transport.is_closing():
            self._arm()
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """A :class:`HeaderTimeoutProtocol` class whose connections wait ``seconds`` for headers."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": seconds})
