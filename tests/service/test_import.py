"""Import jobs against real sources: an HTTP server and an S3-compatible server (moto) started here,
one real worker for the module, real checkpoint files.

The HTTP server serves a directory under routes that behave as sources do: plainly (`/files/`),
through redirects (`/moved/`, and `/moved-away/` to a host the worker may not fetch from), without a
Content-Length (`/chunked/`), breaking off early (`/short/`) and trickling (`/slow/`).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mergeprobe.service.model_import import AllowedSources, ImportSource
from mergeprobe.service.settings import Settings
from tests.conftest import AWS_TEST_ENV, install_model, running_service, wait_for, wait_for_job

boto3 = pytest.importorskip("boto3")

PROBLEM = "application/problem+json"
_PIECE = 64 * 1024


class _SourceServer(ThreadingHTTPServer):
    daemon_threads = True
    trickle_dropped: threading.Event  # set when a client hangs up on /slow/

    def handle_error(self, request, client_address) -> None:
        """Clients that stop reading (an import over the size cap, a cancel) are expected here."""


class _SourceHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked transfers need it
    server: _SourceServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass

    def do_GET(self) -> None:
        route, _, name = self.path.lstrip("/").partition("/")
        file = Path(self.directory) / name
        if route == "files":
            self.path = "/" + name
            super().do_GET()
        elif route == "moved":
            self._redirect(f"/files/{name}")
        elif route == "moved-away":
            # The same server by another name: not in the worker's MERGEPROBE_IMPORT_ALLOWED_HOSTS.
            self._redirect(f"http://localhost:{self.server.server_address[1]}/files/{name}")
        elif route == "chunked":
            self._send_chunked(file.read_bytes())
        elif route == "short":
            data = file.read_bytes()
            self._start(len(data) + 1000)  # announces more than it sends, then hangs up
            self.wfile.write(data)
        elif route == "slow":
            self._trickle(file.read_bytes())
        else:
            self.send_error(404)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _start(self, length: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()

    def _send_chunked(self, data: bytes) -> None:
        self._start(None)
        for i in range(0, len(data), _PIECE):
            piece = data[i : i + _PIECE]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _trickle(self, data: bytes) -> None:
        """4 KiB every 20 ms: the tiny checkpoint takes about 40 s, far longer than a cancel."""
        self._start(len(data))
        try:
            for i in range(0, len(data), 4096):
                self.wfile.write(data[i : i + 4096])
                self.wfile.flush()
                time.sleep(0.02)
        except OSError:
            self.server.trickle_dropped.set()


@dataclass
class Sources:
    http: str  # http://127.0.0.1:port
    served: Path
    s3_endpoint: str
    bucket: str
    s3: object  # a boto3 client of the bucket
    trickle_dropped: threading.Event  # set when a client hangs up on /slow/


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_models, s3_endpoint):
    served = tmp_path_factory.mktemp("served")
    for key in ("sd1", "sd1-b", "sd2"):
        install_to = served / tiny_models[key].name
        install_to.write_bytes(tiny_models[key].read_bytes())
    (served / "notes.safetensors").write_bytes(b"these are notes, not tensors\n" * 100)
    server = _SourceServer(("127.0.0.1", 0), functools.partial(_SourceHandler, directory=str(served)))
    server.trickle_dropped = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = s3_endpoint
    bucket = f"models-{secrets.token_hex(4)}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=bucket)
    try:
        http = f"http://127.0.0.1:{server.server_address[1]}"
        yield Sources(http, served, endpoint, bucket, s3, server.trickle_dropped)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Importer:
    client: object
    models_dir: Path
    size_cap: int


@pytest.fixture(scope="module")
def importer(redis_url, tmp_path_factory, tiny_models, sources):
    """One API and one worker that may fetch from the HTTP server (as 127.0.0.1) and the bucket.
    The worker's size cap is twice the served models', and `big.safetensors` one byte over it."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    size_cap = 2 * max(p.stat().st_size for p in sources.served.iterdir())
    with open(sources.served / "big.safetensors", "wb") as big:
        big.truncate(size_cap + 1)
    allowed = f"127.0.0.1,s3://{sources.bucket}"
    with running_service(redis_url, tmp_path_factory.mktemp("import") / "data") as svc:
        install_model(svc, tiny_models["sd1"], "installed.safetensors")
        svc.start_worker(
            **AWS_TEST_ENV,
            MERGEPROBE_S3_ENDPOINT_URL=sources.s3_endpoint,
            MERGEPROBE_S3_REGION="us-east-1",
            MERGEPROBE_MAX_UPLOAD_BYTES=str(size_cap),
            MERGEPROBE_IMPORT_ALLOWED_HOSTS=allowed,
        )
        with TestClient(create_app(svc.settings(import_allowed_hosts=allowed))) as client:
            yield Importer(client, svc.models_dir, size_cap)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_names(client) -> set[str]:
    return {m["name"] for m in client.get("/v1/models").json()["models"]}


