"""Job artifacts on local disk: written to a temp file and renamed, so no reader sees a partial file."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from mergeprobe.problems import Problem
from mergeprobe.settings import Settings

_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]{0,199}$")
_JOB_ID = re.compile(r"^[0-9a-f]{24}$")


def artifact_url(job_id: str, name: str) -> str:
    return f"/v1/jobs/{job_id}/artifacts/{name}"


class _HashingWriter:
    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._fh.write(data)


class ArtifactStore:
    def __init__(self, settings: Settings) -> None:
        self.root = settings.artifacts_path

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise Problem(404, "unknown-job", "Unknown job", f"no job {job_id!r}")
        return self.root / job_id

    def path_of(self, job_id: str, name: str) -> Path:
        if ".." in name or not _ARTIFACT_NAME.match(name):
            raise Problem(
                404, "unknown-artifact", "Unknown artifact", f"no artifact {name!r} in job {job_id}"
            )
        return self.job_dir(job_id) / name

    @contextmanager
    def writer(self, job_id: str, name: str, media_type: str) -> Iterator[_HashingWriter]:
        """Yield a writer; on a clean exit the file appears under its name, complete.

        The record of the written artifact is left in `writer.record`.
        """
        final = self.path_of(job_id, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{secrets.token_hex(6)}.{name}.partial")
        try:
            with open(tmp, "wb") as fh:
                writer = _HashingWriter(fh)
                yield writer
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        writer.record = {
            "name": name,
            "url": artifact_url(job_id, name),
            "media_type": media_type,
            "size_bytes": writer.size,
            "sha256": writer.sha256.hexdigest(),
        }

    def write_bytes(self, job_id: str, name: str, data: bytes, media_type: str) -> dict[str, Any]:
        with self.writer(job_id, name, media_type) as w:
            w.write(data)
        return w.record

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
