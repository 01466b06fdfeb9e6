"""/docs and /redoc load Swagger UI and ReDoc from the package (app/static/docs), never a CDN."""

from __future__ import annotations

import hashlib
import re

import pytest
from fastapi.testclient import TestClient

from app.docs_ui import DOCS_ASSETS_DIR, DOCS_ASSETS_PATH, FAVICON, REDOC_JS, SWAGGER_CSS, SWAGGER_JS
from app.main import create_app
from mergeprobe.service.settings import Settings

ASSETS = {
    SWAGGER_JS: "text/javascript; charset=utf-8",
    SWAGGER_CSS: "text/css; charset=utf-8",
    FAVICON: "image/png",
    REDOC_JS: "text/javascript; charset=utf-8",
}


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    """The app without Redis: the pages and the assets need none."""
    settings = Settings(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path_factory.mktemp("docs"))
    return TestClient(create_app(settings))


def _asset_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize(
    "page,assets",
    [("/docs", {SWAGGER_JS, SWAGGER_CSS, FAVICON}), ("/redoc", {REDOC_JS, FAVICON})],
)
def test_pages_load_only_same_origin_assets(app_client, page, assets):
    response = app_client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.search(r"https?://", html), re.findall(r"https?://\S+", html)
    assert "//" not in "".join(_asset_urls(html)), _asset_urls(html)  # no protocol-relative URLs either
    assert sorted(_asset_urls(html)) == sorted(f"{DOCS_ASSETS_PATH}/{a}" for a in assets)
    assert "fonts.googleapis" not in html
    # Images only from the app itself: ReDoc's sidebar logo would come from its vendor's CDN.
    assert "img-src 'self' data: blob:" in response.headers["content-security-policy"]
    # Every asset the page names is served.
    for url in _asset_urls(html):
        assert app_client.get(url).status_code == 200, url


def test_swagger_ui_loads_the_document_and_asks_no_validator(app_client):
    html = app_client.get("/docs").text
    assert '"url": "/openapi.json"' in html
    assert '"validatorUrl": null' in html  # else Swagger UI sends the document to validator.swagger.io
    # The console's key goes with every request Swagger UI sends (the document's fetch too), and
    # what the Authorize button is given is kept across reloads.
    assert "requestInterceptor" in html and 'localStorage.getItem("mergeprobe.key")' in html
    assert '"persistAuthorization": true' in html


def test_redoc_loads_the_document_with_the_key(app_client):
    html = app_client.get("/redoc").text
    assert "spec-url" not in html  # ReDoc would fetch it without the key
    assert 'fetch("/openapi.json"' in html and "Redoc.init(" in html
    assert 'localStorage.getItem("mergeprobe.key")' in html


