"""Running the app under uvicorn with the settings that keep slow and hostile clients bounded.

uvicorn (0.55) parses HTTP with h11 and bounds a request's headers (``h11_max_incomplete_event_size``), the open
connections (``limit_concurrency``: more get 503) and idle keep-alive connections (``timeout_keep_alive``), but it
has no deadline for a request's headers: a client that sends a request line and then nothing holds its connection
(and a ``limit_concurrency`` slot) for ever. :class:`HeaderTimeoutH11Protocol` adds that deadline on top of
uvicorn's own h11 protocol — no HTTP parsing of its own: a connection whose next request's headers are not complete
``header_timeout`` seconds after it opened (or after its previous response) is closed. Request bodies have their
deadline in the app (``ServeConfig.body_timeout`` → 408).

:class:`Server` cancels the engine's running and queued jobs as soon as shutdown starts (SIGTERM, Ctrl-C), so
in-flight requests end at once — streams with an error event, waiting requests with 503 — instead of running to
completion.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Largest request line + headers (h11's buffer for an incomplete event); larger gets uvicorn's 400.
MAX_HEADER_BYTES = 16 * 1024


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers (``header_timeout`` seconds)."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request's headers are complete: the app's deadlines apply
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this connection has the same deadline

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": float(seconds)})


class Server(uvicorn.Server):
    """uvicorn's server; ``on_shutdown`` runs as soon as shutdown starts (before uvicorn waits for connections)."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Any = None) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        await super().shutdown(sockets)


def make_server(
    app: Any,
    *,
    engine: Any = None,
    max_connections: int = 256,
    header_timeout: float = 10.0,
    keep_alive_timeout: float = 5.0,
    log_level: str = "info",
    graceful_timeout: float = 5.0,
) -> Server:
    """A :class:`Server` for ``app`` with the connection limits and timeouts; on shutdown it marks the app as
    stopping and cancels ``engine``'s jobs."""
    config = uvicorn.Config(
        app,
        http=protocol_with_header_timeout(header_timeout),
        log_level=log_level,
        limit_concurrency=max_connections,
        timeout_keep_alive=keep_alive_timeout,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=graceful_timeout,
    )

    def stop() -> None:
        state = getattr(getattr(app, "state", None), "serve", None)
        if state is not None:
            state.stopping = True
        cancel = getattr(engine, "cancel_all", None)
        if cancel is not None:
            cancel()

    return Server(config, on_shutdown=stop)
