"""One library for many hosts: the s3 backend, against a real S3-compatible server (moto in server
mode, started here) and a real Redis.

Two "hosts": the API (in this process) and a worker (a subprocess), each with its own data
directory, sharing nothing but Redis and the bucket. Models uploaded to the API are merged on the
worker, the result downloaded through the API, probed on the worker from its cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import threading

import pytest

from tests.conftest import AWS_TEST_ENV, wait_for_job

pytest.importorskip("boto3")


def _s3_library(s3_endpoint: str, bucket_name: str) -> dict[str, str]:
    return {
        "library_backend": "s3",
        "artifacts_backend": "s3",
        "s3_bucket": bucket_name,
        "s3_endpoint_url": s3_endpoint,
        "s3_region": "us-east-1",
    }


def _env(settings: dict[str, str]) -> dict[str, str]:
    return {**AWS_TEST_ENV, **{f"MERGEPROBE_{k.upper()}": v for k, v in settings.items()}}


def _keys(client, bucket_name: str, prefix: str = "") -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket_name, Prefix=prefix).get("Contents", [])]


@contextlib.contextmanager
def _serving(directory):
    """An HTTP server for the files of `directory`, on a free local port."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _upload(client, path, name=None):
    response = client.post("/v1/models", params={"name": name or path.name}, content=path.read_bytes())
    assert response.status_code == 201, response.text
    return response.json()


def test_two_hosts_share_one_library(service, tiny_models, s3_endpoint, bucket, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    bucket_name, s3 = bucket
    library = _s3_library(s3_endpoint, bucket_name)
    worker_data, api_data = tmp_path / "worker-host", tmp_path / "api-host"
    service.start_worker(**_env({**library, "data_dir": str(worker_data)}))
    settings = service.settings(data_dir=api_data, **library)
    with TestClient(create_app(settings)) as client:
        a = _upload(client, tiny_models["sd1"])
        b = _upload(client, tiny_models["sd1-b"])
        c = _upload(client, tiny_models["sd1-ckpt"])  # a .ckpt: validated by ranged reads of its zip
        assert c["format"] == "ckpt" and c["arch"] == "sd1"
        # The bytes are in the bucket by sha256, nothing on the API host; the staging objects are gone.
        assert sorted(_keys(s3, bucket_name, "models/")) == sorted(f"models/{m['sha256']}" for m in (a, b, c))
        assert not [p for p in (api_data / "models").rglob("*") if p.is_file()]
        for model, source in ((a, tiny_models["sd1"]), (c, tiny_models["sd1-ckpt"])):
            assert model["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        # The same bytes under a second name are stored once, and stay while a name points at them.
        copy = _upload(client, tiny_models["sd1"], "copy-of-a.safetensors")
        assert copy["sha256"] == a["sha256"] and len(_keys(s3, bucket_name, "models/")) == 3
        assert client.delete("/v1/models/copy-of-a").status_code == 204
        assert f"models/{a['sha256']}" in _keys(s3, bucket_name, "models/")

        job = client.post(
            "/v1/jobs/merge",
            json={
                "model_a": "tiny-sd1-a",
                "model_b": b["sha256"],
                "alpha": 0.3,
                "output": {"name": "blend.safetensors"},
            },
        ).json()
        job = wait_for_job(client, job["id"], timeout=120)
        assert job["status"] == "succeeded", job
        merged = job["result"]["model"]

        # The API host sees the worker's merge at once, and serves its bytes from the bucket.
        listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert listed["blend.safetensors"]["sha256"] == merged["sha256"]
        download = client.get(f"/v1/models/{merged['id']}/file")
        assert download.status_code == 200, download.text
        assert hashlib.sha256(download.content).hexdigest() == merged["sha256"]
        assert download.headers["etag"] == f'"{merged["sha256"]}"'

        # The worker fetched its inputs once and kept its output: all by sha256 in its cache.
        cache = worker_data / "cache" / "models"
        cached = {p.name: p.stat().st_ino for p in cache.iterdir() if not p.name.startswith(".")}
        assert sorted(cached) == sorted(f"{m['sha256']}.safetensors" for m in (a, b, merged))

        # A probe of the merged model on the worker reads it from the cache (the same file: not fetched again).
        dump = client.post(
            "/v1/jobs/dump",
            json={
                "model": "blend",
                "prompt": "a cat",
                "steps": 2,
                "width": 64,
                "height": 64,
                "features": {"layers": "M00", "steps": "2"},
            },
        ).json()
        dump = wait_for_job(client, dump["id"], timeout=180)
        assert dump["status"] == "succeeded", dump
        after = {p.name: p.stat().st_ino for p in cache.iterdir() if not p.name.startswith(".")}
        assert after == cached
        assert client.get(dump["artifacts"][0]["url"]).status_code == 200

        # An import from an HTTP server (here: this test's) lands in the shared library too.
        with _serving(tiny_models["sd2"].parent) as base:
            job = client.post("/v1/jobs/import", json={"url": f"{base}/{tiny_models['sd2'].name}"}).json()
            job = wait_for_job(client, job["id"], timeout=120)
        assert job["status"] == "succeeded", job
        imported = client.get("/v1/models/tiny-sd2-a").json()
        assert imported["sha256"] == hashlib.sha256(tiny_models["sd2"].read_bytes()).hexdigest()
        assert f"models/{imported['sha256']}" in _keys(s3, bucket_name, "models/")
        assert (cache / f"{imported['sha256']}.safetensors").is_file()

        # Deleting a name removes the bytes only with the last name that points at them.
        assert client.delete("/v1/models/blend").status_code == 204
        assert f"models/{merged['sha256']}" not in _keys(s3, bucket_name, "models/")
        assert client.get(f"/v1/models/{merged['sha256']}").status_code == 404


def test_uploads_cut_off_a_day_ago_are_swept_and_live_ones_kept(service, s3_endpoint, bucket, tmp_path):
    """By the time in the key mergeprobe gave them: moto, like some S3-compatible servers, reports
    a fixed `Initiated` date for every multipart upload."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    bucket_name, s3 = bucket
    old, live = "models/uploads/20200101T000000-0123456789ab", "models/uploads/29990101T000000-ba9876543210"
    old_object = "models/uploads/20200101T000000-aaaaaaaaaaaa"
    for key in (old, live):
        s3.create_multipart_upload(Bucket=bucket_name, Key=key)
    s3.put_object(Bucket=bucket_name, Key=old_object, Body=b"x")
    s3.put_object(Bucket=bucket_name, Key="models/uploads/not-ours", Body=b"x")
    with TestClient(
        create_app(service.settings(data_dir=tmp_path / "api", **_s3_library(s3_endpoint, bucket_name)))
    ):
        pass
    uploads = s3.list_multipart_uploads(Bucket=bucket_name, Prefix="models/uploads/").get("Uploads", [])
    assert [u["Key"] for u in uploads] == [live]
    assert _keys(s3, bucket_name, "models/uploads/") == ["models/uploads/not-ours"]
