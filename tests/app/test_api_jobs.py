"""Request → queue → real worker process → artifact → URL, against a real Redis."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import pytest

from tests.conftest import install_model, wait_for, wait_for_job

PROBLEM = "application/problem+json"


@pytest.fixture
def sd1(service, tiny_models):
    return install_model(service, tiny_models["sd1"])


def submit_inspect(client, model="tiny-sd1-a", **headers):
    return client.post("/v1/jobs/inspect", json={"model": model}, headers=headers)


def test_inspect_job_end_to_end_with_range_and_etag(service, client, sd1):
    service.start_worker()
    response = submit_inspect(client)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    pinned = {"name": sd1.name, "sha256": hashlib.sha256(sd1.read_bytes()).hexdigest()}
    assert job["status"] == "queued" and job["inputs"] == {"model": pinned, "arch": "sd1"}

    job = wait_for_job(client, job["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["completed"] == job["progress"]["total"] > 0
    result = job["result"]
    assert result["arch"] == "sd1"
    blocks = [b["block"] for b in result["blocks"]]
    assert blocks == ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [
        f"OUT{i:02d}" for i in range(12)
    ]
    # Every parameter of the file is counted in exactly one block.
    from mergeprobe.checkpoints.checkpoint_headers import read_checkpoint_header

    header = read_checkpoint_header(sd1)
    assert result["total_params"] == sum(t.numel for t in header.tensors.values())
    assert sum(b["tensors"] for b in result["blocks"]) == len(header.tensors)
    assert all(b["params"] > 0 and b["mean_abs"] > 0 for b in result["blocks"])

    (artifact,) = job["artifacts"]
    assert artifact["name"] == "blocks.csv" and artifact["media_type"] == "text/csv"
    full = client.get(artifact["url"])
    assert full.status_code == 200
    assert full.headers["etag"] == f'"{artifact["sha256"]}"'
    assert hashlib.sha256(full.content).hexdigest() == artifact["sha256"]
    assert len(full.content) == artifact["size_bytes"]
    rows = list(csv.DictReader(io.StringIO(full.text)))
    assert [r["block"] for r in rows] == blocks
    assert [int(r["params"]) for r in rows] == [b["params"] for b in result["blocks"]]

    partial = client.get(artifact["url"], headers={"Range": "bytes=5-24"})
    assert partial.status_code == 206
    assert partial.content == full.content[5:25]
    assert partial.headers["content-range"] == f"bytes 5-24/{len(full.content)}"
    assert client.get(artifact["url"], headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    unsatisfiable = client.get(artifact["url"], headers={"Range": f"bytes={len(full.content) + 10}-"})
    assert unsatisfiable.status_code == 416

    missing = client.get(f"/v1/jobs/{job['id']}/artifacts/nope.csv")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    traversal = client.get(f"/v1/jobs/{job['id']}/artifacts/..%2F..%2Fetc%2Fpasswd")
    assert traversal.status_code == 404


def test_ckpt_and_other_archs_inspect(service, client, tiny_models):
    for key in ("sd2", "sdxl", "sd1-ckpt"):
        install_model(service, tiny_models[key])
    service.start_worker()
    ids = {
        arch: submit_inspect(client, model=name).json()["id"]
        for arch, name in (("sd2", "tiny-sd2-a"), ("sdxl", "tiny-sdxl-a"), ("sd1", "tiny-sd1-c.ckpt"))
    }
    for arch, job_id in ids.items():
        job = wait_for_job(client, job_id)
        assert job["status"] == "succeeded", job
        assert job["result"]["arch"] == arch
        expected = 1 + (19 if arch == "sdxl" else 25)
        assert len(job["result"]["blocks"]) == expected


def test_events_stream_progress_until_end(service, client, sd1):
    job = submit_inspect(client).json()
    service.start_worker()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = []
        current = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                current = line[7:]
            elif line.startswith("data: "):
                events.append((current, json.loads(line[6:])))
                if current == "end":
                    break
    kinds = [e for e, _ in events]
    assert kinds[-1] == "end"
    statuses = [data["status"] for e, data in events if e == "job"]
    assert statuses[0] in ("queued", "running") and statuses[-1] == "succeeded"


def test_idempotency_key(service, client, sd1):
    first = submit_inspect(client, **{"Idempotency-Key": "abc-1"})
    again = submit_inspect(client, **{"Idempotency-Key": "abc-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    install_model(service, sd1, "other.safetensors")
    conflict = client.post("/v1/jobs/inspect", json={"model": "other"}, headers={"Idempotency-Key": "abc-1"})
    assert conflict.status_code == 409 and conflict.headers["content-type"] == PROBLEM
    assert conflict.json()["field"] == "Idempotency-Key"
    other_key = submit_inspect(client, **{"Idempotency-Key": "abc-2"})
    assert other_key.status_code == 202 and other_key.json()["id"] != first.json()["id"]


def test_list_jobs_filters_and_cursor(service, client, sd1):
    ids = [submit_inspect(client).json()["id"] for _ in range(5)]
    client.delete(f"/v1/jobs/{ids[1]}")
    page1 = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page1["jobs"]] == ids[::-1][:2]
    page2 = client.get("/v1/jobs", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
    assert [j["id"] for j in page2["jobs"]] == ids[::-1][2:4]
    page3 = client.get("/v1/jobs", params={"limit": 2, "cursor": page2["next_cursor"]}).json()
    assert [j["id"] for j in page3["jobs"]] == ids[:1] and page3["next_cursor"] is None
    canceled = client.get("/v1/jobs", params={"status": "canceled"}).json()["jobs"]
    assert [j["id"] for j in canceled] == [ids[1]]
    assert client.get("/v1/jobs", params={"kind": "merge"}).json()["jobs"] == []
    bad = client.get("/v1/jobs", params={"status": "exploded"})
    assert bad.status_code == 422 and bad.json()["field"] == "status"


def test_cancel_queued_job_never_runs(service, client, sd1):
    job = submit_inspect(client).json()
    canceled = client.delete(f"/v1/jobs/{job['id']}")
    assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
    follow = submit_inspect(client).json()
    service.start_worker()
    assert wait_for_job(client, follow["id"])["status"] == "succeeded"
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "canceled" and job["started_at"] is None and job["artifacts"] == []


def test_readyz_needs_a_live_worker(service, client):
    assert client.get("/healthz").json() == {"status": "ok", "workers": None, "queued": None}
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.headers["content-type"] == PROBLEM
    service.start_worker()
    ready = wait_for(lambda: (r := client.get("/readyz")).status_code == 200 and r, timeout=60)
    assert ready.json()["workers"] == 1
