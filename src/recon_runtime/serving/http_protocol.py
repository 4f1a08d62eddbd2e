"""`recon-run serve`'s HTTP/1.1 protocol: uvicorn's h11 protocol with connection timeouts and JSON errors.

What uvicorn alone does not bound, this protocol does, per connection:

- **The request head.** uvicorn closes idle keep-alive connections, but a connection that sends its
  request head slowly (a byte a second) is never closed. A connection whose head (request line and
  headers) has not arrived within `header_timeout_s` of the connection opening or of the previous
  response ending is closed: silently if nothing of it came, else with a 408.
- **Writes the client does not read.** uvicorn has no write timeout: a client that never reads its
  answer holds the connection, the request (and its admission slot) and what was written for as
  long as it likes. A connection whose writes stay paused (the transport's buffer over its high-water
  mark, the client reading nothing) for `send_timeout_s` is dropped, and what it held is freed.
- **Closing on a client that is still sending.** Closing a socket with unread data makes the kernel
  reset the connection, and the client may never read the answer (a refusal sent before the body,
  to a client that sent `Expect: 100-continue` and then its body anyway, as RFC 9110 allows). When
  the server closes a connection whose request body has not all arrived, it first sends its answer
  and a FIN, then reads and discards what still comes for at most LINGER_S (LINGER_IDLE_S without a
  byte ends it), as nginx's and Apache's lingering close do.
- A malformed or oversized head gets uvicorn's 400 as JSON (`{"error": ...}`, as every other error
  of the server) instead of plain text.

`recon-run serve` passes `with_timeouts(header_timeout_s, send_timeout_s)` to uvicorn and so pins the
h11 implementation (uvicorn's `auto` would pick httptools where it is installed). Other uvicorn hosts
pass `--http recon_runtime.serving.http_protocol:HeadTimeoutH11Protocol`, which reads both timeouts from
`ServerConfig.from_env()` once, when uvicorn loads the class at start-up (a bad RECON_* value fails
the start, not each connection). The app warns once when a host serves it without this protocol.

It extends uvicorn's H11Protocol through internals that are not uvicorn's public API (its
constructor's arguments, `conn`, `transport`, `loop`, `flow`, `on_response_complete`,
`send_400_response`, the flow-control callbacks), so the `serve` extra pins the uvicorn and h11
versions it was tested with, and importing this module fails with one line when they are missing.
Needs the `serve` extra (uvicorn, h11).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_MESSAGE = "the request head did not arrive within {:g} s"
INVALID_REQUEST_MESSAGE = "invalid HTTP request (malformed, or its head is over 16 KiB)"
TESTED_UVICORN = "0.54"
"""The uvicorn release this protocol was tested with (the `serve` extra pins it)."""
LINGER_S = 5.0
"""The longest a lingering close reads and discards (as long as the server drains a refused body
before answering, REFUSED_BODY_DRAIN_S: a refused body costs at most that much reading either way)."""
LINGER_IDLE_S = 2.0
"""A lingering close ends when nothing arrives for this long (Apache lingers 2 s per read): long
enough for a client that sends its body after waiting 1 s for `100 Continue`, as curl does."""

_USES = {
    "__init__": ("config", "loop", "logger", "conn", "server_state", "transport", "flow"),
    "connection_made": ("transport", "flow"),
    "data_received": ("conn", "handle_events"),
    "on_response_complete": ("transport", "conn", "flow"),
    "send_400_response": ("conn", "transport"),
    "connection_lost": ("cycle", "conn", "flow", "transport"),
    "pause_writing": ("flow",),
    "resume_writing": ("flow",),
}
"""What this module overrides of H11Protocol, and the attributes it relies on each method to use."""


def _check_uvicorn() -> None:
    """Fail at import, in one line, when uvicorn's h11 protocol no longer has what this module extends."""
    missing = []
    params = list(inspect.signature(H11Protocol.__init__).parameters)[1:4]
    if params != ["config", "server_state", "app_state"]:
        missing.append("__init__(config, server_state, app_state)")
    for method, attributes in _USES.items():
        code = getattr(getattr(H11Protocol, method, None), "__code__", None)
        if code is None:
            missing.append(f"{method}()")
        else:
            missing += [f"{method}: self.{a}" for a in attributes if a not in code.co_names]
    if missing:
        raise ImportError(
            f"uvicorn {uvicorn.__version__}'s h11 protocol lacks {', '.join(missing)}: recon-run serve's HTTP "
            f"protocol needs uvicorn {TESTED_UVICORN} (pip install 'uvicorn=={TESTED_UVICORN}.*', as the `serve` extra pins it)"
        )


_check_uvicorn()

connections_served = 0
"""Connections this process served with the protocol (the app warns when a host serves it without)."""


