"""Contracts of the package as a whole: no torch in the API, a fresh OpenAPI document, the data
files in the built wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


def test_create_app_imports_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from app.main import create_app\n"
        "from mergeprobe.service.settings import Settings\n"
        f"create_app(Settings(redis_url='redis://127.0.0.1:1/0', data_dir={str(tmp_path)!r}))\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'safetensors.torch') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_committed_openapi_is_fresh():
    from mergeprobe.cli import openapi_document

    committed = json.loads((REPO / "openapi" / "openapi.json").read_text())
    assert committed == json.loads(json.dumps(openapi_document())), (
        "openapi/openapi.json is stale: run `mergeprobe openapi`"
    )


def test_openapi_documents_every_operation():
    from mergeprobe.cli import openapi_document

    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), f"{method.upper()} {path} has no summary"
            assert op.get("responses"), f"{method.upper()} {path} has no responses"
    for name in (
        "Job",
        "ProblemModel",
        "ModelInfoModel",
        "InspectRequest",
        "InspectResult",
        "Artifact",
        "Progress",
    ):
        assert name in schemas
    assert schemas["Job"]["discriminator"]["propertyName"] == "kind"  # one schema per kind: InspectJob, ...
    for name in ("InspectJob", "MergeJob", "ModelInfoModel", "Artifact", "Progress", "InspectRequest"):
        props = schemas[name]["properties"]
        documented = [
            p
            for p, s in props.items()
            if s.get("description") or s.get("examples") or "$ref" in s or "allOf" in s
        ]
        assert len(documented) >= len(props) // 2, f"{name}: most fields lack descriptions/examples"
    assert "/v1/jobs/inspect" in doc["paths"] and "/v1/jobs/{id}/events" in doc["paths"]


def test_the_wheel_ships_the_data_files(tmp_path):
    """A wheel built from the sources (as `pip install .` and the Docker images build it) holds the
    configs and the vendored /docs and /redoc assets: an installed API serves them too."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(
            "setuptools < 70.1 builds no wheel without the `wheel` package (torch brings a newer one)"
        )
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("app", "mergeprobe", "worker"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("mergeprobe-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("app/static", "mergeprobe/configs"):
        files = {p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob("*") if p.is_file()}
        files = {f for f in files if "__pycache__" not in f}
        assert files and files <= shipped, sorted(files - shipped)[:10]
