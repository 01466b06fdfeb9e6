"""The worker process: an rq SimpleWorker (no fork per job, so cached models and
CUDA survive between jobs) plus a heartbeat thread that keeps this worker and its
job visibly alive and fails the jobs of workers that died."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from rq import SimpleWorker
from rq.serializers import JSONSerializer

from mergeprobe.service.jobs import FINAL_STATUSES
from mergeprobe.service.logging import configure_from_settings, job_logging
from worker.runtime import WorkerRuntime, get_runtime

log = logging.getLogger("mergeprobe.worker")
_REAP_EVERY = 5.0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


class Heartbeat(threading.Thread):
    def __init__(self, runtime: WorkerRuntime, info: dict) -> None:
        super().__init__(name="mergeprobe-heartbeat", daemon=True)
        self.runtime = runtime
        self.info = info
        self.stopping = threading.Event()

    def run(self) -> None:
        store = self.runtime.store
        last_reap = 0.0
        while not self.stopping.is_set():
            try:
                store.announce_worker(self.runtime.name, {**self.info, "job": self.runtime.current_job_id})
                with self.runtime.lock:
                    job_id = self.runtime.current_job_id
                if job_id:
                    store.beat(job_id)
                if time.monotonic() - last_reap > _REAP_EVERY:
                    last_reap = time.monotonic()
                    for lost in store.reap_lost():
                        log.warning("job %s failed: its worker was lost", lost)
                        self.runtime.artifacts.remove_job(lost)
                        self.runtime.library.remove_partials(lost)
            except Exception:  # noqa: BLE001 - Redis hiccups must not kill the heartbeat
                log.exception("heartbeat failed")
            self.stopping.wait(self.runtime.settings.heartbeat_interval)


class MergeprobeWorker(SimpleWorker):
    """rq's in-process worker, with our heartbeat thread running for as long as it works."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(
            [runtime.store.queue],
            connection=runtime.store.redis,
            serializer=JSONSerializer,
            name=f"{runtime.name}.{os.urandom(3).hex()}",
        )
        self.runtime = runtime

    def work(self, *args, **kwargs) -> bool:
        info = {
            "name": self.runtime.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": _device_name(),
        }
        heartbeat = Heartbeat(self.runtime, info)
        heartbeat.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            heartbeat.stopping.set()

    def execute_job(self, job, queue):
        """rq's own lines about the job (result, failure) carry its id too."""
        with job_logging(job.id):
            return super().execute_job(job, queue)


def remove_orphan_partials(runtime: WorkerRuntime) -> None:
    """Temp files in the library of jobs that are over: their worker died before its cleanup ran
    and the reaper that failed the job could not reach this library. Jobs still queued or running
    (perhaps on another worker) and unknown ids (another key prefix sharing the library) are left."""
    try:
        for job_id in runtime.library.partial_job_ids():
            job = runtime.store.get(job_id)
            if job is not None and job["status"] in FINAL_STATUSES:
                for path in runtime.library.remove_partials(job_id):
                    log.warning("removed %s, left by job %s (%s)", path.name, job_id, job["status"])
    except Exception:  # noqa: BLE001 - housekeeping must not keep the worker from starting
        log.exception("could not sweep the library's temp files")


def run_worker(burst: bool = False) -> None:
    runtime = get_runtime()
    configure_from_settings(runtime.settings)
    runtime.name = f"{socket.gethostname()}.{os.getpid()}"
    remove_orphan_partials(runtime)
    try:
        for path in runtime.library.sweep_abandoned_uploads():
            log.warning("removed %s, a temp file whose writer is gone", path.name)
    except Exception:  # noqa: BLE001 - housekeeping must not keep the worker from starting
        log.exception("could not sweep abandoned temp files")
    MergeprobeWorker(runtime).work(burst=burst, logging_level="INFO")
