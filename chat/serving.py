"""uvicorn, set up for a server that streams: a header read timeout and a bounded graceful shutdown.

- `TimedH11Protocol` closes a connection whose request headers are not complete within
  `header_timeout` seconds (uvicorn has no such timeout: a client that sends half a request
  line keeps its connection forever).
- `GracefulServer` calls `on_shutdown` (the engine's drain: open answers end with "the server is
  restarting") as soon as shutdown begins and stops accepting connections; a moment later it
  closes the connections still open (the page's queue stream never ends by itself), so their
  requests see their client gone; uvicorn then gives what is left `timeout_graceful_shutdown`
  seconds before cancelling it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("vlchat")


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    header_timeout: float = 15.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers."""
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        """Stop the clock once a request's headers are in; start it when a new request begins."""
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            if self._header_timer is None:
                self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        """A kept-alive connection with a partial next request is timed too."""
        super().on_response_complete()
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """No timer outlives its connection."""
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection from %s: request headers not complete in %gs", self.client,
                      self.header_timeout)
            self.transport.close()


def timed_protocol(header_timeout: float) -> type[TimedH11Protocol]:
    """A `TimedH11Protocol` class with this header deadline (uvicorn takes a class as `http=`)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": float(header_timeout)})


class GracefulServer(uvicorn.Server):
    """A uvicorn server that drains, then closes what is left, then stops within its grace time."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None = None,
                 settle_seconds: float = 1.0) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown
        self.settle_seconds = settle_seconds

    async def shutdown(self, sockets=None) -> None:
        """Drain (open streams get their last event), stop accepting, close what is left, then uvicorn's."""
        if self.on_shutdown is not None:
            try:  # off the event loop: ending a request may write its result to the database
                await asyncio.to_thread(self.on_shutdown)
            except Exception:  # the rest of the shutdown must happen whatever this did
                log.exception("draining open requests failed")
        for server in self.servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + self.settle_seconds
        while self.server_state.tasks and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # time for the drained streams' last words
        # Streams that never end by themselves (the page's queue stream) see their client go away,
        # as when a tab closes: the app ends them quietly, with no cancellation traceback.
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
        await super().shutdown(sockets)


def make_server(app, host: str, port: int, *, grace_seconds: float, header_timeout: float,
                on_shutdown: Callable[[], None] | None = None) -> GracefulServer:
    """The configured server for `app`."""
    # proxy_headers=False: the client address is the connection's own. uvicorn would otherwise take
    # X-Forwarded-For from any local process as the truth (the login throttle counts by address).
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", proxy_headers=False,
                            http=timed_protocol(header_timeout), timeout_graceful_shutdown=grace_seconds)
    return GracefulServer(config, on_shutdown, settle_seconds=min(1.0, grace_seconds / 2))


def quiet_signals_after_run() -> None:
    """uvicorn re-raises the signal that stopped it once it returns; make that a no-op.

    Otherwise SIGTERM's default action would kill the process before the engine stops and the
    database closes, and the exit status would be -15 instead of 0.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: log.debug("signal %d after the server stopped", signum))
