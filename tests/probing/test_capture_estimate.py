"""The dump's size estimate, against what the real engine writes, and the caps it enforces at
submission."""

from __future__ import annotations

import pytest

from tests.app.test_api_inputs import assert_problem
from tests.conftest import install_model


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_estimate_matches_the_tensors_a_dump_saves(service, tiny_models, monkeypatch, arch):
    from mergeprobe.checkpoints.archs import get_arch
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.probing.capture_estimate import block_geometry, estimate_dump
    from mergeprobe.probing.dump_request import DumpRequest
    from mergeprobe.probing.pipeline_configs import fitting_config_dir
    from mergeprobe.service.artifacts import ArtifactStore
    from mergeprobe.service.kinds import KINDS
    from worker.context import JobContext
    from worker.engines.dump import run_dump

    install_model(service, tiny_models[arch])
    settings = service.settings()
    library, artifacts = ModelLibrary(settings), ArtifactStore(settings)
    request = DumpRequest(
        model=f"tiny-{arch}-a",
        prompt="a cat",
        steps=3,
        width=72,  # not a power of two: the stride-2 convolutions round up
        height=64,
        batch_size=2,
        features={"steps": "1,3", "save_tensors": True},
        attention={"steps": "2", "save_tensors": True},
    )
    ctx = JobContext.local(KINDS["dump"], request, settings=settings, library=library, artifacts=artifacts)
    path = library.resolve(request.model)
    header, arch_ = library.header(path), get_arch(arch)
    estimate = estimate_dump(
        request, ctx.inputs, block_geometry(header, arch_, fitting_config_dir(arch, header, settings))
    )
    result = run_dump(ctx)
    job = artifacts.job_dir(ctx.job_id)
    saved = (job / "tensors.safetensors").stat().st_size
    assert estimate.held_bytes <= saved <= estimate.held_bytes * 1.02 + 200_000  # + the JSON header
    written = sum(p.stat().st_size for p in job.rglob("*") if p.is_file())
    assert written <= estimate.written_bytes  # a bound: PNGs compress
    assert result["captures"] > 0 and estimate.memory_bytes >= 2 * estimate.held_bytes


def test_dumps_over_the_caps_are_refused_at_submission(service, tiny_models):
    from fastapi.testclient import TestClient

    from app.main import create_app

    install_model(service, tiny_models["sd1"])
    with TestClient(create_app(service.settings(max_capture_bytes=20_000_000))) as client:
        body = {
            "model": "tiny-sd1-a",
            "prompt": "a cat",
            "steps": 50,
            "width": 512,
            "height": 512,
            "attention": {"save_tensors": True},
            "features": {"layers": "M00", "steps": "1"},
        }
        problem = assert_problem(client.post("/v1/jobs/dump", json=body), 400, "attention")
        assert "MERGEPROBE_MAX_CAPTURE_BYTES" in problem["detail"] and "GiB" in problem["detail"]
        small = {**body, "steps": 2, "width": 64, "height": 64}
        accepted = client.post("/v1/jobs/dump", json=small)
        assert accepted.status_code == 202, accepted.text


def test_sweeps_over_the_caps_are_refused_at_submission(service, tiny_models):
    from fastapi.testclient import TestClient

    from app.main import create_app

    install_model(service, tiny_models["sd1"])
    sweep = {
        "model_a": "tiny-sd1-a",
        "variants": {"blocks": "IN00-OUT11", "alpha": 0, "beta": 0.5},
        "prompt": "a cat",
        "seeds": [1, 2, 3, 4],
        "steps": 2,
        "width": 1024,
        "height": 1024,
    }
    with TestClient(create_app(service.settings(max_capture_bytes=100_000_000))) as client:
        problem = assert_problem(client.post("/v1/jobs/sweep", json=sweep), 400, "variants")
        assert "104 images" in problem["detail"] and "MERGEPROBE_MAX_CAPTURE_BYTES" in problem["detail"]
        accepted = client.post("/v1/jobs/sweep", json={**sweep, "width": 64, "height": 64})
        assert accepted.status_code == 202, accepted.text
