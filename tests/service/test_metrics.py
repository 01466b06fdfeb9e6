"""GET /metrics: Prometheus text from counters the job store keeps in Redis."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from mergeprobe.service.settings import Settings
from tests.conftest import install_model, wait_for_job

PROBLEM = "application/problem+json"


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(response.text))
    for family in families:
        assert family.documentation, f"{family.name} has no HELP line"
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_count_jobs_durations_and_merge_bytes(service, client, tiny_models):
    a = install_model(service, tiny_models["sd1"])
    b = install_model(service, tiny_models["sd1-b"])
    canceled = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
    client.delete(f"/v1/jobs/{canceled['id']}")
    before = scrape(client)
    assert value(before, "mergeprobe_jobs", kind="inspect", status="canceled") == 1
    assert value(before, "mergeprobe_jobs", kind="inspect", status="queued") == 0
    assert value(before, "mergeprobe_workers") == 0

    inspect = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
    merge = client.post(
        "/v1/jobs/merge",
        json={
            "model_a": "tiny-sd1-a",
            "model_b": "tiny-sd1-b",
            "alpha": 0.5,
            "output": {"name": "m.safetensors"},
        },
    ).json()
    queued = scrape(client)
    assert value(queued, "mergeprobe_jobs", kind="inspect", status="queued") == 1
    assert value(queued, "mergeprobe_jobs", kind="merge", status="queued") == 1
    assert value(queued, "mergeprobe_queue_depth") == 2

    service.start_worker()
    assert wait_for_job(client, inspect["id"])["status"] == "succeeded"
    merge = wait_for_job(client, merge["id"], timeout=120)
    assert merge["status"] == "succeeded", merge

    samples = scrape(client)
    for kind, status, expected in (
        ("inspect", "succeeded", 1),
        ("inspect", "canceled", 1),
        ("inspect", "queued", 0),
        ("inspect", "running", 0),
        ("merge", "succeeded", 1),
        ("merge", "running", 0),
        ("dump", "queued", 0),
    ):
        assert value(samples, "mergeprobe_jobs", kind=kind, status=status) == expected, (kind, status)
    assert value(samples, "mergeprobe_queue_depth") == 0
    assert value(samples, "mergeprobe_queue_limit") == 1000
    assert value(samples, "mergeprobe_workers") == 1

    duration = "mergeprobe_job_duration_seconds"
    for kind in ("inspect", "merge"):
        assert value(samples, f"{duration}_count", kind=kind, status="succeeded") == 1
        assert value(samples, f"{duration}_bucket", kind=kind, status="succeeded", le="+Inf") == 1
        assert value(samples, f"{duration}_sum", kind=kind, status="succeeded") > 0
    assert value(samples, f"{duration}_bucket", kind="inspect", status="succeeded", le="60.0") == 1
    # A job canceled before it started has no run time.
    assert (f"{duration}_count", (("kind", "inspect"), ("status", "canceled"))) not in samples

    # Bytes: the whole output file written; read: A's tensor for every key, B's for the keys
    # the plan merges (the dry-run plan says which).
    from mergeprobe.checkpoints.checkpoint_headers import read_checkpoint_header

    plan = client.post(
        "/v1/plans/merge", json={"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "alpha": 0.5}
    ).json()
    actions = {k["key"]: k["action"] for k in plan["keys"]}
    assert set(actions.values()) <= {"merge", "keep_a"} and "merge" in actions.values()
    tensors_a, tensors_b = (read_checkpoint_header(p).tensors for p in (a, b))
    expected = sum(tensors_a[k].nbytes for k in actions)
    expected += sum(tensors_b[k].nbytes for k, action in actions.items() if action == "merge")
    assert value(samples, "mergeprobe_merge_bytes_read_total") == expected
    assert value(samples, "mergeprobe_merge_bytes_written_total") == merge["result"]["size_bytes"]
    assert value(samples, "mergeprobe_jobs_rejected_total") == 0


def test_metrics_need_the_key_leave_the_global_registry_alone_and_503_without_redis(service, tmp_path):
    from prometheus_client import REGISTRY

    with TestClient(create_app(service.settings(api_keys="k1,k2"))) as client:
        denied = client.get("/metrics")
        assert denied.status_code == 401 and denied.headers["content-type"] == PROBLEM
        scrape(client, Authorization="Bearer k2")
    with TestClient(create_app(service.settings())) as client:
        scrape(client)  # a second app in the same process: no duplicate registration
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("mergeprobe")]

    down = create_app(Settings(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path / "down"))
    response = TestClient(down).get("/metrics")
    assert response.status_code == 503 and response.headers["content-type"] == PROBLEM
    assert response.json()["type"].endswith("/redis-unavailable")


def test_unknown_counter_is_refused(service):
    import redis

    from mergeprobe.service.jobs import JobStore

    settings = service.settings()
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings)
    with pytest.raises(ValueError, match="unknown counter"):
        store.add_counter("nonsense", 1)
    store.add_counter("merge_bytes_written", 5)
    store.add_counter("merge_bytes_written", 7)
    assert store.stats_snapshot()["counters"] == {"merge_bytes_written": "12"}
