"""The library found with hostile inputs: names that shadow other models, deleting a model a job
uses, upload temp files left by a crash. Each of these passed through on the library before
names were checked, lookups ordered and temp files locked."""

from __future__ import annotations

import fcntl
import hashlib

import pytest

from tests.conftest import api_client, install_model

PROBLEM = "application/problem+json"


def _upload(client, path, name):
    return client.post("/v1/models", params={"name": name}, content=path.read_bytes())


@pytest.fixture
def two_models(service, client, tiny_models):
    for key in ("sd1", "sd1-b"):
        assert _upload(client, tiny_models[key], tiny_models[key].name).status_code == 201
    return {m["name"]: m for m in client.get("/v1/models").json()["models"]}


def test_names_that_would_shadow_another_model_are_refused(client, tiny_models, two_models):
    a = two_models["tiny-sd1-a.safetensors"]
    other = tiny_models["sd1-b"]
    for name, status in (
        (f"{a['sha256']}.safetensors", 400),  # looks like a's sha256
        (f"{a['short_hash']}.safetensors", 400),  # looks like a's short hash
        (f"{a['legacy_hash']}.ckpt", 400),  # 8 hex digits: AUTOMATIC1111's legacy hash
        ("tiny-sd1-a.safetensors.safetensors", 409),  # its id is a's name
        ("tiny-sd1-a.ckpt", 409),  # a's id
    ):
        response = _upload(client, other, name)
        assert response.status_code == status, (name, response.text)
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["field"] in ("name", "body")
    assert sorted(two_models) == sorted(m["name"] for m in client.get("/v1/models").json()["models"])
    # Every way of naming a still finds a, not an upload.
    for ref in (a["sha256"], a["short_hash"], "tiny-sd1-a", "tiny-sd1-a.safetensors"):
        assert client.get(f"/v1/models/{ref}").json()["sha256"] == a["sha256"], ref


def test_an_exact_name_wins_and_a_hash_means_a_hash(service, client, tiny_models, two_models):
    """Files dropped into the directory by hand are not checked: lookups still find the right one."""
    a, b = two_models["tiny-sd1-a.safetensors"], two_models["tiny-sd1-b.safetensors"]
    install_model(service, tiny_models["sd1-b"], f"{a['sha256']}.safetensors")
    install_model(service, tiny_models["sd1-b"], "tiny-sd1-a.safetensors.safetensors")
    assert client.get(f"/v1/models/{a['sha256']}").json()["name"] == "tiny-sd1-a.safetensors"
    assert client.get("/v1/models/tiny-sd1-a.safetensors").json()["sha256"] == a["sha256"]
    # An inspect job pinned by sha256 is pinned to a's bytes.
    job = client.post("/v1/jobs/inspect", json={"model": a["sha256"]}).json()
    pinned = service_job_inputs(service, job["id"])["model"]
    assert pinned == {"name": "tiny-sd1-a.safetensors", "sha256": a["sha256"]}
    assert client.delete(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"
    # DELETE by a's name deletes a, not the file whose id is that name.
    response = client.delete("/v1/models/tiny-sd1-a.safetensors")
    assert response.status_code == 204, response.text
    assert not (service.models_dir / "tiny-sd1-a.safetensors").exists()
    assert (service.models_dir / "tiny-sd1-a.safetensors.safetensors").exists()
    assert (
        hashlib.sha256((service.models_dir / f"{a['sha256']}.safetensors").read_bytes()).hexdigest()
        == b["sha256"]
    )


def service_job_inputs(service, job_id: str) -> dict:
    """The inputs the API pinned for a job, as the worker will read them from Redis."""
    import redis

    from mergeprobe.service.jobs import JobStore

    settings = service.settings()
    return JobStore(redis.Redis.from_url(settings.redis_url), settings).get(job_id)["inputs"]


def test_a_model_a_queued_job_uses_cannot_be_deleted(client, two_models):
    """No worker runs: the job stays queued, and the model stays until the job is over."""
    job = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-b"}).json()
    response = client.delete("/v1/models/tiny-sd1-b")
    assert response.status_code == 409 and response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["field"] == "id" and job["id"] in problem["detail"]
    assert client.get("/v1/models/tiny-sd1-b").status_code == 200
    # Another model is not held by it; after a cancel this one can go too.
    assert client.delete("/v1/models/tiny-sd1-a").status_code == 204
    assert client.delete(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"
    assert client.delete("/v1/models/tiny-sd1-b").status_code == 204


def test_upload_temp_files_left_by_a_crash_are_swept_at_start(service, tiny_models):
    models = service.models_dir
    abandoned = models / ".partial-0123456789ab-cut-off.safetensors"
    abandoned.write_bytes(tiny_models["sd1"].read_bytes()[:4096])
    in_flight = models / ".partial-ba9876543210-still-writing.safetensors"
    job_partial = models / f".partial-{'c' * 24}-a-merge.safetensors"  # a job's: the reaper's business
    job_partial.write_bytes(b"x")
    with open(in_flight, "wb") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)  # as a live upload holds it
        with api_client(service) as client:
            assert client.get("/healthz").status_code == 200
        assert not abandoned.exists()
        assert in_flight.exists() and job_partial.exists()
