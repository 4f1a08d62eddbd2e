"""`create_app`: the one FastAPI app that `recon-run serve`, tests, gunicorn and Ray Serve run.

gunicorn: `gunicorn -k uvicorn.workers.UvicornWorker 'recon_runtime.serving.app:create_app()'`,
configured from `RECON_*` environment variables (`ServerConfig.from_env`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import ReconError
from .api_docs import mount_docs
from .config import ServerConfig
from .edge import QUIET_CUT_SHORT, Edge
from .errors import (
    CLIENT_GONE,
    ClientGone,
    HTTPError,
    PayloadTooLarge,
    error_message,
    error_status,
    is_precision_limit,
)
from .page import mount_page
from .routes import inference, probes
from .service import ReconstructorSource, Service

_LOGGER = logging.getLogger(__name__)


def create_app(
    config: ServerConfig | None = None,
    *,
    reconstructor: ReconstructorSource = None,
    on_load_error: Callable[[BaseException], None] | None = None,
    check_protocol: bool = True,
) -> FastAPI:
    """The service as a FastAPI app.

    Args:
        config: settings (default: `ServerConfig.from_env()`).
        reconstructor: a loaded `Reconstructor` (or a callable that returns one, called on the
            loading thread) to serve instead of loading `config.model`. Its settings (e.g.
            `bucket_frames`) then define the outputs.
        on_load_error: called (on the loading thread) if the model fails to load; `recon-run serve`
            stops the server with it.
        check_protocol: warn once, at the first request, when the host does not serve the app with
            `http_protocol` (its header and send timeouts then do not apply). False for hosts that
            cannot run it, where the warning's uvicorn flag would be wrong advice (Ray Serve's proxy).
    """
    config = config or ServerConfig.from_env()
    service = Service(config, reconstructor, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="audioldm2-recon",
        version=__version__,
        summary="AudioLDM2's VAE + HiFi-GAN vocoder: reconstruct, encode and decode audio.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from `mount_docs`: their scripts served here, not from a CDN
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(Edge, service=service, routes=app.router.routes, check_protocol=check_protocol)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if QUIET_CUT_SHORT not in uvicorn_log.filters:
        uvicorn_log.addFilter(QUIET_CUT_SHORT)
    install_error_handlers(app)
    app.include_router(probes)
    app.include_router(inference)
    mount_page(app)  # the listening page at /, its assets, and /v1/compare for it
    mount_docs(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error a route raises becomes one JSON line `{"error": ...}` with its status: the service's
    own (`HTTPError`, 413, 499), the runtime's (`error_status`), the framework's (404, 405, 422), and
    anything else as a logged 500 that names no internals."""

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the metrics record 499

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(request: Request, e: PayloadTooLarge) -> JSONResponse:
        return JSONResponse({"error": str(e)}, 413)

    @app.exception_handler(ReconError)
    async def _recon_error(request: Request, e: ReconError) -> JSONResponse:
        status = error_status(e)
        if status >= 500:
            _LOGGER.error("request failed: %s", e)
        elif is_precision_limit(e):
            _LOGGER.warning("request refused (422): %s", error_message(e))
        return JSONResponse({"error": error_message(e)}, status)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return JSONResponse({"error": problems or "invalid request"}, 422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        _LOGGER.exception("unexpected error")
        return JSONResponse({"error": "internal error"}, 500)
