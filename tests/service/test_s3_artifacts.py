"""The s3 artifacts backend against a real S3-compatible server (moto in server mode, started here).

A real worker process uploads, the API serves by proxy (Range, ETag = sha256, 304, 416) or by a
307 to a presigned URL; worker and API share nothing but Redis and the bucket.
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import AWS_TEST_ENV, REPO, install_model, wait_for_job

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")


def _s3_env(s3_endpoint: str, bucket_name: str, **extra: str) -> dict[str, str]:
    return {
        **AWS_TEST_ENV,
        "MERGEPROBE_ARTIFACTS_BACKEND": "s3",
        "MERGEPROBE_S3_BUCKET": bucket_name,
        "MERGEPROBE_S3_ENDPOINT_URL": s3_endpoint,
        "MERGEPROBE_S3_REGION": "us-east-1",
        **extra,
    }


def _s3_settings(service, s3_endpoint, bucket_name, **overrides):
    return service.settings(
        artifacts_backend="s3",
        s3_bucket=bucket_name,
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
        **overrides,
    )


def _keys(client, bucket_name: str, prefix: str = "") -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket_name, Prefix=prefix).get("Contents", [])]


def _files(path) -> list:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_worker_and_api_share_only_redis_and_the_bucket(service, tiny_models, s3_endpoint, bucket, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    bucket_name, s3 = bucket
    install_model(service, tiny_models["sd1"])
    worker_data, api_data = tmp_path / "worker-data", tmp_path / "api-data"
    service.start_worker(
        **_s3_env(
            s3_endpoint,
            bucket_name,
            MERGEPROBE_DATA_DIR=str(worker_data),
            MERGEPROBE_MODELS_DIR=str(service.models_dir),
        )
    )
    settings = _s3_settings(
        service, s3_endpoint, bucket_name, data_dir=api_data, models_dir=service.models_dir
    )
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
        job = wait_for_job(client, job["id"], timeout=60)
        assert job["status"] == "succeeded", job
        (artifact,) = job["artifacts"]
        assert artifact["name"] == "blocks.csv"

        # The object is in the bucket, with its sha256 as metadata; no local copy anywhere.
        key = f"artifacts/{job['id']}/blocks.csv"
        assert _keys(s3, bucket_name) == [key]
        head = s3.head_object(Bucket=bucket_name, Key=key)
        assert head["Metadata"]["sha256"] == artifact["sha256"]
        assert head["ContentLength"] == artifact["size_bytes"] and head["ContentType"] == "text/csv"
        assert _files(api_data / "artifacts") == [] and _files(worker_data / "artifacts") == []
        assert _files(worker_data / "tmp") == []  # the upload's temp file is gone

        # proxy: the API streams the object
        full = client.get(artifact["url"])
        assert full.status_code == 200, full.text
        assert full.headers["etag"] == f'"{artifact["sha256"]}"'
        assert full.headers["content-type"].startswith("text/csv")
        assert full.headers["accept-ranges"] == "bytes"
        assert hashlib.sha256(full.content).hexdigest() == artifact["sha256"]
        assert len(full.content) == artifact["size_bytes"]
        assert full.text.startswith("block,")

        partial = client.get(artifact["url"], headers={"Range": "bytes=5-24"})
        assert partial.status_code == 206
        assert partial.content == full.content[5:25]
        assert partial.headers["content-range"] == f"bytes 5-24/{len(full.content)}"
        assert partial.headers["etag"] == full.headers["etag"]
        suffix = client.get(artifact["url"], headers={"Range": "bytes=-10"})
        assert suffix.status_code == 206 and suffix.content == full.content[-10:]

        several = client.get(artifact["url"], headers={"Range": "bytes=0-4, 10-14"})
        assert several.status_code == 206
        assert several.headers["content-type"].startswith("multipart/byteranges; boundary=")
        assert int(several.headers["content-length"]) == len(several.content)
        assert full.content[0:5] in several.content and full.content[10:15] in several.content
        assert f"Content-Range: bytes 10-14/{len(full.content)}".encode() in several.content

        not_modified = client.get(artifact["url"], headers={"If-None-Match": full.headers["etag"]})
        assert not_modified.status_code == 304 and not_modified.headers["etag"] == full.headers["etag"]
        unsatisfiable = client.get(artifact["url"], headers={"Range": f"bytes={len(full.content) + 10}-"})
        assert unsatisfiable.status_code == 416
        assert unsatisfiable.headers["content-range"] == f"bytes */{len(full.content)}"
        assert client.get(artifact["url"], headers={"Range": "lines=1-2"}).status_code == 400
        stale = client.get(artifact["url"], headers={"Range": "bytes=0-9", "If-Range": '"other"'})
        assert stale.status_code == 200 and stale.content == full.content

        missing = client.get(f"/v1/jobs/{job['id']}/artifacts/nope.csv")
        assert missing.status_code == 404
        assert client.get(f"/v1/jobs/{job['id']}/artifacts/..%2F..%2Fetc%2Fpasswd").status_code == 404
        assert _files(api_data / "artifacts") == []

    # redirect: a 307 to a presigned URL that itself serves the bytes
    redirect_settings = _s3_settings(
        service,
        s3_endpoint,
        bucket_name,
        data_dir=api_data,
        models_dir=service.models_dir,
        s3_downloads="redirect",
    )
    with TestClient(create_app(redirect_settings)) as client:
        answer = client.get(artifact["url"], follow_redirects=False)
        assert answer.status_code == 307
        assert answer.headers["etag"] == f'"{artifact["sha256"]}"'
        url = answer.headers["location"]
        assert url.startswith(f"{s3_endpoint}/{bucket_name}/{key}?") and "X-Amz-Signature=" in url
        assert "X-Amz-Expires=900" in url
        fetched = httpx.get(url)
        assert fetched.status_code == 200 and fetched.content == full.content
        ranged = httpx.get(url, headers={"Range": "bytes=5-24"})
        assert ranged.status_code == 206 and ranged.content == full.content[5:25]
        assert (
            client.get(artifact["url"], headers={"If-None-Match": answer.headers["etag"]}).status_code == 304
        )

        # An object deleted behind the API's back is a 404, in both modes.
        s3.delete_object(Bucket=bucket_name, Key=key)
        assert client.get(artifact["url"], follow_redirects=False).status_code == 404
    with TestClient(create_app(settings)) as client:
        assert client.get(artifact["url"]).status_code == 404


def test_failed_and_canceled_jobs_leave_no_objects(service, client, tiny_models, s3_endpoint, bucket):
    """run_job in this process, with engines that upload artifacts, then fail or are canceled."""
    import worker.tasks as tasks
    from mergeprobe.service.artifacts import ArtifactStore, S3ArtifactStore
    from worker.runtime import WorkerRuntime

    bucket_name, s3 = bucket
    install_model(service, tiny_models["sd1"])
    settings = _s3_settings(service, s3_endpoint, bucket_name)
    state = client.app.state.mergeprobe
    artifacts = ArtifactStore(settings)
    assert isinstance(artifacts, S3ArtifactStore)
    runtime = WorkerRuntime(settings=settings, store=state.store, library=state.library, artifacts=artifacts)
    uploaded: dict[str, list[str]] = {}

    def upload_some(ctx):
        for i in range(3):
            ctx.write_artifact(f"part-{i}.bin", secrets.token_bytes(1000 + i), "application/octet-stream")
        # A large one goes up as a multipart upload.
        ctx.write_artifact("big.bin", b"\0" * (9 * 1024**2), "application/octet-stream")
        uploaded[ctx.job_id] = _keys(s3, bucket_name, f"artifacts/{ctx.job_id}/")

    def failing(ctx):
        upload_some(ctx)
        raise RuntimeError("engine broke after writing artifacts")

    def canceled(ctx):
        upload_some(ctx)
        state.store.cancel(ctx.job_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ctx.check_cancel()
            time.sleep(0.05)
        raise AssertionError("the cancel flag was never seen")

    outcomes = {}
    for name, engine in (("failed", failing), ("canceled", canceled)):
        job = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tasks, "get_runtime", lambda: runtime)
            patch.setattr(tasks, "engine_of", lambda kind, engine=engine: engine)
            assert tasks.run_job(job["id"]) == name
        assert len(uploaded[job["id"]]) == 4  # they were there while the job ran
        outcomes[name] = client.get(f"/v1/jobs/{job['id']}").json()
        assert outcomes[name]["status"] == name and outcomes[name]["artifacts"] == []
        assert _keys(s3, bucket_name, f"artifacts/{job['id']}/") == []
        assert s3.list_multipart_uploads(Bucket=bucket_name).get("Uploads", []) == []
    assert _keys(s3, bucket_name) == []
    assert _files(service.data_dir / "tmp") == []


def test_s3_settings_are_checked_and_local_needs_no_boto3(service, tmp_path):
    from mergeprobe.service.artifacts import ArtifactStore

    with pytest.raises(RuntimeError, match="MERGEPROBE_S3_BUCKET"):
        ArtifactStore(service.settings(artifacts_backend="s3"))
    assert ArtifactStore(service.settings()).backend == "local"

    code = (
        "import sys\n"
        "from app.main import create_app\n"
        "from mergeprobe.service.settings import Settings\n"
        f"create_app(Settings(redis_url='redis://127.0.0.1:1/0', data_dir={str(tmp_path)!r}))\n"
        "loaded = sorted(m for m in ('boto3', 'botocore', 's3transfer') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