def _imported_bytes(client) -> float:
    (line,) = [
        x for x in client.get("/metrics").text.splitlines() if x.startswith("mergeprobe_import_bytes_total ")
    ]
    return float(line.split()[1])


def _temp_files(importer: Importer) -> list[Path]:
    return sorted(importer.models_dir.glob(".partial-*"))


def _imported(importer: Importer, body: dict) -> dict:
    response = importer.client.post("/v1/jobs/import", json=body)
    assert response.status_code == 202, response.text
    return wait_for_job(importer.client, response.json()["id"], timeout=120)


@pytest.mark.parametrize(
    ("route", "file", "expect_sha256"),
    [
        ("moved", "tiny-sd1-a.safetensors", True),  # a redirect; the expected sha256 in capitals
        ("chunked", "tiny-sd2-a.safetensors", False),  # no Content-Length: progress total unknown
    ],
)
def test_an_http_import_adds_the_file_to_the_library(importer, sources, route, file, expect_sha256):
    source = sources.served / file
    sha256 = _sha256(source)
    url = f"{sources.http}/{route}/{file}"
    body = {"url": url, **({"sha256": sha256.upper()} if expect_sha256 else {})}
    imported_before = _imported_bytes(importer.client)
    job = _imported(importer, body)
    assert job["status"] == "succeeded", job["error"]
    assert job["inputs"] == {"name": file, "sha256": sha256 if expect_sha256 else None}
    result = job["result"]
    model_id = file.removesuffix(".safetensors")
    assert result["model"] == {
        "id": model_id,
        "name": file,
        "sha256": sha256,
        "short_hash": sha256[:10],
        "url": f"/v1/models/{model_id}",
        "download_url": f"/v1/models/{model_id}/file",
    }
    assert result["sha256"] == sha256 and result["size_bytes"] == source.stat().st_size
    assert result["source"] == url and result["seconds"] > 0 and result["bytes_per_second"] > 0
    listed = importer.client.get(result["model"]["url"]).json()
    assert listed["sha256"] == sha256 and listed["arch"] in ("sd1", "sd2")
    assert importer.client.get(result["model"]["download_url"]).content == source.read_bytes()
    assert _imported_bytes(importer.client) == imported_before + source.stat().st_size
    assert _temp_files(importer) == []


FAILURES = [
    # (route/file, extra request fields, status, problem type, field, words of the detail)
    (
        "files/tiny-sd1-b.safetensors",
        {"sha256": "0" * 64},
        409,
        "sha256-mismatch",
        "sha256",
        "nothing was stored",
    ),
    ("files/notes.safetensors", {}, 400, "invalid-checkpoint", "url", "header length"),
    ("files/big.safetensors", {}, 413, "import-too-large", "url", "MERGEPROBE_MAX_UPLOAD_BYTES"),
    ("chunked/big.safetensors", {}, 413, "import-too-large", "url", "MERGEPROBE_MAX_UPLOAD_BYTES"),
    ("short/tiny-sd1-b.safetensors", {}, 502, "import-source-failed", "url", "transfer ended after"),
    ("files/missing.safetensors", {}, 502, "import-source-failed", "url", "404"),
    ("moved-away/tiny-sd1-b.safetensors", {}, 400, "import-source-not-allowed", "url", "redirected to"),
]


