"""`/docs` (Swagger UI) and `/redoc` (ReDoc) with their assets served from the package
(app/static/docs, see its README.md), never from a CDN: the pages work offline.

Like every route but `/healthz`, the pages, `/openapi.json` and the assets need a key when
MERGEPROBE_API_KEYS is set (app/middleware.py), as FastAPI's own docs routes did.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

DOCS_ASSETS_DIR = Path(__file__).resolve().parent / "static" / "docs"
DOCS_ASSETS_PATH = "/static/docs"
SWAGGER_JS = "swagger-ui/swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui/swagger-ui.css"
FAVICON = "swagger-ui/favicon-32x32.png"
REDOC_JS = "redoc/redoc.standalone.js"

# Every script, style and image of the pages is one of the files above or inline. ReDoc 2 shows
# a logo from its vendor's CDN in the sidebar: img-src keeps the browser from fetching it (ReDoc
# then leaves it out). Scripts and styles are left alone (both UIs use inline ones).
DOCS_CSP = "img-src 'self' data: blob:; font-src 'self' data:"

# mimetypes answers from the system's tables (/etc/mime.types), which differ between hosts.
_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".md": "text/markdown; charset=utf-8",
}
_TEXT = "text/plain; charset=utf-8"  # LICENSE, NOTICE, SHA256SUMS, *.LICENSE.txt


class DocsAssets(StaticFiles):
    """The vendored files, each with a fixed content type; revalidated by ETag on every use."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        if response.status_code != 304:
            response.headers["content-type"] = _MEDIA_TYPES.get(Path(full_path).suffix, _TEXT)
        response.headers["cache-control"] = "no-cache"
        response.headers["x-content-type-options"] = "nosniff"
        return response


def install_docs(app: FastAPI) -> None:
    """Adds /docs, /redoc and the assets (the app is created with docs_url=None, redoc_url=None)."""
    app.mount(DOCS_ASSETS_PATH, DocsAssets(directory=DOCS_ASSETS_DIR), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        # Same-origin paths under the app's root path (behind a proxy that strips a prefix).
        root = request.scope.get("root_path", "").rstrip("/")
        return f"{root}{app.openapi_url}", f"{root}{DOCS_ASSETS_PATH}"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        openapi_url, assets = urls(request)
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/{SWAGGER_JS}",
            swagger_css_url=f"{assets}/{SWAGGER_CSS}",
            swagger_favicon_url=f"{assets}/{FAVICON}",
            # No "valid" badge: Swagger UI would send the document to validator.swagger.io for it.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers["content-security-policy"] = DOCS_CSP
        return page

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        openapi_url, assets = urls(request)
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets}/{REDOC_JS}",
            redoc_favicon_url=f"{assets}/{FAVICON}",
            with_google_fonts=False,
        )
        page.headers["content-security-policy"] = DOCS_CSP
        return page
