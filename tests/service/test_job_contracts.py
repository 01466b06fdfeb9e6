"""Jobs run what was accepted, and every number a request holds is finite.

With a real Redis and real worker processes: a model whose bytes change between submission and
run fails the job with a problem naming it, for every kind that reads models.
"""

from __future__ import annotations

import json

import pytest

from mergeprobe.service.kinds import KINDS
from tests.conftest import REPO, install_model, wait_for_job
from worker.checkpoints.tiny_models import write_tiny_checkpoint

PROBE = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64}
SUBMISSIONS = {
    "inspect": {"model": "tiny-sd1-b"},
    "merge": {"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "output": {"name": "m.safetensors"}},
    "dump": {"model": "tiny-sd1-b", **PROBE},
    "sweep": {"model_a": "tiny-sd1-b", "variants": {"blocks": "IN00"}, "seeds": [1], **PROBE},
}


def test_a_model_replaced_after_submission_fails_the_job(service, client, tiny_models, tmp_path):
    """Every kind's job queued, the model replaced, then one worker runs them all."""
    install_model(service, tiny_models["sd1"])
    install_model(service, tiny_models["sd1-b"])
    jobs = {}
    for kind in sorted(SUBMISSIONS):
        response = client.post(f"/v1/jobs/{kind}", json=SUBMISSIONS[kind])
        assert response.status_code == 202, (kind, response.text)
        job = response.json()
        pinned = job["inputs"]["model"] if "model" in job["inputs"] else job["inputs"]["models"]["b"]
        assert pinned["name"] == "tiny-sd1-b.safetensors" and len(pinned["sha256"]) == 64, kind
        jobs[kind] = job["id"]
    # No worker yet. The API refuses to delete a model a queued job uses (each kind's job counts)...
    refused = client.delete("/v1/models/tiny-sd1-b")
    assert refused.status_code == 409
    assert f"used by {len(jobs)} queued" in refused.json()["detail"]
    assert all(job_id in refused.json()["detail"] for job_id in jobs.values()), refused.json()
    # ...so replace its bytes behind the library's back, as someone with the directory may.
    other = write_tiny_checkpoint("sd1", tmp_path / "other.safetensors", seed=9, dtype="fp16")
    (service.models_dir / "tiny-sd1-b.safetensors").unlink()
    install_model(service, other, "tiny-sd1-b.safetensors")
    service.start_worker()
    for kind, job_id in jobs.items():
        job = wait_for_job(client, job_id, timeout=120)
        assert job["status"] == "failed", (kind, job)
        error = job["error"]
        assert error["type"].endswith("/model-changed") and error["status"] == 409, (kind, error)
        assert "tiny-sd1-b changed since the job was accepted" in error["detail"], (kind, error)
    assert client.get("/v1/models").json()  # the library is intact
    assert not (service.models_dir / "m.safetensors").exists()


def test_a_model_renamed_after_submission_is_found_by_its_bytes(service, client, tiny_models):
    install_model(service, tiny_models["sd1"])
    job = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
    (service.models_dir / "tiny-sd1-a.safetensors").rename(service.models_dir / "renamed.safetensors")
    client.get("/v1/models/renamed")  # the library hashes it, as any listing does
    service.start_worker()
    job = wait_for_job(client, job["id"], timeout=60)
    assert job["status"] == "succeeded", job
    assert job["result"]["model"] == "renamed.safetensors"


def test_every_kind_names_its_parts_once():
    from worker.tasks import engine_of

    for kind in KINDS.values():
        assert callable(engine_of(kind)), kind.name
        assert kind.timeout > 0 and kind.request_model and kind.inputs_model and kind.result_model


def test_an_engine_result_the_result_model_lacks_fails_the_job():
    from worker.tasks import checked_result

    with pytest.raises(TypeError, match="undocumented"):
        checked_result(
            KINDS["inspect"],
            {"model": "x", "arch": "sd1", "total_params": 1, "blocks": [], "undocumented": 1},
        )
    checked = checked_result(KINDS["inspect"], {"model": "x", "arch": "sd1", "total_params": 1, "blocks": []})
    assert checked["total_params"] == 1


NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999"]
# Each route with a numeric field, and the body with that field set to the placeholder @.
NUMERIC_FIELDS = [
    ("/v1/jobs/merge", '{"model_a": "a", "model_b": "b", "alpha": @}', "alpha"),
    ("/v1/jobs/merge", '{"model_a": "a", "model_b": "b", "alpha": [0.5, @]}', "alpha.1"),
    ("/v1/jobs/merge", '{"model_a": "a", "model_b": "b", "beta": @}', "beta"),
    ("/v1/jobs/merge", '{"model_a": "a", "model_b": "b", "base_alpha": @}', "base_alpha"),
    ("/v1/jobs/merge", '{"model_a": "a", "model_b": "b", "base_beta": @}', "base_beta"),
    ("/v1/jobs/merge", '{"model_a": "a", "model_b": "b", "seed": @}', "seed"),
    ("/v1/jobs/elemental", '{"model_a": "a", "model_b": "b", "elemental": "IN00::0", "alpha": @}', "alpha"),
    ("/v1/plans/merge", '{"model_a": "a", "model_b": "b", "base_alpha": @}', "base_alpha"),
    (
        "/v1/jobs/sweep",
        '{"model_a": "a", "prompt": "p", "variants": {"blocks": "IN00", "alpha": @}}',
        "variants.alpha",
    ),
    (
        "/v1/jobs/sweep",
        '{"model_a": "a", "prompt": "p", "variants": {"blocks": "IN00", "beta": @}}',
        "variants.beta",
    ),
    (
        "/v1/jobs/sweep",
        '{"model_a": "a", "prompt": "p", "variants": {"x": {"kind": "alpha", "values": [@]}, '
        '"y": {"kind": "seed", "values": [1]}}}',
        "variants.x.values.0",
    ),
    (
        "/v1/jobs/sweep",
        '{"model_a": "a", "prompt": "p", "cfg_scale": @, "variants": {"blocks": "IN00"}}',
        "cfg_scale",
    ),
    (
        "/v1/jobs/sweep",
        '{"model_a": "a", "prompt": "p", "diff_threshold": @, "variants": {}}',
        "diff_threshold",
    ),
    (
        "/v1/jobs/sweep",
        '{"model_a": "a", "prompt": "p", "seeds": [1, @], "variants": {"blocks": "IN00"}}',
        "seeds.1",
    ),
    (
        "/v1/jobs/sweep",
        '{"model_a": "a", "prompt": "p", "steps": @, "variants": {"blocks": "IN00"}}',
        "steps",
    ),
    ("/v1/jobs/dump", '{"model": "a", "prompt": "p", "cfg_scale": @}', "cfg_scale"),
    ("/v1/jobs/dump", '{"model": "a", "prompt": "p", "steps": @}', "steps"),
    ("/v1/jobs/dump", '{"model": "a", "prompt": "p", "seed": @}', "seed"),
    ("/v1/jobs/dump", '{"model": "a", "prompt": "p", "width": @}', "width"),
    (
        "/v1/jobs/dump",
        '{"model": "a", "prompt": "p", "features": {"colorize": {"min": @}}}',
        "features.colorize.min",
    ),
]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(("route", "body", "field"), NUMERIC_FIELDS)
def test_non_finite_numbers_are_400s_naming_the_field(client, route, body, field, value):
    response = client.post(
        route, content=body.replace("@", value), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    problem = response.json()
    assert problem["type"].endswith("/non-finite-number"), problem
    assert problem["field"] == field, problem
    assert json.loads(body.replace("@", "1")) is not None  # the same body with a number is valid JSON


def test_a_huge_finite_ratio_is_a_400_at_submission(client, service, tiny_models):
    install_model(service, tiny_models["sd1"])
    install_model(service, tiny_models["sd1-b"])
    merge = client.post(
        "/v1/plans/merge", json={"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "alpha": 1e308}
    )
    assert merge.status_code == 400 and merge.json()["field"] == "alpha"
    sweep = client.post(
        "/v1/jobs/sweep",
        json={"model_a": "tiny-sd1-a", "prompt": "p", "variants": {"blocks": "IN00", "alpha": 1e308}},
    )
    assert sweep.status_code == 400 and sweep.json()["field"] == "variants.alpha"


def test_only_the_http_layer_speaks_http():
    """Below the API, code raises domain errors (mergeprobe/service/errors.py); statuses are decided in one
    place (mergeprobe.service.problems.problem_of), and no engine or domain module reads the environment."""
    import re

    root = REPO
    offenders = []
    for folder in ("worker", "mergeprobe"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            if path.name not in ("problems.py", "jobs.py") and re.search(r"\bProblem\(", text):
                offenders.append(f"{path.relative_to(root)}: builds a Problem")
            if path.name not in ("settings.py", "cli.py", "logging.py", "runtime.py") and re.search(
                r"os\.environ|getenv|\bSettings\(\)", text
            ):
                offenders.append(f"{path.relative_to(root)}: reads the environment")
    assert offenders == []


def test_a_job_queued_by_an_older_version_fails_clearly(service, client, tiny_models):
    """Inputs as an earlier mergeprobe stored them (a bare file name, no sha256) are not run on guesses."""
    import redis

    from mergeprobe.service.jobs import JobStore

    install_model(service, tiny_models["sd1"])
    settings = service.settings()
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings)
    old_inputs = {"model": "tiny-sd1-a.safetensors", "arch": "sd1"}
    job, _ = store.create("inspect", {"model": "tiny-sd1-a"}, old_inputs, timeout=60)
    service.start_worker()
    job = wait_for_job(client, job["id"], timeout=60)
    assert job["status"] == "failed" and job["error"]["type"].endswith("/job-outdated"), job
    assert "submit it again" in job["error"]["detail"]
