"""Logging for `mergeprobe serve` and `mergeprobe worker`: JSON lines by default.

Each line is one JSON object: `ts` (UTC, ISO 8601), `level`, `logger`, `message`, plus
`job_id` and `kind` while a job runs (worker/tasks.py sets them with `job_logging()`; a
filter on the handler copies them onto every record, whichever logger emitted it), `exc`
with the traceback where there is one, and for uvicorn's access log `client`, `method`,
`path` and `status`. `MERGEPROBE_LOG_FORMAT=text` gives plain lines instead.

The job context is a contextvar: it follows the thread (and asyncio task) that set it,
so lines of other threads (the heartbeat) do not claim the job.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

_JOB: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("mergeprobe_job", default=None)
_CONTEXT_FIELDS = ("job_id", "kind")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def job_logging(job_id: str, kind: str | None = None) -> Iterator[None]:
    """Within the block, every log record of this thread carries `job_id` (and `kind`)."""
    token = _JOB.set({"job_id": job_id, **({"kind": kind} if kind else {})})
    try:
        yield
    finally:
        _JOB.reset(token)


class JobContextFilter(logging.Filter):
    """Copies the current job's id and kind onto each record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _JOB.get()
        if context:
            for name, value in context.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


def _utc_iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _version, status = record.args
            entry.update(client=client, method=method, path=path, status=status)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with ` [job <id>]` appended to the lines of a job."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id is None:
            return line
        head, newline, rest = line.partition("\n")
        return f"{head} [job {job_id}]{newline}{rest}"


def configure_logging(log_format: str = "json", level: str | int = "INFO") -> logging.Handler:
    """One handler on the root logger (stderr) with the job filter; replaces earlier handlers.
    Library loggers (rq, uvicorn with `log_config=None`) propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    return handler


def configure_from_settings(settings: Any) -> logging.Handler:
    return configure_logging(settings.log_format, settings.log_level)
