"""The model library's throughput: upload, download and import of a full-size SD1 file against the
disk's own copy speed, and the worker cache's hit path on the s3 backend.

    python benchmarks/library_bench.py [--dir DIR] [--keep] [--repeat N] [--runs copy,upload,download,import,cache]

A full-size random SD1 fp16 checkpoint (2.13 GB, the real key names and shapes) is written into
DIR/source (reused with --keep) and read once to warm the page cache. The service runs as users
run it: `mergeprobe serve` and `mergeprobe worker` subprocesses against Redis (REDIS_URL, else the
one on 127.0.0.1:6379), the client here speaks HTTP to it.

* copy      the floor: read the file and write a copy, 16 MB at a time, then fsync the copy (every
            path below ends with the file durable on disk too). Measured before and after each
            repeat's service runs: this VM's write-back speed drifts between 0.3 and 1.4 GB/s.
* upload    `curl -T FILE -X POST /v1/models?name=…` (the file streamed as the body), until the 201
            (the API hashes, writes, fsyncs, validates and registers it).
* download  `curl -o FILE /v1/models/{id}/file`, then fsync of FILE.
* import    `POST /v1/jobs/import` from an HTTP server on this host serving DIR/source, until the job
            succeeded (the worker downloads, hashes, writes, fsyncs, validates and registers it).
* cache     the s3 backend (moto's S3 server, in memory, started here): upload the file, then two
            `inspect` jobs on it: the first fetches it into the worker's cache, the second must find
            it there (the cached file keeps its inode: not one byte read from the store).

Ratios are copy seconds / run seconds (throughput relative to the disk's copy speed; the target
for upload, download and import is >= 0.7).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHUNK = 16 * 1024 * 1024
SOURCE = "bench-lib.safetensors"
ALL_RUNS = ("copy", "upload", "download", "import", "cache")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsync(path: Path) -> None:
    from mergeprobe.service.durable import fsync_file

    fsync_file(path)


class Service:
    """`mergeprobe serve` (no embedded Redis: REDIS_URL is set) and one `mergeprobe worker`."""

    def __init__(self, directory: Path, redis_url: str, **settings: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "MERGEPROBE_DATA_DIR": str(directory),
            "MERGEPROBE_KEY_PREFIX": f"bench-{secrets.token_hex(4)}",
            "MERGEPROBE_LOG_LEVEL": "WARNING",
            **{f"MERGEPROBE_{k.upper()}": v for k, v in settings.items()},
        }
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Service:
        cli = [sys.executable, "-m", "mergeprobe.cli"]
        self.procs.append(subprocess.Popen([*cli, "serve", "--port", str(self.port)], env=self.env))
        self.procs.append(subprocess.Popen([*cli, "worker"], env=self.env))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not become ready")

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(30)

    def wait(self, job_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = httpx.get(f"{self.base}/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
            time.sleep(0.05)
        raise RuntimeError(f"job {job_id} did not end")


def run_copy(source: Path, directory: Path) -> float:
    out = directory / "copy.safetensors"
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(source, "rb", buffering=0) as fi, open(out, "wb", buffering=0) as fo:
        while n := fi.readinto(view):
            chunk = view[:n]
            while chunk:
                chunk = chunk[fo.write(chunk) :]
        os.fsync(fo.fileno())
    seconds = time.perf_counter() - t0
    out.unlink()
    return seconds


def run_upload(service: Service, source: Path, name: str) -> tuple[float, dict]:
    """curl, as the README shows users (-T streams the file; --data-binary would read it whole)."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            "-X",
            "POST",
            "-T",
            str(source),
            "-H",
            "Expect:",
            f"{service.base}/v1/models?name={name}",
        ],
        capture_output=True,
        check=True,
    )
    seconds = time.perf_counter() - t0
    return seconds, json.loads(out.stdout)


