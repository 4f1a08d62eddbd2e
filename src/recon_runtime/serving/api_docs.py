"""The API docs at `/docs` (Swagger UI) and `/redoc` (ReDoc), their scripts served by the app.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on an offline machine `/docs` is
blank. The `serve` extra installs `fastapi-offline`, which ships swagger-ui-dist 5 and ReDoc 2 as
package data: the pages here load them from `/docs/assets/` (nothing from another origin). Without
that package the pages fall back to FastAPI's CDN scripts, and the server says so once at start.
Every path here needs the API key when one is set, like the schema at `/openapi.json`.
"""

from __future__ import annotations

import importlib.util
import logging
from importlib.resources import files
from pathlib import Path
from typing import Final

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

_LOGGER = logging.getLogger(__name__)

DOCS_PATH: Final = "/docs"
REDOC_PATH: Final = "/redoc"
ASSETS_PATH: Final = "/docs/assets"
ASSETS_PACKAGE: Final = "fastapi_offline"
"""The installed package whose `static/` holds swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js."""
ASSET_FILES: Final = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
NO_ASSETS: Final = (
    "fastapi-offline is not installed: /docs and /redoc load their scripts from a CDN (blank on an offline "
    "machine; /openapi.json works): install the `serve` extra (pip install '.[serve]' in the clone)"
)


def assets_dir() -> Path | None:
    """Where the installed `fastapi-offline` keeps the docs' scripts, or None without it (or them)."""
    if importlib.util.find_spec(ASSETS_PACKAGE) is None:
        return None
    folder = Path(str(files(ASSETS_PACKAGE).joinpath("static")))
    return folder if all((folder / name).is_file() for name in ASSET_FILES) else None


def mount_docs(app: FastAPI) -> None:
    """Add `/docs`, its OAuth2 redirect and `/redoc` to `app` (made with `docs_url=None, redoc_url=None`),
    with the scripts from `assets_dir()` at ASSETS_PATH; without them, FastAPI's CDN scripts."""
    assets = assets_dir()
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url
    title = app.title
    if assets is None:
        _LOGGER.warning("%s", NO_ASSETS)
        swagger: dict[str, str] = {}
        redoc: dict[str, str] = {}
    else:
        app.mount(ASSETS_PATH, StaticFiles(directory=assets), name="docs-assets")
        favicon = f"{ASSETS_PATH}/favicon.png"
        swagger = {
            "swagger_js_url": f"{ASSETS_PATH}/swagger-ui-bundle.js",
            "swagger_css_url": f"{ASSETS_PATH}/swagger-ui.css",
            "swagger_favicon_url": favicon,
        }
        redoc = {"redoc_js_url": f"{ASSETS_PATH}/redoc.standalone.js", "redoc_favicon_url": favicon}

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{title} - Swagger UI",
            oauth2_redirect_url=root + redirect_url if redirect_url else None,
            swagger_ui_parameters=app.swagger_ui_parameters,
            **{k: root + v for k, v in swagger.items()},
        )

    if redirect_url:

        @app.get(redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc_page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{title} - ReDoc",
            with_google_fonts=assets is None,  # offline: the system's fonts
            **{k: root + v for k, v in redoc.items()},
        )
