"""What the OpenAPI document promises code generators: operation ids a person would write, a job
typed per kind, binary downloads typed as binary."""

from __future__ import annotations

import re

import pytest

from app.schemas import JOB_MODELS, Job
from mergeprobe.service.kinds import KINDS

CAMEL_CASE = re.compile(r"^[a-z]+(?:[A-Z][a-z0-9]*)*$")
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


@pytest.fixture(scope="module")
def doc():
    from mergeprobe.cli import openapi_document

    return openapi_document()


def _operations(doc):
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method, path, operation


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def test_every_operation_id_is_camel_case_and_unique(doc):
    ids = [operation.get("operationId") for _, _, operation in _operations(doc)]
    assert all(ids), "an operation without an operationId"
    bad = [i for i in ids if not CAMEL_CASE.match(i)]
    assert not bad, f"not camelCase: {bad}"
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_operation_ids_name_what_the_operation_does(doc):
    ids = {(method.upper(), path): op["operationId"] for method, path, op in _operations(doc)}
    expected = {
        ("GET", "/v1/models"): "listModels",
        ("GET", "/v1/models/{id}"): "getModel",
        ("POST", "/v1/models"): "uploadModel",
        ("DELETE", "/v1/models/{id}"): "deleteModel",
        ("GET", "/v1/models/{id}/file"): "downloadModelFile",
        ("HEAD", "/v1/models/{id}/file"): "headModelFile",
        ("GET", "/v1/jobs"): "listJobs",
        ("GET", "/v1/jobs/{id}"): "getJob",
        ("DELETE", "/v1/jobs/{id}"): "cancelJob",
        ("GET", "/v1/jobs/{id}/events"): "streamJobEvents",
        ("GET", "/v1/jobs/{id}/artifacts/{name}"): "downloadArtifact",
        ("HEAD", "/v1/jobs/{id}/artifacts/{name}"): "headArtifact",
        ("GET", "/v1/jobs/{id}/artifacts.zip"): "downloadArtifactsZip",
        ("POST", "/v1/jobs/merge"): "submitMergeJob",
        ("POST", "/v1/jobs/lora_extract"): "submitLoraExtractJob",
        ("POST", "/v1/plans/merge"): "planMerge",
        ("POST", "/v1/plans/bake"): "planBake",
        ("GET", "/v1/presets"): "listPresets",
        ("GET", "/v1/archs"): "listArchs",
        ("POST", "/v1/archs/{arch}/tokenize"): "tokenizePrompt",
        ("GET", "/healthz"): "getHealth",
        ("GET", "/readyz"): "getReadiness",
        ("GET", "/metrics"): "getMetrics",
    }
    assert {key: ids.get(key) for key in expected} == expected
    # One submission per job kind, named after it.
    for name in KINDS:
        camel = "".join(part.capitalize() for part in name.split("_"))
        assert ids[("POST", f"/v1/jobs/{name}")] == f"submit{camel}Job"


def test_job_is_a_union_discriminated_by_kind(doc):
    schemas = doc["components"]["schemas"]
    job = schemas["Job"]
    models = {name: model.__name__ for name, model in JOB_MODELS.items()}
    assert job["discriminator"] == {
        "propertyName": "kind",
        "mapping": {name: _ref(model)["$ref"] for name, model in models.items()},
    }
    assert job["oneOf"] == [_ref(models[name]) for name in KINDS]
    assert schemas["JobList"]["properties"]["jobs"]["items"] == _ref("Job")
    for name, kind in KINDS.items():
        model = schemas[models[name]]
        assert model["properties"]["kind"]["const"] == name
        assert model["properties"]["result"]["anyOf"] == [_ref(kind.result_model.__name__), {"type": "null"}]
        assert model["properties"]["status"] == _ref("JobStatus")
        assert {"id", "kind", "status", "progress", "created_at", "request"} <= set(model["required"])
    assert models["merge"] == "MergeJob" and models["lora_extract"] == "LoraExtractJob"
    assert schemas["MergeResult"]["properties"]["model"]["$ref"] == _ref("MergedModel")["$ref"]


def test_job_answers_name_their_schema(doc):
    def body(operation, status):
        return operation["responses"][status]["content"]["application/json"]["schema"]

    for name in KINDS:
        submit = doc["paths"][f"/v1/jobs/{name}"]["post"]
        assert body(submit, "202") == body(submit, "200") == _ref(JOB_MODELS[name].__name__)
    assert body(doc["paths"]["/v1/jobs/{id}"]["get"], "200") == _ref("Job")
    assert body(doc["paths"]["/v1/jobs/{id}"]["delete"], "202") == _ref("Job")


