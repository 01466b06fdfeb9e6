"""A client generated from the service's OpenAPI document by openapi-python-client works end to
end: list the library, submit a merge, wait for it, download the merged model; inspect it and
download the job's artifact alone and zipped. All through the generated, typed operations, against
a real HTTP server (uvicorn) and a real worker.

The generator must print no warning: each one means an operation or schema it skipped or typed
loosely (an unsupported media type, a schema it cannot read).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import install_model, serving

PACKAGE = "mergeprobe_generated_client"


def generate_client(document: Path, out: Path) -> str:
    """Runs the generator's CLI offline; returns what it printed."""
    config = out.parent / "generator.yaml"
    # No post hooks: by default it runs `ruff` from PATH on the result, and warns when it is missing.
    config.write_text("post_hooks: []\n")
    run = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(document)]
        + ["--output-path", str(out), "--meta", "none", "--config", str(config), "--fail-on-warning"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=out.parent,
    )
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed
    return printed


@contextmanager
def imported(root: Path) -> Iterator[object]:
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def test_a_generated_client_lists_submits_waits_and_downloads(service, tiny_models, tmp_path):
    pytest.importorskip("openapi_python_client")  # the [test] extra
    from app.main import create_app

    install_model(service, tiny_models["sd1"])
    install_model(service, tiny_models["sd1-b"])
    service.start_worker()  # it imports torch while the client is generated

    with serving(create_app(service.settings())) as base:
        document = tmp_path / "openapi.json"
        document.write_bytes(httpx.get(f"{base}/openapi.json").raise_for_status().content)
        printed = generate_client(document, tmp_path / PACKAGE)
        # It prints "Generating <path>" and nothing else: no warning, no skipped piece.
        said = [line for line in printed.splitlines() if line.strip() and not line.startswith("Generating ")]
        assert not said, printed

        with imported(tmp_path) as client_package:

            def operation(path: str):
                return importlib.import_module(f"{PACKAGE}.api.{path}")

            types = importlib.import_module(f"{PACKAGE}.models")
            client = client_package.Client(base_url=base, raise_on_unexpected_status=True, timeout=30.0)

            # list
            listing = operation("models.list_models").sync(client=client)
            assert isinstance(listing, types.ModelList)
            by_id = {m.id: m for m in listing.models}
            assert set(by_id) == {"tiny-sd1-a", "tiny-sd1-b"}
            assert by_id["tiny-sd1-a"].variant.arch == types.VariantModelArch.SD1
            missing = operation("models.get_model").sync(id="no-such-model", client=client)
            assert isinstance(missing, types.ProblemModel) and missing.status == 404

            # submit
            request = types.MergeRequest(
                model_a="tiny-sd1-a",
                model_b="tiny-sd1-b",
                alpha=0.3,
                output=types.MergeOutput(name="generated-client.safetensors"),
            )
            submitted = operation("jobs.submit_merge_job").sync_detailed(client=client, body=request)
            assert submitted.status_code == 202, submitted.content
            job = submitted.parsed
            assert isinstance(job, types.MergeJob) and job.kind == "merge"
            assert submitted.headers["location"] == f"/v1/jobs/{job.id}"

            # wait
            def wait(job_id: str):
                final = (types.JobStatus.SUCCEEDED, types.JobStatus.FAILED, types.JobStatus.CANCELED)
                deadline = time.monotonic() + 120
                while (job := operation("jobs.get_job").sync(id=job_id, client=client)).status not in final:
                    assert time.monotonic() < deadline, f"job still {job.status}"
                    time.sleep(0.1)
                return job

            job = wait(job.id)
            assert isinstance(job, types.MergeJob), type(job)  # the union, told apart by `kind`
            assert job.status == types.JobStatus.SUCCEEDED, job.to_dict()
            assert isinstance(job.result, types.MergeResult)
            merged = job.result.model
            assert merged.name == "generated-client.safetensors" and job.result.mode == "weighted_sum"
            listed = operation("jobs.list_jobs").sync(client=client, kind="merge")
            assert [type(j) for j in listed.jobs] == [types.MergeJob] and listed.jobs[0].id == job.id

            # download
            download = operation("models.download_model_file").sync_detailed(id=merged.id, client=client)
            assert download.status_code == 200
            assert isinstance(download.parsed, client_package.types.File)
            data = download.parsed.payload.read()
            assert hashlib.sha256(data).hexdigest() == merged.sha256 == download.headers["etag"].strip('"')
            assert data == (service.models_dir / merged.name).read_bytes()
            head = operation("models.head_model_file").sync_detailed(id=merged.id, client=client)
            assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)

            # A job with artifacts: inspect the merged model, then download its table, alone and zipped.
            body = types.InspectRequest(model=merged.id)
            inspected = wait(operation("jobs.submit_inspect_job").sync(client=client, body=body).id)
            assert isinstance(inspected, types.InspectJob) and isinstance(
                inspected.result, types.InspectResult
            )
            assert inspected.result.model == merged.name and inspected.result.blocks[0].block == "BASE"
            (table,) = inspected.artifacts
            csv = operation("jobs.download_artifact").sync(id=inspected.id, name=table.name, client=client)
            table_bytes = csv.payload.read()
            assert hashlib.sha256(table_bytes).hexdigest() == table.sha256 and table_bytes.startswith(
                b"block,"
            )
            archive = operation("jobs.download_artifacts_zip").sync(id=inspected.id, client=client)
            with zipfile.ZipFile(io.BytesIO(archive.payload.read())) as unzipped:
                assert unzipped.namelist() == [table.name] and unzipped.read(table.name) == table_bytes
