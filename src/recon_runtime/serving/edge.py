"""The ASGI middleware at the edge of the app: the API key, request metrics by route and status,
refused bodies drained before their answer, and the answer of a request the shutdown cuts off."""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from fastapi.responses import JSONResponse

from .errors import SHUTDOWN_RETRY_S, SHUTTING_DOWN, StreamAborted, retry_after
from .page import is_public
from .service import ADMISSION, STATUS_OVERRIDE, Service

_LOGGER = logging.getLogger(__name__)

REFUSED_BODY_DRAIN_BYTES = 64 * 2**20
"""How much of a refused request's body is read and discarded before the refusal is sent, so a client
that sends its whole body before it reads (urllib, http.client) reads the refusal instead of a reset
(closing with unread data resets the connection). 64 MiB: the default --max-body-mb, so a drain costs
no more than one accepted upload; a body that declares more is not drained (the connection closes)."""
REFUSED_BODY_DRAIN_S = 5.0
"""The longest a drain may take (nginx's lingering_timeout); past it the connection closes."""
REFUSED_BODY_IDLE_S = 1.0
"""A drain ends when nothing arrives for this long (Apache lingers 2 s per read): the client is not
sending its body but waiting for the answer, which then comes at once, closing the connection."""


_CUT_SHORT: contextvars.ContextVar[bool] = contextvars.ContextVar("recon_cut_short", default=False)
"""Set in a request's task when the app ends an answer that has begun without its end, on purpose
(an aborted stream, a shutdown): the host's own line about it is then not logged (ours was)."""
INCOMPLETE_RESPONSE = "ASGI callable returned without completing response."


class _QuietCutShort(logging.Filter):
    """Drops uvicorn's "returned without completing response" line for answers the app cut short on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == INCOMPLETE_RESPONSE and _CUT_SHORT.get())


QUIET_CUT_SHORT = _QuietCutShort()
"""Installed on uvicorn's error log by `create_app` (once per process)."""


def _warn_without_protocol() -> None:
    """Warn once when this process serves the app without `recon-run serve`'s HTTP protocol: its
    request-head and send timeouts and its lingering close then do not apply (docs/serving.md)."""
    module = sys.modules.get("recon_runtime.serving.http_protocol")
    if module is None or not getattr(module, "connections_served", 0):
        _LOGGER.warning(
            "this host does not serve the app with recon_runtime.serving.http_protocol: the header and send timeouts "
            "do not apply (uvicorn: --http recon_runtime.serving.http_protocol:HeadTimeoutH11Protocol; docs/serving.md)"
        )


