"""MERGEPROBE_MAX_QUEUED: a full queue answers 429 with Retry-After to every job submission."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import install_model

PROBLEM = "application/problem+json"


def test_full_queue_answers_429_with_retry_after(service, tiny_models):
    install_model(service, tiny_models["sd1"])
    with TestClient(create_app(service.settings(max_queued=2))) as client:
        first, second = (client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}) for _ in range(2))
        assert first.status_code == second.status_code == 202

        refused = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"})
        assert refused.status_code == 429 and refused.headers["content-type"] == PROBLEM
        assert int(refused.headers["retry-after"]) > 0
        body = refused.json()
        assert body["type"].endswith("/queue-full") and "MERGEPROBE_MAX_QUEUED=2" in body["detail"]
        # Every kind, and before the body is even looked at.
        merge = client.post("/v1/jobs/merge", json={"model_a": "tiny-sd1-a", "model_b": "nope"})
        assert merge.status_code == 429 and merge.headers["retry-after"]
        assert client.post("/v1/jobs/teleport", json={}).status_code == 404
        # Reads still work.
        assert len(client.get("/v1/jobs").json()["jobs"]) == 2

        # A canceled job leaves the queue: room for one more.
        client.delete(f"/v1/jobs/{first.json()['id']}")
        assert client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).status_code == 202
        assert client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).status_code == 429

        metrics = client.get("/metrics").text
        assert "mergeprobe_jobs_rejected_total 3.0" in metrics
        assert "mergeprobe_queue_depth 2.0" in metrics and "mergeprobe_queue_limit 2.0" in metrics
        assert 'mergeprobe_jobs{kind="inspect",status="queued"} 2.0' in metrics
        assert 'mergeprobe_jobs{kind="inspect",status="canceled"} 1.0' in metrics


def test_zero_means_no_limit(service, tiny_models):
    install_model(service, tiny_models["sd1"])
    with TestClient(create_app(service.settings(max_queued=0))) as client:
        for _ in range(3):
            assert client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).status_code == 202
