"""Faults against real processes: Redis stopped and restarted under a running API, a worker
SIGKILLed in the middle of a merge, a full artifacts disk, and oversized request bodies sent
over a raw socket to `mergeprobe serve`."""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, install_model, wait_for, wait_for_job

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PROBLEM = "application/problem+json"
MERGE = {
    "model_a": "tiny-sd1-a",
    "model_b": "tiny-sd1-b",
    "alpha": 0.5,
    "output": {"name": "blend.safetensors"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_client(settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    return TestClient(create_app(settings))


# -- Redis stopped and restarted -------------------------------------------------------------


def _start_redis(port: int, directory: Path) -> subprocess.Popen:
    import redis

    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
        + ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    conn = redis.Redis(port=port, socket_connect_timeout=0.5)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {proc.returncode}")
        try:
            return bool(conn.ping())
        except redis.RedisError:
            return False

    wait_for(up, timeout=10, interval=0.05)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # redis-server: fsync the append-only file, then exit
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not os.access(REDIS_SERVER, os.X_OK), reason="needs the redis-server binary")
def test_api_answers_503_while_redis_is_down_and_recovers_without_restart(tmp_path, tiny_models):
    port = _free_port()
    (tmp_path / "redis").mkdir()
    redis_proc = _start_redis(port, tmp_path / "redis")
    service = Service(f"redis://127.0.0.1:{port}/0", tmp_path / "data")
    service.models_dir.mkdir(parents=True)
    install_model(service, tiny_models["sd1"])
    try:
        with _app_client(service.settings()) as client:
            job = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
            assert job["status"] == "queued"

            _stop(redis_proc)
            for method, path, body in (
                ("GET", "/v1/jobs", None),
                ("GET", f"/v1/jobs/{job['id']}", None),
                ("POST", "/v1/jobs/inspect", {"model": "tiny-sd1-a"}),
                ("GET", "/readyz", None),
            ):
                began = time.monotonic()
                response = client.request(method, path, json=body)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["content-type"] == PROBLEM
                assert response.json()["type"].endswith("/redis-unavailable")
                assert response.headers["retry-after"] == "5"
                assert time.monotonic() - began < 5, f"{path} took too long to give up"
            assert client.get("/healthz").status_code == 200  # the process itself is fine

            # Same port, same directory: the API reconnects by itself and the queued job is still there.
            redis_proc = _start_redis(port, tmp_path / "redis")
            back = wait_for(
                lambda: (r := client.get(f"/v1/jobs/{job['id']}")).status_code == 200 and r, timeout=10
            )
            assert back.json()["status"] == "queued"
            assert client.get("/v1/jobs").json()["jobs"][0]["id"] == job["id"]
            service.start_worker()
            done = wait_for_job(client, job["id"], timeout=120)
            assert done["status"] == "succeeded", done["error"]
            assert client.get("/readyz").status_code == 200
    finally:
        service.stop_workers()
        _stop(redis_proc)


# -- a worker SIGKILLed mid-merge ----------------------------------------------------------


def test_sigkilled_merge_worker_leaves_no_partial_file(service, client, tiny_models):
    install_model(service, tiny_models["sd1"])
    install_model(service, tiny_models["sd1-b"])
    victim = service.start_worker(MERGEPROBE_DEBUG_TENSOR_DELAY="0.01")
    job = client.post("/v1/jobs/merge", json=MERGE).json()
    wait_for(
        lambda: (
            (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] == "running"
            and j["progress"]["completed"] > 0
        ),
        timeout=60,
    )
    partials = wait_for(lambda: list(service.models_dir.glob(".partial-*")), timeout=10)
    assert [p.name for p in partials] == [f".partial-{job['id']}-blend.safetensors"]

    victim.send_signal(signal.SIGKILL)
    victim.wait()
    failed = wait_for_job(client, job["id"], timeout=60)
    assert failed["status"] == "failed" and "worker lost" in failed["error"]["detail"]
    # The reaper (here the API's) removes the dead job's half-written model.
    wait_for(lambda: not list(service.models_dir.glob(".partial-*")), timeout=10)
    assert not (service.models_dir / "blend.safetensors").exists()
    assert {m["id"] for m in client.get("/v1/models").json()["models"]} == {"tiny-sd1-a", "tiny-sd1-b"}

    # A reaper elsewhere could not reach this library: a starting worker sweeps what is left.
    stray = service.models_dir / f".partial-{job['id']}-blend.safetensors"
    stray.write_bytes(b"half a model")
    service.start_worker()
    again = client.post("/v1/jobs/merge", json=MERGE).json()
    done = wait_for_job(client, again["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert not stray.exists()
    assert (service.models_dir / "blend.safetensors").is_file()
    assert not list(service.models_dir.glob(".partial-*"))


# -- artifacts disk full -------------------------------------------------------------------


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while fh.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: writes past it fail with ENOSPC like a full disk."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_artifacts_disk_fails_the_job_cleanly_and_the_worker_carries_on(
    service, tiny_models, small_disk
):
    install_model(service, tiny_models["sd1"])
    service.start_worker(MERGEPROBE_ARTIFACTS_DIR=str(small_disk))
    with _app_client(service.settings(artifacts_dir=small_disk)) as client:
        filler = _fill(small_disk)
        job = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
        failed = wait_for_job(client, job["id"], timeout=120)
        assert failed["status"] == "failed"
        assert failed["error"]["title"] == "No space left on device"
        assert "no space left" in failed["error"]["detail"]
        assert failed["artifacts"] == []
        assert not (small_disk / job["id"]).exists()
        assert [p.name for p in small_disk.rglob("*")] == ["filler"]  # no partial file left

        filler.unlink()  # space freed: the same worker takes the next job
        again = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
        done = wait_for_job(client, again["id"], timeout=120)
        assert done["status"] == "succeeded", done["error"]
        assert client.get(done["artifacts"][0]["url"]).text.startswith("block,params")
    assert all(w.poll() is None for w in service.workers)


def test_disk_full_is_recognised_also_when_a_library_wraps_it():
    from worker.tasks import _disk_full

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/artifacts/x/.tmp")
        except OSError as exc:
            raise RuntimeError("safetensors: write failed") from exc
    except RuntimeError as wrapped:
        problem = _disk_full(wrapped)
    assert problem["status"] == 507 and problem["type"].endswith("/disk-full")
    assert "no space left" in problem["detail"] and "/data/artifacts/x/.tmp" in problem["detail"]
    assert _disk_full(OSError(errno.EACCES, "Permission denied")) is None


# -- oversized bodies over a raw socket ----------------------------------------------------

UPLOAD_CAP = 1024**3  # 1 GiB


@pytest.fixture(scope="module")
def served(redis_url, tmp_path_factory):
    """`mergeprobe serve` on a free loopback port (REDIS_URL set: no embedded Redis, no workers)."""
    service = Service(
        redis_url,
        tmp_path_factory.mktemp("served") / "data",
        MERGEPROBE_MAX_UPLOAD_BYTES=str(UPLOAD_CAP),
        MERGEPROBE_MAX_REQUEST_BYTES=str(1024**2),
    )
    service.models_dir.mkdir(parents=True)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeprobe.cli", "serve", "--port", str(port)],
        env=service.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"mergeprobe serve exited with {proc.returncode}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=60)
        yield port, service
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        service.purge()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("expect_continue", [False, True])
def test_upload_announcing_10_gb_is_refused_before_its_body_is_read(served, expect_continue):
    port, service = served
    head = (
        "POST /v1/models?name=huge.safetensors HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/octet-stream\r\n"
        "Content-Length: 10737418240\r\n" + ("Expect: 100-continue\r\n" if expect_continue else "") + "\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # A curl-like client waits for 100 Continue before the body; a plain one starts sending.
        sock.sendall(head.encode() + (b"" if expect_continue else b"\0" * 16))
        began = time.monotonic()
        status, headers, body = _read_response(sock)
    assert time.monotonic() - began < 3  # answered at once, not after 10 GB or a timeout
    assert status == 413  # for expect_continue: no "100 Continue" first, so no body is ever sent
    assert headers["content-type"] == PROBLEM
    problem = json.loads(body)
    assert problem["type"].endswith("/upload-too-large") and str(UPLOAD_CAP) in problem["detail"]
    assert not list(service.models_dir.iterdir())  # not even a temp file


def test_100_mb_json_body_is_refused_early(served):
    port, _ = served
    # Announced: refused from the Content-Length alone.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/jobs/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 104857600\r\n\r\n" + b'{"model": "'
        )
        status, headers, body = _read_response(sock)
    assert status == 413 and json.loads(body)["type"].endswith("/request-too-large")

    # Streamed (chunked, no length): the server counts while it reads and stops past 1 MiB.
    total = 100 * 1024**2
    chunk = b"a" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent = 0
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/jobs/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nb\r\n" + b'{"model": "' + b"\r\n"
        )
        sock.settimeout(0.5)
        while sent < total and not select.select([sock], [], [], 0)[0]:  # until the answer is there
            try:
                sock.sendall(frame)
            except TimeoutError:
                continue  # the server stopped reading: its answer is on the way
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.settimeout(10)
        status, headers, body = _read_response(sock)
    assert status == 413 and json.loads(body)["type"].endswith("/request-too-large"), (sent, body)
    # What was sent when the server gave up: the 1 MiB cap plus what socket buffers took in.
    assert sent < total // 4, f"{sent} bytes went out before the server answered"
    assert time.monotonic() - began < 10
