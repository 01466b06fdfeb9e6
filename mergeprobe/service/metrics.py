"""Prometheus metrics, kept in Redis so that every API process and worker agree.

The job store maintains the numbers (`mergeprobe/service/jobs.py`): a hash of jobs per kind and
status updated in the same MULTI as each transition, a duration histogram observed when a
job that ran ends, and named counters (`JobStore.add_counter`) such as the bytes a merge
read and wrote. `GET /metrics` reads them in one round trip and renders the text format
with prometheus-client's exposition helpers, from a collector built per request: nothing is
registered in prometheus-client's global registry. No torch here: the API imports this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

# Upper bounds (seconds) of the job duration histogram: tiny inspects take well under a
# second, SDXL merges from slow disks and sweeps take hours.
DURATION_BUCKETS: tuple[float, ...] = (
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    2 * 3600,
    4 * 3600,
    6 * 3600,
)

# The counters `JobStore.add_counter(name, value)` accepts, and what each counts. Exposed as
# `mergeprobe_<name>_total`.
COUNTERS: dict[str, str] = {
    "merge_bytes_read": "Bytes of input tensors read by merge and elemental jobs that succeeded.",
    "merge_bytes_written": "Bytes of merged checkpoints written by merge and elemental jobs that succeeded.",
    "import_bytes": "Bytes downloaded by import jobs that succeeded.",
    "jobs_rejected": "Job submissions refused with 429 because the queue held MERGEPROBE_MAX_QUEUED jobs.",
}


def bucket_label(seconds: float) -> str:
    """The field under which an observation is counted: its bucket's upper bound, or +Inf."""
    for bound in DURATION_BUCKETS:
        if seconds <= bound:
            return f"{bound:g}"
    return "+Inf"


@dataclass
class _Histogram:
    buckets: dict[str, int] = field(default_factory=dict)  # bound label -> observations (not cumulative)
    count: int = 0
    sum: float = 0.0

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, observations ≤ le) for each bucket, le written the way client libraries write it."""
        from prometheus_client.utils import floatToGoString

        observed = [(math.inf if label == "+Inf" else float(label), n) for label, n in self.buckets.items()]
        out = [
            (floatToGoString(bound), float(sum(n for b, n in observed if b <= bound)))
            for bound in DURATION_BUCKETS
        ]
        out.append(("+Inf", float(self.count)))
        return out


@dataclass
class MetricsSnapshot:
    """Everything `/metrics` shows, read from Redis before anything is rendered (so that a
    Redis failure surfaces as the API's 503, not half a page)."""

    kinds: tuple[str, ...]  # every job kind and status gets a series, zero until one is seen
    statuses: tuple[str, ...]
    jobs: dict[tuple[str, str], int]
    durations: dict[tuple[str, str], _Histogram]
    counters: dict[str, float]
    queue_depth: int
    max_queued: int
    workers: int
    busy_workers: int

    @classmethod
    def from_stats(
        cls,
        raw: dict,
        workers: list[dict],
        *,
        max_queued: int,
        kinds: tuple[str, ...],
        statuses: tuple[str, ...],
    ) -> MetricsSnapshot:
        """From the job store's stats hashes (`JobStore.stats_snapshot`) and its live workers."""
        durations: dict[tuple[str, str], _Histogram] = {}
        for name, value in raw["durations"].items():
            kind, status, part = name.rsplit(":", 2)
            hist = durations.setdefault((kind, status), _Histogram())
            if part == "count":
                hist.count = int(float(value))
            elif part == "sum":
                hist.sum = float(value)
            else:
                hist.buckets[part] = int(float(value))
        return cls(
            kinds=kinds,
            statuses=statuses,
            jobs={tuple(k.rsplit(":", 1)): max(0, int(v)) for k, v in raw["jobs"].items()},  # type: ignore[misc]
            durations=durations,
            counters={k: float(v) for k, v in raw["counters"].items()},
            queue_depth=raw["queue_depth"],
            max_queued=max_queued,
            workers=len(workers),
            busy_workers=sum(1 for w in workers if w.get("job")),
        )

    def collect(self) -> Iterator:
        """prometheus-client's collector protocol: the metric families of this snapshot."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        jobs = GaugeMetricFamily(
            "mergeprobe_jobs",
            "Jobs in the job store by kind and status (queued and running: now; others: since the store began).",
            labels=["kind", "status"],
        )
        keys = {(k, s) for k in self.kinds for s in self.statuses} | set(self.jobs)
        for kind, status in sorted(keys):
            jobs.add_metric([kind, status], self.jobs.get((kind, status), 0))
        yield jobs

        yield GaugeMetricFamily(
            "mergeprobe_queue_depth", "Jobs waiting in the queue for a worker.", value=self.queue_depth
        )
        yield GaugeMetricFamily(
            "mergeprobe_queue_limit",
            "MERGEPROBE_MAX_QUEUED: queued jobs beyond which submissions get 429 (0: no limit).",
            value=self.max_queued,
        )
        yield GaugeMetricFamily(
            "mergeprobe_workers", "Live workers (heartbeat within MERGEPROBE_WORKER_TTL).", value=self.workers
        )
        yield GaugeMetricFamily(
            "mergeprobe_workers_busy", "Live workers running a job now.", value=self.busy_workers
        )

        durations = HistogramMetricFamily(
            "mergeprobe_job_duration_seconds",
            "Run time of jobs that started (started_at to finished_at), by kind and final status.",
            labels=["kind", "status"],
        )
        for (kind, status), hist in sorted(self.durations.items()):
            durations.add_metric([kind, status], buckets=hist.cumulative(), sum_value=hist.sum)
        yield durations

        for name, help_text in COUNTERS.items():
            yield CounterMetricFamily(f"mergeprobe_{name}", help_text, value=self.counters.get(name, 0.0))


# The classic text format (every Prometheus version parses it; our names need no escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(snapshot: MetricsSnapshot) -> bytes:
    """The Prometheus text exposition of a snapshot (media type `CONTENT_TYPE`)."""
    from prometheus_client.exposition import generate_latest

    return generate_latest(snapshot)  # type: ignore[arg-type]