def test_binary_downloads_are_typed_as_binary(doc):
    binary = {"type": "string", "format": "binary"}
    downloads = {
        "/v1/models/{id}/file": "application/octet-stream",
        "/v1/jobs/{id}/artifacts/{name}": "*/*",
        "/v1/jobs/{id}/artifacts.zip": "application/zip",
    }
    for path, media_type in downloads.items():
        content = doc["paths"][path]["get"]["responses"]["200"]["content"]
        # The body's own media type, and application/octet-stream: generators read bytes under it.
        assert set(content) == {media_type, "application/octet-stream"}, path
        assert all(c["schema"] == binary for c in content.values()), path
    for path in ("/v1/models/{id}/file", "/v1/jobs/{id}/artifacts/{name}"):
        partial = doc["paths"][path]["get"]["responses"]["206"]["content"]
        assert "multipart/byteranges" in partial and all(c["schema"] == binary for c in partial.values())


def _record(**changes) -> dict:
    record = {
        "id": "0190f2a1b2c3d4e5f6a7b8c9",
        "kind": "inspect",
        "status": "succeeded",
        "progress": {"completed": 3, "total": 3, "stage": "done"},
        "created_at": "2026-11-21T05:00:00.000Z",
        "started_at": "2026-11-21T05:00:01.000Z",
        "finished_at": "2026-11-21T05:00:02.000Z",
        "request": {"model": "tiny-sd1-a"},
        "inputs": {"model": {"name": "tiny-sd1-a.safetensors", "sha256": "0" * 64}, "arch": "sd1"},
        "artifacts": [],
        "result": {"model": "tiny-sd1-a.safetensors", "arch": "sd1", "total_params": 10, "blocks": []},
        "error": None,
        "warnings": [],
        "worker": "w1",
        "cancel_requested": None,
    }
    return {**record, **changes}


@pytest.mark.parametrize(
    "result",
    [
        None,
        {"model": "tiny-sd1-a.safetensors", "arch": "sd1", "total_params": 10, "blocks": []},
        # As stored, never reshaped: a field an earlier version did not write is not filled in, a
        # field it wrote is kept, a non-finite number stored as null stays null.
        {"model": "x", "arch": "sd1", "total_params": None, "legacy_field": 1},
    ],
)
def test_a_job_answers_its_stored_result_as_is(result):
    """Job typing documents each kind's result; the answer is the record the worker stored (and
    checked against the result model then), never reshaped, so a record of an earlier version
    never becomes a 500."""
    record = _record(result=result)
    assert Job.model_validate(record).model_dump(mode="json") == record
    assert type(Job.model_validate(record).root).__name__ == "InspectJob"


def test_a_job_record_gets_the_defaults_it_got_before():
    sparse = {k: v for k, v in _record().items() if k not in ("inputs", "artifacts", "warnings", "worker")}
    answered = Job.model_validate(sparse).model_dump(mode="json")
    assert answered == {**sparse, "inputs": {}, "artifacts": [], "warnings": [], "worker": None}
    assert list(answered) == list(_record())  # and in the same order


def test_a_job_of_an_unknown_kind_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Job.model_validate(_record(kind="nonsense"))


def test_a_stored_job_of_a_kind_this_version_does_not_know_is_answered_as_stored(service, client):
    """Found in review: during a rolling upgrade one record of a newer kind made GET /v1/jobs a 500."""
    import redis

    from mergeprobe.service.jobs import JobStore

    settings = service.settings()
    store = JobStore(redis.Redis.from_url(settings.redis_url), settings)
    known, _ = store.create("inspect", {"model": "x"}, {}, timeout=60)
    future, _ = store.create("future_kind", {"model": "y"}, {}, timeout=60)
    listing = client.get("/v1/jobs")
    assert listing.status_code == 200, listing.text
    assert {job["kind"] for job in listing.json()["jobs"]} == {"inspect", "future_kind"}
    answered = client.get(f"/v1/jobs/{future['id']}")
    assert answered.status_code == 200 and answered.json()["request"] == {"model": "y"}
    assert client.get(f"/v1/jobs/{known['id']}").json() == Job.model_validate(known).model_dump(mode="json")
    assert client.delete(f"/v1/jobs/{future['id']}").status_code == 202
