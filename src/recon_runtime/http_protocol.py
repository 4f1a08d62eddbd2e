"""`recon-run serve`'s HTTP/1.1 protocol: uvicorn's h11 protocol with a request-head timeout and JSON errors.

uvicorn closes idle keep-alive connections, but a connection that sends its request head slowly
(a byte a second) is never closed, so a few such clients hold connections (and memory) for as long
as they like. This protocol closes a connection whose request head (request line and headers) has
not arrived within `header_timeout_s` of the connection opening or of the previous response ending:
silently if nothing of it came, else with a 408. A malformed or oversized head gets uvicorn's 400
as JSON (`{"error": ...}`, as every other error of the server) instead of plain text.

`recon-run serve` passes `with_header_timeout(seconds)` to uvicorn and so pins the h11
implementation (uvicorn's `auto` would pick httptools where it is installed). Other uvicorn hosts
can pass `--http recon_runtime.http_protocol:HeadTimeoutH11Protocol`, which reads the timeout from
RECON_HEADER_TIMEOUT_S (`ServerConfig.from_env`). Needs the `serve` extra (uvicorn, h11).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_MESSAGE = "the request head did not arrive within {:g} s"
INVALID_REQUEST_MESSAGE = "invalid HTTP request (malformed, or its head is over 16 KiB)"


def _json_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with the server's JSON error body."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout and JSON 400s (see the module docstring)."""

    header_timeout_s: float | None = None
    """Seconds a request head may take; None: RECON_HEADER_TIMEOUT_S or ServerConfig's default."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.header_timeout_s is None:
            from .server import ServerConfig

            self.header_timeout_s = ServerConfig.from_env().header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    # a head is awaited while the server has not started answering a request: before the first one,
    # and after each response until the next request's head is parsed
    def _awaiting_head(self) -> bool:
        return self.conn.our_state in (h11.IDLE, h11.DONE) and not self.transport.is_closing()

    def _watch_head(self) -> None:
        if not self._awaiting_head():
            self._stop_head_timer()
        elif self._head_timer is None:
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(self.header_timeout_s or 0.0, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head():
            return
        if self._head_bytes:  # part of a head came: say why the connection closes
            message = HEAD_TIMEOUT_MESSAGE.format(self.header_timeout_s)
            self.transport.write(_json_response(408, "Request Timeout", message))
            self.logger.info("closing a connection: %s", message)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a head h11 cannot parse (malformed, or over its 16 KiB), as JSON."""
        self._stop_head_timer()
        self.transport.write(_json_response(400, "Bad Request", INVALID_REQUEST_MESSAGE))
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeadTimeoutH11Protocol]:
    """The protocol class with its request-head timeout set, for `uvicorn.Config(http=...)`."""
    if not seconds > 0:
        raise ValueError("the header timeout must be positive")
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,), {"header_timeout_s": float(seconds)})
