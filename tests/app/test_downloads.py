"""Downloads: a model's file from the local and the s3 library (proxied and redirected), and a
job's artifacts as one streamed zip, against a real Redis, a real S3-compatible server (moto in
server mode) and, for the jobs, one real worker process.

One instance per backend for the module; the worker starts only for the tests that run jobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import secrets
import zipfile

import httpx
import pytest

from tests.conftest import (
    AWS_TEST_ENV,
    api_client,
    install_model,
    run_succeeding,
    running_service,
)

PROBLEM = "application/problem+json"
UNKNOWN_JOB = "0123456789abcdef01234567"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _byteranges(response: httpx.Response) -> list[tuple[str, bytes]]:
    """The parts of a multipart/byteranges body: (Content-Range, bytes) each."""
    boundary = response.headers["content-type"].split("boundary=", 1)[1]
    chunks = response.content.split(f"--{boundary}".encode())
    assert chunks[0] == b"" and chunks[-1] == b"--"
    parts = []
    for chunk in chunks[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        assert body.endswith(b"\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode("latin-1").strip().split("\r\n"))
        parts.append((headers["Content-Range"], body[:-2]))
    return parts


def _assert_problem(response: httpx.Response, status: int, field: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status and problem["field"] == field
    return problem


def _head(client, url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """A HEAD sent to the app itself, below any HTTP client (clients drop a HEAD's body): the
    status, the headers and every body byte the app sent."""
    sent: list[dict] = []
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "HEAD",
        "scheme": "http",
        "path": url,
        "raw_path": url.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    asyncio.run(client.app(scope, receive, send))
    start, *body = sent
    response_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], response_headers, b"".join(m.get("body", b"") for m in body)


def _assert_headless_problem(response: httpx.Response, status: int) -> None:
    """A problem answered to a HEAD: its status and type, and no body."""
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM and response.content == b""


def assert_serves_file(client, url: str, data: bytes, filename: str) -> None:
    """What every download of a file answers, whichever backend keeps it."""
    size, etag = len(data), f'"{_sha256(data)}"'

    full = client.get(url)
    assert full.status_code == 200, full.text
    assert full.content == data
    assert full.headers["etag"] == etag
    assert full.headers["content-length"] == str(size)
    assert full.headers["accept-ranges"] == "bytes"
    assert full.headers["content-type"] == "application/octet-stream"
    assert full.headers["content-disposition"] == f'attachment; filename="{filename}"'

    status, head, body = _head(client, url)
    assert status == 200 and body == b""
    for name in ("etag", "content-length", "accept-ranges", "content-type", "content-disposition"):
        assert head[name] == full.headers[name], name

    # One range that spans several read chunks (64 KiB), and a suffix.
    one = client.get(url, headers={"Range": "bytes=100-200099"})
    assert one.status_code == 206
    assert one.content == data[100:200100]
    assert one.headers["content-range"] == f"bytes 100-200099/{size}"
    assert one.headers["content-length"] == "200000" and one.headers["etag"] == etag
    suffix = client.get(url, headers={"Range": "bytes=-10"})
    assert suffix.status_code == 206 and suffix.content == data[-10:]
    status, ranged_head, body = _head(client, url, Range="bytes=100-200099")
    assert status == 206 and body == b""
    assert ranged_head["content-range"] == f"bytes 100-200099/{size}"
    assert ranged_head["content-length"] == "200000"

    several = client.get(url, headers={"Range": f"bytes=0-9, 70000-140000, {size - 5}-"})
    assert several.status_code == 206
    assert several.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert int(several.headers["content-length"]) == len(several.content)
    assert _byteranges(several) == [
        (f"bytes 0-9/{size}", data[:10]),
        (f"bytes 70000-140000/{size}", data[70000:140001]),
        (f"bytes {size - 5}-{size - 1}/{size}", data[-5:]),
    ]

    past_the_end = client.get(url, headers={"Range": f"bytes={size}-"})
    _assert_problem(past_the_end, 416, "Range")
    assert past_the_end.headers["content-range"] == f"bytes */{size}"
    _assert_problem(client.get(url, headers={"Range": "lines=1-2"}), 400, "Range")

    not_modified = client.get(url, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    stale = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"another"'})
    assert stale.status_code == 200 and stale.content == data


def assert_zip_holds(content: bytes, records: list[dict]) -> zipfile.ZipFile:
    """The zip holds exactly the job's artifacts, in order, byte for byte; text deflated, the rest
    stored."""
    archive = zipfile.ZipFile(io.BytesIO(content))
    assert archive.testzip() is None  # every entry's CRC checks out
    assert archive.namelist() == [r["name"] for r in records]
    for record in records:
        data = archive.read(record["name"])
        assert len(data) == record["size_bytes"], record["name"]
        assert _sha256(data) == record["sha256"], record["name"]
        deflated = archive.getinfo(record["name"]).compress_type == zipfile.ZIP_DEFLATED
        assert deflated == record["name"].endswith((".csv", ".json")), record["name"]
    return archive


# -- the local library -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def local(redis_url, tmp_path_factory, tiny_models):
    """An instance with a local library and artifacts; (service, client)."""
    with running_service(redis_url, tmp_path_factory.mktemp("downloads-local") / "data") as svc:
        for key in ("sd1", "sd1-b", "sd1-ckpt"):
            install_model(svc, tiny_models[key])
        with api_client(svc) as client:
            yield svc, client


@pytest.fixture(scope="module")
def worker(local):
    """The local instance's worker, started once for the tests that run jobs."""
    svc, client = local
    svc.start_worker()
    return client


def test_local_model_file(local, tiny_models):
    _, client = local
    for source in (tiny_models["sd1"], tiny_models["sd1-ckpt"]):
        model_id = source.name.rsplit(".", 1)[0]
        info = client.get(f"/v1/models/{model_id}").json()
        assert info["download_url"] == f"/v1/models/{model_id}/file"
        assert_serves_file(client, info["download_url"], source.read_bytes(), source.name)

    listed = client.get("/v1/models").json()["models"]
    assert {m["name"]: m["download_url"] for m in listed}["tiny-sd1-b.safetensors"] == (
        "/v1/models/tiny-sd1-b/file"
    )
    # Any reference a lookup takes names the file: here the model's sha256.
    by_hash = client.get(f"/v1/models/{_sha256(tiny_models['sd1'].read_bytes())}/file")
    assert by_hash.status_code == 200 and by_hash.content == tiny_models["sd1"].read_bytes()

    _assert_problem(client.get("/v1/models/no-such-model/file"), 404, "id")
    _assert_headless_problem(client.head("/v1/models/no-such-model/file"), 404)


def test_merge_result_links_its_file_and_the_zip_holds_its_artifacts(worker):
    """An elemental merge: its result links the merged model's file, and its plan.csv comes back
    in the zip. (The s3 test below zips several artifacts of every kind without a worker.)"""
    client = worker
    body = {
        "model_a": "tiny-sd1-a",
        "model_b": "tiny-sd1-b",
        "alpha": 0.5,
        "elemental": "OUT05:attn2:0.2",
        "output": {"name": "blend.safetensors"},
    }
    job = run_succeeding(client, "elemental", body, timeout=120)
    merged = job["result"]["model"]
    assert merged["download_url"] == "/v1/models/blend/file"
    merged_file = client.get(merged["download_url"])
    assert merged_file.status_code == 200
    assert _sha256(merged_file.content) == merged["sha256"]

    response = client.get(f"/v1/jobs/{job['id']}/artifacts.zip")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"] == f'attachment; filename="{job["id"]}-artifacts.zip"'
    assert_zip_holds(response.content, job["artifacts"])

    (plan,) = job["artifacts"]
    status, head, body = _head(client, plan["url"])
    assert status == 200 and body == b""
    assert head["content-length"] == str(plan["size_bytes"]) and head["etag"] == f'"{plan["sha256"]}"'


# -- the s3 library --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(redis_url, tmp_path_factory, s3_endpoint):
    """An instance whose library and artifacts are in a bucket; no worker. Yields a function that
    opens an API client on it (`downloads`: proxy or redirect) and the bucket's boto3 client."""
    boto3 = pytest.importorskip("boto3")
    from fastapi.testclient import TestClient

    from app.main import create_app

    with (
        pytest.MonkeyPatch.context() as env,
        running_service(redis_url, tmp_path_factory.mktemp("downloads-s3") / "data") as svc,
    ):
        for key, value in AWS_TEST_ENV.items():
            env.setenv(key, value)
        env.delenv("AWS_PROFILE", raising=False)
        bucket = f"mergeprobe-{secrets.token_hex(4)}"
        s3_client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        s3_client.create_bucket(Bucket=bucket)

        def app_client(downloads: str = "proxy") -> TestClient:
            return TestClient(
                create_app(
                    svc.settings(
                        library_backend="s3",
                        artifacts_backend="s3",
                        s3_bucket=bucket,
                        s3_endpoint_url=s3_endpoint,
                        s3_region="us-east-1",
                        s3_downloads=downloads,
                    )
                )
            )

        yield app_client, s3_client, bucket


def test_s3_model_file_proxied_and_redirected(s3, tiny_models):
    app_client, s3_client, bucket = s3
    data = tiny_models["sd1"].read_bytes()
    with app_client() as client:
        uploaded = client.post("/v1/models", params={"name": "tiny-sd1-a.safetensors"}, content=data)
        assert uploaded.status_code == 201, uploaded.text
        info = uploaded.json()
        assert info["download_url"] == "/v1/models/tiny-sd1-a/file"
        assert client.get("/v1/models/tiny-sd1-a").json()["download_url"] == info["download_url"]
        url = info["download_url"]
        assert_serves_file(client, url, data, "tiny-sd1-a.safetensors")
        _assert_problem(client.get("/v1/models/no-such-model/file"), 404, "id")

    with app_client("redirect") as client:
        answer = client.get(url, follow_redirects=False)
        assert answer.status_code == 307
        assert answer.headers["etag"] == f'"{info["sha256"]}"'
        location = answer.headers["location"]
        assert (
            location.startswith(f"{s3_client.meta.endpoint_url}/{bucket}/") and "X-Amz-Signature=" in location
        )
        fetched = httpx.get(location)
        assert fetched.status_code == 200 and fetched.content == data
        assert fetched.headers["content-disposition"] == 'attachment; filename="tiny-sd1-a.safetensors"'
        ranged = httpx.get(location, headers={"Range": "bytes=5-24"})
        assert ranged.status_code == 206 and ranged.content == data[5:25]
        head = client.head(url, follow_redirects=False)
        assert head.status_code == 307 and head.headers["location"].startswith(location.split("?")[0])
        assert client.get(url, headers={"If-None-Match": answer.headers["etag"]}).status_code == 304

        # Bytes deleted behind the API's back: a 404, in both modes.
        s3_client.delete_object(Bucket=bucket, Key=f"models/{info['sha256']}")
        _assert_problem(client.get(url, follow_redirects=False), 404, "id")
    with app_client() as client:
        _assert_problem(client.get(url), 404, "id")
        _assert_headless_problem(client.head(url), 404)


def test_s3_artifacts_zip(s3, tiny_models):
    """The artifacts are written by the API's own S3 artifact store, as a worker writes them, and
    the job finished with their records: no worker is needed to read them back as a zip."""
    app_client, _, _ = s3
    with app_client() as client:
        uploaded = client.post(
            "/v1/models", params={"name": "zipped.safetensors"}, content=tiny_models["sd1-b"].read_bytes()
        )
        assert uploaded.status_code == 201, uploaded.text
        job = client.post("/v1/jobs/inspect", json={"model": "zipped"}).json()

        # A job that lists no artifacts (here: still queued) gives a valid, empty zip.
        empty = client.get(f"/v1/jobs/{job['id']}/artifacts.zip")
        assert empty.status_code == 200
        assert zipfile.ZipFile(io.BytesIO(empty.content)).namelist() == []

        state = client.app.state.mergeprobe
        contents = {
            "blocks.csv": ("text/csv", b"block,params\n" + b"IN00,1\n" * 5000),
            "image_0.png": ("image/png", secrets.token_bytes(300_000)),  # several 64 KiB reads
            "manifest.json": ("application/json", b'{"artifacts": []}'),
            "empty.bin": ("application/octet-stream", b""),
        }
        records = [
            state.artifacts.write_bytes(job["id"], name, data, media_type)
            for name, (media_type, data) in contents.items()
        ]
        state.store.finish(job["id"], "succeeded", artifacts=records)

        response = client.get(f"/v1/jobs/{job['id']}/artifacts.zip")
        assert response.status_code == 200
        archive = assert_zip_holds(response.content, records)
        assert {name: archive.read(name) for name in archive.namelist()} == {
            name: data for name, (_, data) in contents.items()
        }

        _assert_problem(client.get(f"/v1/jobs/{UNKNOWN_JOB}/artifacts.zip"), 404, "id")

        # HEAD of one proxied artifact: the GET's headers, from the object's metadata.
        image = next(r for r in records if r["name"] == "image_0.png")
        status, head, body = _head(client, image["url"])
        assert status == 200 and body == b""
        assert head["content-length"] == "300000" and head["content-type"] == "image/png"
        assert head["etag"] == f'"{image["sha256"]}"' and "last-modified" in head
        status, ranged, body = _head(client, image["url"], Range="bytes=0-99, 200-299")
        assert status == 206 and body == b""
        assert ranged["content-type"].startswith("multipart/byteranges; boundary=")
        several = client.get(image["url"], headers={"Range": "bytes=0-99, 200-299"})
        assert ranged["content-length"] == several.headers["content-length"] == str(len(several.content))
