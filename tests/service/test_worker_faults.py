"""Cancel, worker loss and timeouts, with real worker processes slowed by the
MERGEPROBE_DEBUG_TENSOR_DELAY fault injection (a slow disk)."""

from __future__ import annotations

import signal
import time

from tests.conftest import install_model, wait_for, wait_for_job

SLOW = {"MERGEPROBE_DEBUG_TENSOR_DELAY": "0.015"}


def _running(client, job_id):
    return wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running", timeout=60)


def test_cancel_running_job_stops_within_a_second(service, client, tiny_models):
    install_model(service, tiny_models["sd1"])
    service.start_worker(**SLOW)
    job = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
    _running(client, job["id"])
    wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["progress"]["completed"] > 0, timeout=30)
    asked = time.monotonic()
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    job = wait_for_job(client, job["id"], timeout=10)
    assert time.monotonic() - asked < 2.0
    assert job["status"] == "canceled" and job["artifacts"] == []
    assert job["progress"]["completed"] < job["progress"]["total"]
    assert not (service.data_dir / "artifacts" / job["id"]).exists()
    # The worker is still healthy: it takes the next job and works through it (on this slowed
    # worker a whole inspect takes ~15 s, so once it has made progress it is canceled too).
    nxt = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
    _running(client, nxt["id"])
    wait_for(lambda: client.get(f"/v1/jobs/{nxt['id']}").json()["progress"]["completed"] > 10, timeout=30)
    client.delete(f"/v1/jobs/{nxt['id']}")
    assert wait_for_job(client, nxt["id"], timeout=30)["status"] == "canceled"


def test_sigkilled_worker_fails_its_job_and_a_new_worker_continues(service, client, tiny_models):
    install_model(service, tiny_models["sd1"])
    victim = service.start_worker(**SLOW)
    job = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
    queued_next = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
    _running(client, job["id"])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    failed = wait_for_job(client, job["id"], timeout=60)
    assert time.monotonic() - killed_at < 60
    assert failed["status"] == "failed"
    assert failed["error"]["title"] == "Worker lost" and "worker lost" in failed["error"]["detail"]
    assert failed["artifacts"] == []
    service.start_worker()
    assert wait_for_job(client, queued_next["id"], timeout=120)["status"] == "succeeded"


def test_job_timeout_is_a_clear_failure(service, client, tiny_models):
    install_model(service, tiny_models["sd1"])
    service.start_worker(MERGEPROBE_JOB_TIMEOUTS='{"inspect": 2}', **SLOW)
    service.env["MERGEPROBE_JOB_TIMEOUTS"] = '{"inspect": 2}'
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = service.settings(job_timeouts={"inspect": 2})
    with TestClient(create_app(settings)) as short:
        job = short.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
        job = wait_for_job(short, job["id"], timeout=60)
    assert job["status"] == "failed"
    assert job["error"]["title"] == "Job timed out" and "2 s" in job["error"]["detail"]
    assert not (service.data_dir / "artifacts" / job["id"]).exists()
