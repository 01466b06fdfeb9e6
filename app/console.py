"""The browser console: `/` and its files under /static/console (plain ES modules, no build step,
nothing from a CDN). The page and its files hold nothing secret and load without a key, so that a
key can be entered; every API call the console makes carries it (app/middleware.py)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from app.docs_ui import DocsAssets

CONSOLE_DIR = Path(__file__).resolve().parent / "static" / "console"
CONSOLE_PATH = "/static/console"

# Everything the console loads is its own: scripts and styles from its files, images from the API
# (artifacts) or drawn in the page, requests to the API only.
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class ConsoleAssets(DocsAssets):
    """The console's files, with the docs' fixed media types (and HTML's), revalidated on every use."""

    def file_response(self, full_path, stat_result, scope, status_code=200):  # type: ignore[no-untyped-def]
        response = super().file_response(full_path, stat_result, scope, status_code)
        if response.status_code != 304 and str(full_path).endswith(".html"):
            response.headers["content-type"] = "text/html; charset=utf-8"
        response.headers["content-security-policy"] = CONSOLE_CSP
        return response


def install_console(app: FastAPI) -> None:
    app.mount(CONSOLE_PATH, ConsoleAssets(directory=CONSOLE_DIR), name="console-assets")

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(
            CONSOLE_DIR / "index.html",
            media_type="text/html; charset=utf-8",
            headers={
                "cache-control": "no-cache",
                "content-security-policy": CONSOLE_CSP,
                "x-content-type-options": "nosniff",
                "referrer-policy": "no-referrer",
            },
        )