@pytest.mark.parametrize(
    ("path", "extra", "status", "slug", "field", "words"),
    [pytest.param(*case, id=case[0]) for case in FAILURES],
)
def test_a_failed_import_stores_nothing(importer, sources, path, extra, status, slug, field, words):
    name = f"failed-{secrets.token_hex(3)}.safetensors"
    job = _imported(importer, {"url": f"{sources.http}/{path}", "name": name, **extra})
    assert job["status"] == "failed", job
    error = job["error"]
    assert (error["status"], error["type"].rsplit("/", 1)[-1], error["field"]) == (status, slug, field), error
    assert words in error["detail"], error
    assert name not in _model_names(importer.client)
    assert not (importer.models_dir / name).exists() and _temp_files(importer) == []


def test_an_s3_import_reads_the_bucket_with_the_workers_credentials(importer, sources, tiny_models):
    source = tiny_models["sd1-b"]
    sources.s3.put_object(Bucket=sources.bucket, Key="sd15/team/blend.safetensors", Body=source.read_bytes())
    job = _imported(importer, {"url": f"s3://{sources.bucket}/sd15/team/blend.safetensors"})
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["model"]["name"] == "blend.safetensors"
    assert job["result"]["sha256"] == _sha256(source)
    assert importer.client.get("/v1/models/blend").json()["sha256"] == _sha256(source)

    missing = _imported(importer, {"url": f"s3://{sources.bucket}/sd15/nothing.safetensors"})
    assert missing["status"] == "failed", missing
    assert missing["error"]["type"].endswith("/import-source-failed") and missing["error"]["status"] == 502
    assert "no object 'sd15/nothing.safetensors'" in missing["error"]["detail"]
    assert _temp_files(importer) == []