def _json_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with the server's JSON error body."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: `close()` lingers while the client may still be
    sending its body (see the module docstring); everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, protocol: TimeoutsH11Protocol):
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol._close()

    def is_closing(self) -> bool:
        return self._protocol._lingering is not None or self._transport.is_closing()


class TimeoutsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout, a write-stall timeout, a lingering close
    and JSON 400s (see the module docstring). `with_timeouts` sets the two timeouts."""

    header_timeout_s: float = 10.0
    """Seconds a request head may take (ServerConfig.header_timeout_s)."""
    send_timeout_s: float = 30.0
    """Seconds the connection's writes may stay paused before it is dropped (ServerConfig.send_timeout_s)."""

    def __init__(self, *args: Any, **kwargs: Any):
        global connections_served
        super().__init__(*args, **kwargs)
        connections_served += 1
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._lingering: asyncio.TimerHandle | None = None  # the lingering close's timer while it lingers
        self._linger_ends = 0.0
        self._raw: asyncio.Transport | None = None

    # ------------------------------------------------------------------ the request head
    # a head is awaited while the server has not started answering a request: before the first one,
    # and after each response until the next request's head is parsed
    def _awaiting_head(self) -> bool:
        return self.conn.our_state in (h11.IDLE, h11.DONE) and not self.transport.is_closing()

    def _watch_head(self) -> None:
        if not self._awaiting_head():
            self._stop_head_timer()
        elif self._head_timer is None:
            # what h11 holds of the next head already counts (part of it may have come with the last request)
            self._head_bytes = len(self.conn.trailing_data[0])
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head():
            return
        if self._head_bytes or self.conn.trailing_data[0]:  # part of a head came: say why the connection closes
            message = HEAD_TIMEOUT_MESSAGE.format(self.header_timeout_s)
            self.transport.write(_json_response(408, "Request Timeout", message))
            self.logger.info("closing a connection: %s", message)
        self.transport.close()

    # ------------------------------------------------------------------ writes the client does not read
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        self._stop_stall_timer()
        super().resume_writing()

    def _stop_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _send_timed_out(self) -> None:
        self._stall_timer = None
        self.logger.info("closing a connection: its client read nothing of the answer for %g s", self.send_timeout_s)
        assert self._raw is not None
        self._raw.abort()  # drops what is buffered; the app's writes end (uvicorn sees a disconnect)

    # ------------------------------------------------------------------ closing
    def _close(self) -> None:
        """uvicorn closes the connection: linger first if the client may still be sending its body."""
        raw = self._raw
        assert raw is not None
        if self._lingering is not None or raw.is_closing():
            return
        still_sending = self.conn.their_state is h11.SEND_BODY
        if not still_sending or not raw.can_write_eof():
            raw.close()
            return
        self._stop_head_timer()
        self._linger_ends = self.loop.time() + LINGER_S
        self._lingering = self.loop.call_later(LINGER_IDLE_S, self._linger_done)
        raw.write_eof()  # the answer, then a FIN: the client reads it while it still sends
        raw.resume_reading()

    def _linger_done(self) -> None:
        assert self._raw is not None
        self._lingering = None
        self._raw.close()

    def _keep_lingering(self) -> None:
        assert self._lingering is not None
        self._lingering.cancel()
        wait = min(LINGER_IDLE_S, self._linger_ends - self.loop.time())
        self._lingering = self.loop.call_later(max(0.0, wait), self._linger_done)

    # ------------------------------------------------------------------ uvicorn's protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:  # read and discarded
            self._keep_lingering()
            return
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_stall_timer()
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a head h11 cannot parse (malformed, or over its 16 KiB), as JSON."""
        self._stop_head_timer()
        self.transport.write(_json_response(400, "Bad Request", INVALID_REQUEST_MESSAGE))
        self.transport.close()


def with_timeouts(header_timeout_s: float, send_timeout_s: float) -> type[TimeoutsH11Protocol]:
    """The protocol class with its timeouts set, for `uvicorn.Config(http=...)`."""
    for name, value in (("header timeout", header_timeout_s), ("send timeout", send_timeout_s)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"the {name} must be a positive number of seconds, got {value}")
    settings = {"header_timeout_s": float(header_timeout_s), "send_timeout_s": float(send_timeout_s)}
    return type("TimeoutsH11Protocol", (TimeoutsH11Protocol,), settings)


_from_env: type[TimeoutsH11Protocol] | None = None


def __getattr__(name: str) -> Any:
    """`HeadTimeoutH11Protocol`: the protocol with the timeouts of `ServerConfig.from_env()`, read once
    per process when a host first asks for it (uvicorn does at start-up: `--http
    recon_runtime.serving.http_protocol:HeadTimeoutH11Protocol`)."""
    global _from_env
    if name != "HeadTimeoutH11Protocol":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _from_env is None:
        from .config import ServerConfig

        config = ServerConfig.from_env()
        _from_env = with_timeouts(config.header_timeout_s, config.send_timeout_s)
    return _from_env
