"""Job records and the queue, in Redis. Shared by the API (create, list, cancel) and
the worker (claim, progress, finish, heartbeat).

Our own JSON record per job is the source of truth for clients; rq only carries
the job id to a worker. rq uses its JSON serializer on both sides: a pickle in
Redis would let anyone who can write to Redis run code on the workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer

from mergeprobe.service.errors import Conflict, NotFound, Overloaded
from mergeprobe.service.metrics import COUNTERS, MetricsSnapshot, bucket_label
from mergeprobe.service.problems import Problem
from mergeprobe.service.settings import Settings

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
TASK_PATH = "worker.tasks.run_job"
IDEMPOTENCY_TTL = 24 * 3600
QUEUE_FULL_RETRY_AFTER = 10  # seconds a client is asked to wait when the queue is full


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def new_job_id() -> str:
    """24 hex digits, time-ordered, so that the job index sorts newest last by id alone."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def body_fingerprint(kind: str, body: Any) -> str:
    return hashlib.sha256(
        json.dumps([kind, body], sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def problem_dict(status: int, slug: str, title: str, detail: str) -> dict[str, Any]:
    return Problem(status, slug, title, detail).to_dict()


class JobStore:
    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.redis = connection
        self.settings = settings
        self.prefix = settings.key_prefix
        self.queue = Queue(f"{self.prefix}-jobs", connection=connection, serializer=JSONSerializer)

    # -- keys ---------------------------------------------------------------
    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def _index_key(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def _running_key(self) -> str:
        return f"{self.prefix}:running"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def heartbeat_key(self, job_id: str) -> str:
        return f"{self.prefix}:hb:{job_id}"

    def worker_key(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def stats_key(self, name: str) -> str:
        """Metrics hashes: `jobs` (kind:status -> count), `duration` (kind:status:bucket|sum|count
        -> observations), `counters` (name -> total)."""
        return f"{self.prefix}:stats:{name}"

    # -- create and read ----------------------------------------------------
    def create(
        self,
        kind: str,
        request: dict[str, Any],
        inputs: dict[str, Any],
        idempotency: tuple[str, str] | None = None,
        *,
        timeout: int,
    ) -> tuple[dict, bool]:
        """Store and enqueue a job. Returns (job, created); with an idempotency
        (key, fingerprint) already seen, returns the first job instead, or 409
        when the body differs."""
        job_id = new_job_id()
        if idempotency is not None:
            key, fingerprint = idempotency
            idem_key = f"{self.prefix}:idem:{hashlib.sha256(key.encode()).hexdigest()}"
            claimed = self.redis.set(
                idem_key, json.dumps({"fp": fingerprint, "job": job_id}), nx=True, ex=IDEMPOTENCY_TTL
            )
            if not claimed:
                seen = json.loads(self.redis.get(idem_key) or "{}")
                if seen.get("fp") != fingerprint:
                    raise Conflict(
                        "idempotency-key-reused",
                        "Idempotency key reused",
                        "this Idempotency-Key was already used with a different request body",
                        field="Idempotency-Key",
                    )
                existing = self._wait_for(seen["job"])
                if existing is not None:
                    return existing, False
        job = {
            "id": job_id,
            "kind": kind,
            "status": "queued",
            "progress": {"completed": 0, "total": 0, "stage": "queued"},
            "created_at": now_iso(),
            "started_at": None,
            "finished_at": None,
            "request": request,
            "inputs": inputs,
            "artifacts": [],
            "result": None,
            "error": None,
            "warnings": [],
        }
        # One MULTI/EXEC, one round trip: the record, the index and the rq job appear together or
        # not at all (no record left "queued" without an rq job when the API dies in between).
        with self.redis.pipeline() as pipe:
            pipe.multi()
            pipe.set(self._job_key(job_id), json.dumps(job))
            pipe.zadd(self._index_key, {job_id: 0})
            pipe.hincrby(self.stats_key("jobs"), f"{kind}:queued", 1)
            self.queue.enqueue(
                TASK_PATH,
                job_id,
                job_id=job_id,
                job_timeout=timeout,
                result_ttl=3600,
                failure_ttl=24 * 3600,
                description=f"{kind} {job_id}",
                pipeline=pipe,
            )
            pipe.execute()
        return job, True

    def _wait_for(self, job_id: str, seconds: float = 2.0) -> dict | None:
        """The job a concurrent request with the same idempotency key is creating."""
        deadline = time.monotonic() + seconds
        while True:
            job = self.get(job_id)
            if job is not None or time.monotonic() > deadline:
                return job
            time.sleep(0.01)

    def get(self, job_id: str) -> dict | None:
        raw = self.redis.get(self._job_key(job_id))
        return json.loads(raw) if raw else None

    def require(self, job_id: str) -> dict:
        job = self.get(job_id) if len(job_id) == 24 else None
        if job is None:
            raise NotFound("unknown-job", "Unknown job", f"no job {job_id!r}", field="id")
        return job

    def list(
        self, kind: str | None = None, status: str | None = None, cursor: str | None = None, limit: int = 50
    ) -> tuple[list[dict], str | None]:
        """Newest first. The cursor is the id of the last job of the previous page."""
        jobs: list[dict] = []
        upper = f"({cursor}" if cursor else "+"
        batch = max(limit * 2, 100)
        while len(jobs) < limit:
            ids = self.redis.zrevrangebylex(self._index_key, upper, "-", start=0, num=batch)
            if not ids:
                return jobs, None
            ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
            raws = self.redis.mget([self._job_key(i) for i in ids])
            for job_id, raw in zip(ids, raws, strict=True):
                if not raw:
                    continue
                job = json.loads(raw)
                if (kind and job["kind"] != kind) or (status and job["status"] != status):
                    continue
                jobs.append(job)
                if len(jobs) == limit:
                    return jobs, job_id
            upper = f"({ids[-1]}"
        return jobs, None

    # -- transitions --------------------------------------------------------
    def _transition(
        self, job_id: str, allowed: set[str] | frozenset[str], patch: dict[str, Any]
    ) -> dict | None:
        """Apply `patch` if the job's status is in `allowed`; atomic against other writers."""
        key = self._job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if not raw:
                        return None
                    job = json.loads(raw)
                    if job["status"] not in allowed:
                        pipe.unwatch()
                        return None
                    previous = job["status"]
                    job.update(patch)
                    pipe.multi()
                    pipe.set(key, json.dumps(job))
                    if job["status"] != previous:
                        self._count_transition(pipe, job, previous)
                    if job["status"] in FINAL_STATUSES:
                        pipe.srem(self._running_key, job_id)
                        pipe.delete(self.heartbeat_key(job_id), self.cancel_key(job_id))
                    pipe.execute()
                    return job
                except redis.WatchError:
                    continue

    def _count_transition(self, pipe: redis.client.Pipeline, job: dict, previous: str) -> None:
        """Queue, inside the transition's MULTI, the metrics updates of a status change."""
        kind, status = job["kind"], job["status"]
        pipe.hincrby(self.stats_key("jobs"), f"{kind}:{previous}", -1)
        pipe.hincrby(self.stats_key("jobs"), f"{kind}:{status}", 1)
        if status in FINAL_STATUSES and job.get("started_at") and job.get("finished_at"):
            elapsed = _parse_iso(job["finished_at"]) - _parse_iso(job["started_at"])
            seconds = max(0.0, elapsed.total_seconds())
            durations = self.stats_key("duration")
            pipe.hincrby(durations, f"{kind}:{status}:{bucket_label(seconds)}", 1)
            pipe.hincrby(durations, f"{kind}:{status}:count", 1)
            pipe.hincrbyfloat(durations, f"{kind}:{status}:sum", seconds)

    def claim(self, job_id: str, worker_name: str) -> dict | None:
        """queued → running, or None when the job was canceled (or is gone) meanwhile."""
        self.beat(job_id)
        self.redis.sadd(self._running_key, job_id)
        job = self._transition(
            job_id,
            {"queued"},
            {
                "status": "running",
                "started_at": now_iso(),
                "worker": worker_name,
                "progress": {"completed": 0, "total": 0, "stage": "starting"},
            },
        )
        if job is None:
            self.redis.srem(self._running_key, job_id)
        return job

    def beat(self, job_id: str) -> None:
        self.redis.set(self.heartbeat_key(job_id), "1", ex=self.settings.worker_ttl)

    def set_progress(self, job_id: str, completed: int, total: int, stage: str) -> None:
        self._transition(
            job_id, {"running"}, {"progress": {"completed": completed, "total": total, "stage": stage}}
        )

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        result: Any = None,
        artifacts: list[dict] | None = None,
        error: dict | None = None,
        warnings: list[str] | None = None,
    ) -> dict | None:
        patch: dict[str, Any] = {"status": status, "finished_at": now_iso(), "result": result, "error": error}
        if artifacts is not None:
            patch["artifacts"] = artifacts
        if warnings:
            patch["warnings"] = warnings
        return self._transition(job_id, {"running", "queued"}, patch)

    def cancel(self, job_id: str) -> dict:
        """Queued jobs end at once; running ones are asked to stop and end when the engine notices."""
        job = self.require(job_id)
        if job["status"] == "queued":
            done = self._transition(
                job_id,
                {"queued"},
                {
                    "status": "canceled",
                    "finished_at": now_iso(),
                    "error": problem_dict(409, "job-canceled", "Job canceled", "canceled before it started"),
                },
            )
            if done is not None:
                # The rq job may already be gone or taken; our record decides, the worker skips it.
                with contextlib.suppress(Exception):
                    RqJob.fetch(job_id, connection=self.redis, serializer=JSONSerializer).cancel()
                return done
            job = self.require(job_id)
        if job["status"] == "running":
            self.redis.set(self.cancel_key(job_id), "1", ex=24 * 3600)
            job["cancel_requested"] = True
        return job

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(job_id)))

    # -- liveness -----------------------------------------------------------
    def announce_worker(self, name: str, info: dict[str, Any]) -> None:
        self.redis.set(self.worker_key(name), json.dumps(info), ex=self.settings.worker_ttl)

    def live_workers(self) -> list[dict]:
        keys = list(self.redis.scan_iter(match=self.worker_key("*"), count=500))
        return [json.loads(v) for v in self.redis.mget(keys) if v] if keys else []

    def reap_lost(self) -> list[str]:
        """Fail running jobs whose worker stopped beating (SIGKILL, OOM, power loss)."""
        lost = []
        for raw_id in self.redis.smembers(self._running_key):
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            if self.redis.exists(self.heartbeat_key(job_id)):
                continue
            error = problem_dict(
                500,
                "worker-lost",
                "Worker lost",
                f"worker lost: the worker running this job stopped sending heartbeats for "
                f"{self.settings.worker_ttl} s (killed, out of memory or its host went down)",
            )
            job = self._transition(
                job_id, {"running"}, {"status": "failed", "finished_at": now_iso(), "error": error}
            )
            if job is not None:
                lost.append(job_id)
            else:
                self.redis.srem(self._running_key, job_id)
        return lost

    def active_jobs_using(self, sha256: str) -> list[str]:
        """Ids of the queued and running jobs pinned to a model's bytes (every pinned model in a
        job's inputs carries its sha256), oldest first."""
        ids = {i.decode() if isinstance(i, bytes) else i for i in self.redis.smembers(self._running_key)}
        ids.update(self.queue.get_job_ids())
        ordered = sorted(ids)
        using = []
        for job_id, raw in zip(
            ordered, self.redis.mget([self._job_key(i) for i in ordered]) if ordered else [], strict=True
        ):
            if not raw:
                continue
            job = json.loads(raw)
            if job["status"] not in FINAL_STATUSES and sha256 in json.dumps(job.get("inputs")):
                using.append(job_id)
        return using

    def queue_depth(self) -> int:
        return self.queue.count

    # -- metrics and backpressure --------------------------------------------
    def add_counter(self, name: str, value: float) -> None:
        """Add to a named counter shared by every process (see `mergeprobe.service.metrics.COUNTERS`)."""
        if name not in COUNTERS:
            raise ValueError(f"unknown counter {name!r}; known: {', '.join(COUNTERS)}")
        self.redis.hincrbyfloat(self.stats_key("counters"), name, float(value))

    def stats_snapshot(self) -> dict[str, Any]:
        """The metrics hashes and the queue depth, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for name in ("jobs", "duration", "counters"):
            pipe.hgetall(self.stats_key(name))
        pipe.llen(self.queue.key)
        jobs, durations, counters, depth = pipe.execute()

        def text(mapping: dict) -> dict[str, str]:
            return {
                (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in mapping.items()
            }

        return {
            "jobs": text(jobs),
            "durations": text(durations),
            "counters": text(counters),
            "queue_depth": int(depth),
        }

    def metrics(self, kinds: tuple[str, ...]) -> MetricsSnapshot:
        """Everything `/metrics` shows, read before anything is rendered (so that a Redis failure
        surfaces as the API's 503, not half a page)."""
        return MetricsSnapshot.from_stats(
            self.stats_snapshot(),
            self.live_workers(),
            max_queued=self.settings.max_queued,
            kinds=kinds,
            statuses=STATUSES,
        )

    def check_capacity(self) -> None:
        """Backpressure: 429 once MERGEPROBE_MAX_QUEUED jobs wait in the queue (0: no limit)."""
        limit = self.settings.max_queued
        if not limit:
            return
        depth = self.queue_depth()
        if depth >= limit:
            self.add_counter("jobs_rejected", 1)
            raise Overloaded(
                "queue-full",
                "Queue full",
                f"{depth} jobs are waiting for a worker (MERGEPROBE_MAX_QUEUED={limit}); retry later",
                retry_after=QUEUE_FULL_RETRY_AFTER,
            )

    def purge_namespace(self) -> None:
        """Delete every key this store owns: its prefix, its rq queue and registries, and
        the rq records of its jobs (tests use a prefix of their own and clean up with this)."""
        job_ids = [
            i.decode() if isinstance(i, bytes) else i for i in self.redis.zrange(self._index_key, 0, -1)
        ]
        keys = [k for i in job_ids for k in (f"rq:job:{i}", f"rq:results:{i}", f"rq:job:{i}:dependents")]
        for pattern in (f"{self.prefix}:*", f"rq:*{self.prefix}-jobs*"):
            keys.extend(self.redis.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 500):
            self.redis.delete(*keys[start : start + 500])
