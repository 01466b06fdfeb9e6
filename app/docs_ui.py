"""`/docs` (Swagger UI) and `/redoc` (ReDoc) with their assets served from the package
(app/static/docs, see its README.md), never from a CDN: the pages work offline.

The pages and their assets are public (app/middleware.py): they hold nothing secret, and a
browser's navigation cannot send a Bearer header. `/openapi.json` stays behind the key: the pages
fetch it with the key the console keeps in this origin's localStorage (`mergeprobe.key`, entered
at `/`). Swagger UI adds it to every request it sends (a requestInterceptor; the bearer scheme of
the document's Authorize button, kept with persistAuthorization, takes precedence). ReDoc would
fetch `spec-url` itself, without headers: the page fetches the document with the key and hands
it to `Redoc.init` instead (rather than letting a cookie authorise /openapi.json: the download
cookie stays limited to files and artifacts).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from fastapi import FastAPI, Request
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
        title = html.escape(f"{app.title} - Swagger UI")
        options = {
            "url": openapi_url,
            "dom_id": "#swagger-ui",
            "layout": "BaseLayout",
            "deepLinking": True,
            "showExtensions": True,
            "showCommonExtensions": True,
            "persistAuthorization": True,
            # No "valid" badge: Swagger UI would send the document to validator.swagger.io for it.
            "validatorUrl": None,
        }
        page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link type="text/css" rel="stylesheet" href="{assets}/{SWAGGER_CSS}">
<link rel="shortcut icon" href="{assets}/{FAVICON}">
<title>{title}</title>
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/{SWAGGER_JS}"></script>
<script>
{_KEY_JS}
const ui = SwaggerUIBundle(Object.assign({_js(options)}, {{
  requestInterceptor: (request) => {{
    const key = mergeprobeKey();
    if (key && !request.headers.Authorization) request.headers.Authorization = "Bearer " + key;
    return request;
  }},
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
}}));
</script>
</body>
</html>
"""
        return HTMLResponse(page, headers={"content-security-policy": DOCS_CSP})

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        openapi_url, assets = urls(request)
        title = html.escape(f"{app.title} - ReDoc")
        page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="shortcut icon" href="{assets}/{FAVICON}">
<title>{title}</title>
<style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
<noscript>ReDoc requires JavaScript to function. Please enable it to browse the documentation.</noscript>
<div id="redoc"></div>
<script src="{assets}/{REDOC_JS}"></script>
<script>
{_KEY_JS}
(async () => {{
  const root = document.getElementById("redoc");
  const key = mergeprobeKey();
  const response = await fetch({_js(openapi_url)}, {{ headers: key ? {{ Authorization: "Bearer " + key }} : {{}} }});
  if (!response.ok) {{
    root.textContent = response.status === 401
      ? "This service needs a key: enter it in the console (" + {_js(request.scope.get("root_path", "").rstrip("/") + "/")} + ") first, then reload."
      : "The API document could not be loaded (HTTP " + response.status + ").";
    return;
  }}
  Redoc.init(await response.json(), {{}}, root);
}})();
</script>
</body>
</html>
"""
        return HTMLResponse(page, headers={"content-security-policy": DOCS_CSP})


# The key the console keeps (app/static/console/api.js), same origin.
_KEY_JS = """function mergeprobeKey() {
  try { return localStorage.getItem("mergeprobe.key") || ""; } catch { return ""; }
}"""


def _js(value: object) -> str:
    """A value as a JavaScript literal that is safe inside <script>."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
