"""JSON-lines logs, with the job's id on every line a job produces."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from mergeprobe.service.logging import JobContextFilter, JsonFormatter, TextFormatter, job_logging
from tests.conftest import install_model, wait_for_job


def test_worker_logs_json_lines_with_the_job_id(service, client, tiny_models, tmp_path):
    install_model(service, tiny_models["sd1"])
    job = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
    stderr = tmp_path / "worker.stderr"
    with stderr.open("wb") as err:
        subprocess.run(
            [sys.executable, "-m", "mergeprobe.cli", "worker", "--burst"],
            env={**service.env, "MERGEPROBE_LOG_FORMAT": "json"},
            cwd=service.data_dir,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=120,
            check=True,
        )
    assert wait_for_job(client, job["id"], timeout=5)["status"] == "succeeded"

    lines = [json.loads(line) for line in stderr.read_text().splitlines() if line.strip()]
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= set(line), line
        assert line["ts"].endswith("Z")
    start = next(i for i, x in enumerate(lines) if "picked up" in x["message"])
    end = next(i for i, x in enumerate(lines) if x["message"].startswith(f"job {job['id']} succeeded"))
    during = lines[start : end + 1]
    assert len(during) >= 2
    for line in during:
        assert line.get("job_id") == job["id"] and line.get("kind") == "inspect", line
    # rq's own lines about the job carry its id; the worker's startup lines carry none.
    assert any(x["logger"].startswith("rq.") and x.get("job_id") == job["id"] for x in lines[end + 1 :])
    startup = [x for x in lines[:start] if "started with PID" in x["message"]]
    assert startup and all("job_id" not in x for x in startup)


def _record(message: str, exc_info=None) -> logging.LogRecord:
    record = logging.LogRecord("mergeprobe.test", logging.ERROR, __file__, 1, message, (), exc_info)
    JobContextFilter().filter(record)
    return record


def test_formatters_carry_the_job_context_and_tracebacks():
    with job_logging("0123456789abcdef01234567", "merge"):
        try:
            raise ValueError("boom")
        except ValueError:
            record = _record("failed", sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["job_id"] == "0123456789abcdef01234567" and entry["kind"] == "merge"
    assert entry["level"] == "ERROR" and entry["message"] == "failed" and "ValueError: boom" in entry["exc"]
    text = TextFormatter().format(record)
    assert text.splitlines()[0].endswith("failed [job 0123456789abcdef01234567]")

    outside = _record("idle")
    assert "job_id" not in json.loads(JsonFormatter().format(outside))
    assert "[job" not in TextFormatter().format(outside)