def test_a_canceled_import_stops_the_download_and_leaves_no_file(importer, sources):
    client = importer.client
    source = sources.served / "tiny-sd1-b.safetensors"
    response = client.post(
        "/v1/jobs/import", json={"url": f"{sources.http}/slow/{source.name}", "name": "slow.safetensors"}
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    def downloading():
        progress = client.get(f"/v1/jobs/{job_id}").json()["progress"]
        return progress["stage"] == "downloading" and progress["completed"] > 0 and progress

    progress = wait_for(downloading, timeout=60)
    assert progress["total"] == source.stat().st_size
    assert _temp_files(importer), "the download goes to a temp file in the library"
    client.delete(f"/v1/jobs/{job_id}")
    job = wait_for_job(client, job_id, timeout=30)
    assert job["status"] == "canceled", job
    assert sources.trickle_dropped.wait(10), "the worker did not hang up on the source"
    assert "slow.safetensors" not in _model_names(client) and _temp_files(importer) == []


SUBMISSION_ERRORS = [
    # (request, status, field, problem type)
    ({"url": "ftp://127.0.0.1/x.safetensors"}, 400, "url", "unsupported-url-scheme"),
    ({"url": "file:///etc/passwd", "name": "x.safetensors"}, 400, "url", "unsupported-url-scheme"),
    ({"url": "http://user:hunter2@127.0.0.1/x.safetensors"}, 400, "url", "credentials-in-url"),
    ({"url": "http://127.0.0.1:99999/x.safetensors"}, 400, "url", "invalid-url"),
    ({"url": "http://127.0.0.1/a b.safetensors"}, 400, "url", "invalid-url"),
    ({"url": "https://example.com/x.safetensors"}, 400, "url", "import-source-not-allowed"),
    ({"url": "http://127.0.0.1.example.com/x.safetensors"}, 400, "url", "import-source-not-allowed"),
    ({"url": "s3://other-bucket/x.safetensors"}, 400, "url", "import-source-not-allowed"),
    ({"url": "s3://Bad_Bucket/x.safetensors"}, 400, "url", "invalid-url"),
    (
        {"url": "http://127.0.0.1/x.safetensors", "name": "../x.safetensors"},
        400,
        "name",
        "invalid-model-name",
    ),
    ({"url": "http://127.0.0.1/download?id=3"}, 400, "name", "invalid-model-name"),
    ({"url": "http://127.0.0.1/x.safetensors", "name": "installed.safetensors"}, 409, "name", "model-exists"),
    ({"url": "http://127.0.0.1/installed.ckpt"}, 409, "name", "model-exists"),
    ({"url": "http://127.0.0.1/x.safetensors", "sha256": "abc"}, 422, "sha256", "validation-error"),
    ({"url": "http://127.0.0.1/x.safetensors", "headers": {"a": "b"}}, 422, "headers", "validation-error"),
]


@pytest.mark.parametrize(("body", "status", "field", "slug"), SUBMISSION_ERRORS, ids=lambda v: str(v)[:60])
def test_bad_imports_are_refused_at_submission(importer, body, status, field, slug):
    client = importer.client
    before = client.get("/v1/jobs", params={"kind": "import"}).json()["jobs"]
    response = client.post("/v1/jobs/import", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert (problem["field"], problem["type"].rsplit("/", 1)[-1]) == (field, slug), problem
    assert "hunter2" not in response.text
    assert client.get("/v1/jobs", params={"kind": "import"}).json()["jobs"] == before


def test_allowed_hosts_match_whole_labels_and_exact_addresses():
    allowed = AllowedSources.of(
        Settings(import_allowed_hosts=" huggingface.co, .mirror.example ,10.0.0.5,s3://team")
    )

    def allows(scheme: str, host: str) -> bool:
        return allowed.allows(ImportSource(f"{scheme}://{host}/x", scheme, host, "/x"))

    assert allows("https", "huggingface.co") and allows("https", "cdn-lfs.huggingface.co")
    assert not allows("https", "evilhuggingface.co") and not allows("https", "huggingface.co.evil")
    assert allows("http", "a.mirror.example") and allows("http", "mirror.example")
    assert allows("http", "10.0.0.5") and not allows("http", "110.0.0.5") and not allows("http", "0.0.5")
    assert not allows("http", "a.10.0.0.5")  # a DNS name under an address resolves anywhere
    assert allows("s3", "team") and not allows("s3", "huggingface.co") and not allows("https", "team")
    assert AllowedSources.of(Settings(import_allowed_hosts="")).allows(
        ImportSource("s3://b/k", "s3", "b", "k")
    )


def test_malformed_urls_and_metadata_services_are_refused_at_submission(importer):
    """Found in review: an unclosed IPv6 bracket was a 500; the cloud metadata service (instance
    credentials) may not be imported from unless listed, even when no list is set."""
    from mergeprobe.service.errors import InvalidInput
    from mergeprobe.service.model_import import check_source

    settings = Settings(import_allowed_hosts="")
    for url in (
        "http://[abc/x.safetensors",
        "http://169.254.169.254/latest/meta-data/x.safetensors",
        "http://metadata.google.internal/x.safetensors",
        "http://[fd00:ec2::254]/x.safetensors",
    ):
        with pytest.raises(InvalidInput) as caught:
            check_source(url, settings)
        assert caught.value.field == "url", url
    listed = Settings(import_allowed_hosts="169.254.169.254")
    assert check_source("http://169.254.169.254/x.safetensors", listed).host == "169.254.169.254"
    response = importer.client.post("/v1/jobs/import", json={"url": "http://[abc/x.safetensors"})
    assert response.status_code == 400 and response.json()["field"] == "url"