class Edge:
    """ASGI middleware: API key on every route but /healthz and the page, and request metrics by route and status."""

    def __init__(self, app: Any, service: Service, routes: Sequence[Any] = (), check_protocol: bool = True):
        self.app = app
        self.service = service
        self.routes = routes
        key = service.config.api_key
        self._key = key.encode() if key else None
        self._draining = 0
        self._protocol_checked = not check_protocol  # a host that cannot run it is not told to

    async def _refuse_websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The service has no WebSocket route: a WebSocket handshake gets 401 (without the API key) or
        404, as JSON where the host can send an HTTP answer to a handshake, else it is closed."""
        await receive()  # websocket.connect
        if self._key is not None and not self._authorised(scope):
            status, error = 401, "missing or wrong API key: send the header Authorization: Bearer <key>"
        else:
            status, error = 404, "no WebSocket endpoint here: the service speaks plain HTTP (POST /v1/...)"
        if "websocket.http.response" in scope.get("extensions", {}):
            body = json.dumps({"error": error}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        else:
            await send({"type": "websocket.close", "code": 1008})
        label = self._route_of({**scope, "type": "http", "method": "GET"})
        self.service.metrics.requests.labels(label, str(status)).inc()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, receive, send)
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        if not self._protocol_checked:
            self._protocol_checked = True
            _warn_without_protocol()
        started = time.perf_counter()
        status = 500
        responded = False  # the response's start line went out
        body = _Body(scope, receive)
        receive = body.receive

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                if not body.done:
                    message = await self._before_answering_early(message, body)
                status = message["status"]
                await send(message)
                responded = True
                return
            await send(message)

        try:
            if self._key is not None and not self._public(scope["path"]) and not self._authorised(scope):
                response = JSONResponse(
                    {"error": "missing or wrong API key: send the header Authorization: Bearer <key>"},
                    401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        except StreamAborted as e:
            # the status went out with the first part: returning without the final chunk makes the
            # server drop the connection, so the client cannot take the truncated body as complete
            _LOGGER.warning("%s %s: stream aborted (%d): %s", scope.get("method"), scope["path"], e.status, e)
            _CUT_SHORT.set(True)
        except asyncio.CancelledError:
            # the host cut the request off (uvicorn, when --grace-s runs out on SIGTERM): answer what a
            # stopping server answers instead of letting the host send its plain-text 500
            scope[STATUS_OVERRIDE] = 503
            if responded:  # an answer under way: the connection drops without its end, said in one line
                _LOGGER.warning(
                    "%s %s: cut off by the shutdown after its answer began", scope.get("method"), scope["path"]
                )
                _CUT_SHORT.set(True)
                return
            _LOGGER.warning("%s %s: cut off by the shutdown (503)", scope.get("method"), scope["path"])
            body.done = True  # no drain: the server is going away, and says so at once
            headers = {**retry_after(SHUTDOWN_RETRY_S), "Connection": "close"}
            await JSONResponse({"error": SHUTTING_DOWN}, 503, headers=headers)(scope, receive, send_status)
        finally:
            release = scope.pop(ADMISSION, None)
            if release is not None:  # the answer is sent (or the request ended without one)
                release()
            status = scope.get(STATUS_OVERRIDE, status)
            route = scope.get("route")
            label = getattr(route, "path", None) or self._route_of(scope)
            m = self.service.metrics
            m.requests.labels(label, str(status)).inc()
            m.latency.labels(label).observe(time.perf_counter() - started)

    async def _before_answering_early(self, start: dict[str, Any], body: _Body) -> dict[str, Any]:
        """A response is about to start before the request's body was read (a refusal): read and
        discard the rest first, within REFUSED_BODY_DRAIN_BYTES / _S / IDLE_S, so that a client still
        sending reads the answer instead of a reset, as common HTTP servers do. Not drained (the
        connection then closes after the answer): a client that sent `Expect: 100-continue` and was
        not told to continue (it has not sent the body), a 408 (the client is too slow), a body that
        declares more than the bound, or more than --max-uploads drains at once."""
        drain = (
            start["status"] != 408
            and not (body.expects_continue and not body.asked)
            and body.declared_left <= REFUSED_BODY_DRAIN_BYTES
            and self._draining < self.service.config.max_uploads
        )
        if drain:
            self._draining += 1
            try:
                drain = await body.drain(REFUSED_BODY_DRAIN_BYTES, REFUSED_BODY_DRAIN_S, REFUSED_BODY_IDLE_S)
            finally:
                self._draining -= 1
        headers = list(start.get("headers", ()))
        if not drain and not any(k.lower() == b"connection" for k, _ in headers):
            start = {**start, "headers": [*headers, (b"connection", b"close")]}
        return start

    def _route_of(self, scope: dict[str, Any]) -> str:
        """The route a request would have reached (e.g. one refused with 401 before routing)."""
        from starlette.routing import Match

        for route in flat_routes(self.routes):
            try:
                match, _ = route.matches(scope)
            except Exception:  # noqa: BLE001 - a label, never an error
                continue
            if match != Match.NONE:
                return getattr(route, "path", None) or "unmatched"
        return "unmatched"

    @staticmethod
    def _public(path: str) -> bool:
        """Paths that need no key: /healthz, and the page at / with its assets (they hold no data)."""
        return path == "/healthz" or is_public(path)

    def _authorised(self, scope: dict[str, Any]) -> bool:
        assert self._key is not None
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.strip().partition(b" ")
        ok_scheme = scheme.lower() == b"bearer"  # the scheme is case-insensitive (RFC 9110)
        return hmac.compare_digest(token.strip(), self._key) and ok_scheme


def flat_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Every route of `routes` (an app's `app.routes`), those of its included routers among them
    (FastAPI 0.165 keeps an included `APIRouter` whole, as one route that answers for all of its own;
    earlier versions copy its routes)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from flat_routes(inner.routes)
        else:
            yield route


class _Body:
    """Wraps an ASGI `receive`: how much of the request body has arrived, and whether all of it."""

    def __init__(self, scope: dict[str, Any], receive: Any):
        self._receive = receive
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        # only HTTP/1.1 clients wait for `100 Continue` (h11 never sends one to an HTTP/1.0 client)
        expect = headers.get(b"expect", b"").strip().lower() == b"100-continue"
        self.expects_continue = expect and scope.get("http_version") == "1.1"
        try:
            self.declared: int | None = int(headers[b"content-length"])
        except (KeyError, ValueError):
            self.declared = None
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self.done = not chunked and not self.declared  # no body to read
        self.asked = False
        self.received = 0

    @property
    def declared_left(self) -> int:
        """Bytes of a Content-Length body not read yet (0 for a chunked one: its length is unknown)."""
        return max(0, (self.declared or 0) - self.received)

    async def receive(self) -> dict[str, Any]:
        self.asked = True
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = self.done or not message.get("more_body", False)
        elif message["type"] == "http.disconnect":
            self.done = True
        return message

    async def drain(self, max_bytes: int, max_s: float, idle_s: float) -> bool:
        """Read and discard the rest of the body; True if it all arrived within the bounds (at most
        `max_bytes` in `max_s`, and no pause of `idle_s`)."""

        async def rest() -> None:
            start = self.received
            while not self.done and self.received - start <= max_bytes:
                await asyncio.wait_for(self.receive(), idle_s)

        try:
            await asyncio.wait_for(rest(), max_s)
        except asyncio.TimeoutError:
            return False
        return self.done
