"""`mergeprobe serve` with no REDIS_URL runs the whole service: embedded Redis
(its data file under the data dir) plus worker subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import httpx

from tests.conftest import wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(data_dir, port, workers):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MERGEPROBE_")}
    env.update(MERGEPROBE_DATA_DIR=str(data_dir), MERGEPROBE_WORKERS=str(workers))
    return subprocess.Popen(
        [sys.executable, "-m", "mergeprobe.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _up(base):
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_embedded_runs_jobs_and_keeps_queued_ones_across_restart(tmp_path, tiny_models):
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    shutil.copyfile(tiny_models["sd1"], models / tiny_models["sd1"].name)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"

    # First run without workers: the job stays queued; then stop the service.
    proc = _serve(tmp_path / "data", port, workers=0)
    try:
        wait_for(lambda: _up(base), timeout=60)
        job = httpx.post(f"{base}/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
        assert job["status"] == "queued"
        assert httpx.get(f"{base}/readyz").status_code == 503
    finally:
        _stop(proc)
    assert (tmp_path / "data" / "redis").is_dir()

    # Second run with one worker: the same job runs to completion.
    proc = _serve(tmp_path / "data", port, workers=1)
    try:
        wait_for(lambda: _up(base), timeout=60)
        done = wait_for(
            lambda: (j := httpx.get(f"{base}/v1/jobs/{job['id']}").json())["status"] == "succeeded" and j,
            timeout=120,
        )
        assert done["result"]["arch"] == "sd1"
        assert httpx.get(f"{base}{done['artifacts'][0]['url']}").status_code == 200
        assert httpx.get(f"{base}/readyz").json()["workers"] == 1
    finally:
        _stop(proc)