def test_pages_honour_the_root_path(tmp_path):
    settings = Settings(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    with TestClient(create_app(settings), root_path="/mergeprobe") as client:
        html = client.get("/docs").text
    assert f"/mergeprobe{DOCS_ASSETS_PATH}/{SWAGGER_JS}" in html and "/mergeprobe/openapi.json" in html
    with TestClient(create_app(settings), root_path="/mergeprobe") as client:
        html = client.get("/mergeprobe/redoc").text
    assert f"/mergeprobe{DOCS_ASSETS_PATH}/{REDOC_JS}" in html and 'fetch("/mergeprobe/openapi.json"' in html


@pytest.mark.parametrize("asset", sorted(ASSETS))
def test_assets_are_served_with_their_content_type(app_client, asset):
    response = app_client.get(f"{DOCS_ASSETS_PATH}/{asset}")
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSETS[asset]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (DOCS_ASSETS_DIR / asset).read_bytes()
    # Revalidated on every use: a new version of the package never meets a stale cached asset.
    assert response.headers["cache-control"] == "no-cache"
    again = app_client.get(f"{DOCS_ASSETS_PATH}/{asset}", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and not again.content


def test_unknown_assets_are_404_problems(app_client):
    for path in ("swagger-ui/nope.js", "../main.py", "..%2Fmain.py", ""):
        response = app_client.get(f"{DOCS_ASSETS_PATH}/{path}")
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"


def test_the_default_cdn_pages_are_gone(app_client):
    """FastAPI's own /docs (and its OAuth2 redirect page, for an auth the API does not use) are off."""
    assert app_client.get("/docs/oauth2-redirect").status_code == 404
    assert app_client.app.docs_url is None and app_client.app.redoc_url is None
    paths = app_client.get("/openapi.json").json()["paths"]
    assert not {"/docs", "/redoc"} & set(paths) and not any(p.startswith("/static") for p in paths)


def test_vendored_files_match_their_checksums():
    """The files are the npm packages' own bytes (app/static/docs/README.md says how to update)."""
    listed = {}
    for line in (DOCS_ASSETS_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    on_disk = {
        str(p.relative_to(DOCS_ASSETS_DIR))
        for p in DOCS_ASSETS_DIR.rglob("*")
        if p.is_file() and p.name not in ("SHA256SUMS", "README.md")
    }
    assert set(listed) == on_disk
    for name, digest in listed.items():
        assert hashlib.sha256((DOCS_ASSETS_DIR / name).read_bytes()).hexdigest() == digest, name
    # The licenses travel with the code.
    assert "Apache License" in (DOCS_ASSETS_DIR / "swagger-ui" / "LICENSE").read_text()
    assert "MIT License" in (DOCS_ASSETS_DIR / "redoc" / "LICENSE").read_text()
    readme = (DOCS_ASSETS_DIR / "README.md").read_text()
    assert "swagger-ui-dist` | 5.35.0" in readme and "`redoc` | 2.5.4" in readme
    assert 'PACKAGE_VERSION:"5.35.0"' in (DOCS_ASSETS_DIR / SWAGGER_JS).read_text()
    assert 'Version: "2.5.4"' in (DOCS_ASSETS_DIR / "redoc" / "redoc.standalone.js.LICENSE.txt").read_text()


@pytest.mark.parametrize("auth", [True, False])
def test_docs_pages_are_public_the_document_is_not(tmp_path, auth):
    """A browser's navigation cannot send a Bearer header: with MERGEPROBE_API_KEYS set the pages
    and their assets still load (they hold nothing secret) and fetch the document with the key;
    /openapi.json itself answers 401 without one."""
    settings = Settings(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path, api_keys="k1" if auth else "")
    with TestClient(create_app(settings)) as client:
        for path in ("/docs", "/redoc", f"{DOCS_ASSETS_PATH}/{SWAGGER_JS}", f"{DOCS_ASSETS_PATH}/{REDOC_JS}"):
            assert client.get(path).status_code == 200, path
        assert client.get("/openapi.json").status_code == (401 if auth else 200)
        assert client.get("/openapi.json", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_console_csp_allows_images_from_s3_redirects(tmp_path):
    """With S3 downloads by redirect, artifacts (<img>) come from the bucket's endpoint."""
    from app.console import console_csp

    def img_src(**fields) -> str:
        settings = Settings(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path, **fields)
        with TestClient(create_app(settings)) as client:
            csp = client.get("/").headers["content-security-policy"]
        assert csp == console_csp(settings) and "'unsafe-inline'" not in csp
        return next(d for d in csp.split(";") if d.strip().startswith("img-src")).strip()

    s3 = {"artifacts_backend": "s3", "s3_bucket": "b", "s3_endpoint_url": "http://minio:9000/"}
    assert img_src() == "img-src 'self' data: blob:"
    assert img_src(**s3) == "img-src 'self' data: blob:"  # proxied: the API streams them
    assert img_src(**s3, s3_downloads="redirect") == "img-src 'self' data: blob: http://minio:9000"
    public = {"s3_public_endpoint_url": "https://s3.example.com:8443/x"}
    assert img_src(**s3, **public, s3_downloads="redirect").endswith(" https://s3.example.com:8443")