def run_download(service: Service, model_id: str, directory: Path, sha256: str) -> float:
    """curl into a file, then fsync it (the copy floor ends with its copy on disk too); the sha256
    is checked after the timed section."""
    out = directory / "download.safetensors"
    t0 = time.perf_counter()
    subprocess.run(
        ["curl", "-sS", "--fail", "-o", str(out), f"{service.base}/v1/models/{model_id}/file"], check=True
    )
    _fsync(out)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    with open(out, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    out.unlink()
    if digest.hexdigest() != sha256:
        raise RuntimeError("the download's sha256 differs from the model's")
    return seconds


def run_import(service: Service, url: str, name: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    response = httpx.post(f"{service.base}/v1/jobs/import", json={"url": url, "name": name}, timeout=30)
    response.raise_for_status()
    job = service.wait(response.json()["id"])
    seconds = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise RuntimeError(f"import failed: {job.get('error')}")
    return seconds, job


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that sends with sendfile(2), as nginx and the object stores a user
    imports from do, so that the figure is the import's own speed, not http.server's."""

    def log_message(self, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        outputfile.flush()
        self.connection.sendfile(source)


def serve_directory(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def run_cache(source: Path, directory: Path, redis_url: str) -> dict:
    """Upload to the s3 library, then two inspect jobs: fetch, then hit."""
    from moto.server import ThreadedMotoServer

    # Dummy credentials for the in-memory S3 server started here (the service's subprocesses inherit them).
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    worker_dir = directory / "s3-host"
    settings = {
        "library_backend": "s3",
        "s3_bucket": "bench",
        "s3_endpoint_url": endpoint,
        "s3_region": "us-east-1",
    }
    figures: dict = {}
    try:
        with Service(worker_dir, redis_url, **settings) as service:
            figures["upload_s3_s"], model = run_upload(service, source, "bench-s3.safetensors")
            cached = worker_dir / "cache" / "models" / f"{model['sha256']}.safetensors"
            for label in ("first", "second"):
                t0 = time.perf_counter()
                job = httpx.post(f"{service.base}/v1/jobs/inspect", json={"model": "bench-s3"}).json()
                job = service.wait(job["id"])
                figures[f"inspect_{label}_s"] = time.perf_counter() - t0
                assert job["status"] == "succeeded", job
                figures[f"inode_{label}"] = cached.stat().st_ino
            figures["second_job_fetched"] = figures["inode_first"] != figures["inode_second"]
    finally:
        moto.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/mergeprobe-bench-library")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", default=",".join(ALL_RUNS))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    runs = args.runs.split(",")
    directory = Path(args.dir)
    (directory / "source").mkdir(parents=True, exist_ok=True)
    source = directory / "source" / SOURCE
    from worker.checkpoints.full_layouts import write_random_checkpoint

    if not (args.keep and source.is_file()):
        write_random_checkpoint("sd1", source, seed=1, dtype="fp16")
    size = source.stat().st_size
    with open(source, "rb") as fh:  # warm the page cache
        while fh.read(CHUNK):
            pass
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    times: dict[str, list[float]] = {run: [] for run in runs if run != "cache"}
    extra: dict = {}
    for i in range(args.repeat):
        if "copy" in runs:
            os.sync()
            times["copy"].append(run_copy(source, directory))
        if {"upload", "download", "import"} & set(runs):
            local = directory / f"local-{i}"
            with Service(local, redis_url) as service:
                seconds, model = run_upload(service, source, f"bench-up-{i}.safetensors")
                if "upload" in runs:
                    times["upload"].append(seconds)
                if "download" in runs:
                    times["download"].append(run_download(service, model["id"], directory, model["sha256"]))
                if "import" in runs:
                    server, url = serve_directory(directory / "source")
                    try:
                        seconds, job = run_import(service, f"{url}/{SOURCE}", f"bench-imp-{i}.safetensors")
                    finally:
                        server.shutdown()
                    times["import"].append(seconds)
            subprocess.run(["rm", "-rf", str(local)], check=True)
            os.sync()
            if "copy" in runs:  # the floor on both sides of the service's runs: this disk's speed drifts
                times["copy"].append(run_copy(source, directory))
    if "cache" in runs:
        extra = run_cache(source, directory, redis_url)
    copy = statistics.median(times["copy"]) if times.get("copy") else None
    print(f"\nsd1 fp16, {size / 1e9:.2f} GB, {args.repeat} repeats (median, min, max seconds; MB/s; / copy)")
    summary = {}
    for run, values in times.items():
        med = statistics.median(values)
        summary[run] = {
            "median_s": med,
            "min_s": min(values),
            "max_s": max(values),
            "mb_per_s": size / med / 1e6,
        }
        ratio = f"{copy / med:.2f}" if copy else "-"
        print(
            f"{run:9} {med:7.2f} {min(values):7.2f} {max(values):7.2f} {size / med / 1e6:8.0f} MB/s  x{ratio}"
        )
    if extra:
        print(json.dumps(extra, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "runs": summary, "cache": extra}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
