"""The API against its own OpenAPI document, with schemathesis.

Every operation of the document gets generated requests, valid and invalid (a few hundred in
all, derandomized so CI runs the same cases), sent in-process to the ASGI app backed by a real
Redis, tiny models in its library and a real worker. Every response must: not be a 5xx, carry a
documented status code and content type, match the documented body schema and headers. About half
of the cases swap generated names for real ones (models, jobs, architectures, artifacts) so that
lookups also succeed and success bodies get checked; accepted jobs are canceled at once so that
generated dumps and sweeps do not keep the worker busy. A second pass runs with auth on and no token.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks as st_checks
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode

from tests.conftest import Service, install_model, wait_for_job

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
]
EXAMPLES = 12  # per operation and generation mode (valid, invalid)
MODEL_FIELDS = ("model", "model_a", "model_b", "model_c")
_counts: dict[str, int] = {}


def _operations() -> list[tuple[str, str]]:
    from mergeprobe.cli import openapi_document

    doc = openapi_document()
    return [(m.upper(), p) for p, ops in sorted(doc["paths"].items()) for m in sorted(ops)]


@pytest.fixture(scope="module")
def live(redis_url, tmp_path_factory, tiny_models):
    from fastapi.testclient import TestClient

    from app.main import create_app

    # Generated import URLs must make no one fetch anything: the only source allowed cannot resolve.
    no_sources = {"import_allowed_hosts": "import.invalid"}
    svc = Service(
        redis_url,
        tmp_path_factory.mktemp("schemathesis") / "data",
        MERGEPROBE_IMPORT_ALLOWED_HOSTS="import.invalid",
    )
    svc.models_dir.mkdir(parents=True)
    for key in ("sd1", "sd1-b", "sdxl"):
        install_model(svc, tiny_models[key])
    for i in range(20):  # fodder for DELETE /v1/models/{id}
        install_model(svc, tiny_models["sd2"], f"victim-{i}.safetensors")
    app = create_app(svc.settings(**no_sources))
    locked = create_app(svc.settings(api_keys="k1", **no_sources))
    with TestClient(app) as client:
        # Jobs in every final status, so that job lookups and listings return real records.
        ok = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
        doomed = client.post("/v1/jobs/inspect", json={"model": "victim-19"}).json()
        canceled = client.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}).json()
        client.delete(f"/v1/jobs/{canceled['id']}")
        (svc.models_dir / "victim-19.safetensors").unlink()
        svc.start_worker()
        wait_for_job(client, ok["id"], timeout=120)
        wait_for_job(client, doomed["id"], timeout=60)
        yield {
            "schemas": {
                "open": schemathesis.openapi.from_asgi("/openapi.json", app),
                "locked": schemathesis.openapi.from_asgi(
                    "/openapi.json", locked, headers={"Authorization": "Bearer k1"}
                ),
            },
            "client": client,
            "jobs": [ok["id"], doomed["id"], canceled["id"]],
            "victims": itertools.count(),
            "uploads": itertools.count(),
            "upload_body": tiny_models["sd2"].read_bytes(),
        }
    for worker in svc.workers:
        worker.kill()  # it may be loading a pipeline for a canceled dump or sweep: nothing to wait for
    svc.stop_workers()
    svc.purge()
    total = sum(_counts.values())
    print(f"\nschemathesis: {total} cases over {len(_counts)} operation runs")


def _make_real(case, live, data) -> None:
    """Swap generated names for ones that exist, so that lookups succeed too."""
    params = case.path_parameters or {}
    path = case.operation.path
    if "arch" in params:
        params["arch"] = data.draw(st.sampled_from(["sd1", "sd2", "sdxl"]))
    if "id" in params and path.startswith("/v1/jobs"):
        params["id"] = data.draw(st.sampled_from(live["jobs"]))
    elif "id" in params and case.method == "DELETE":
        params["id"] = f"victim-{next(live['victims'])}"
    elif "id" in params:
        params["id"] = data.draw(st.sampled_from(["tiny-sd1-a", "tiny-sdxl-a.safetensors", "victim-0"]))
    if "name" in params:
        params["name"] = "blocks.csv"
    if path == "/v1/models" and case.method == "POST":
        case.query = {**(case.query or {}), "name": f"upload-{next(live['uploads'])}.safetensors"}
        case.body = live["upload_body"]
    elif isinstance(case.body, dict):
        names = st.sampled_from(["tiny-sd1-a", "tiny-sd1-b"])
        for field in MODEL_FIELDS:
            if field in case.body:
                case.body[field] = data.draw(names)


@pytest.mark.parametrize("auth", ["open", "locked"])
@pytest.mark.parametrize("method,path", _operations())
def test_operation_conforms_to_the_openapi_document(live, method, path, auth):
    operation = live["schemas"][auth][path][method]
    client = live["client"]
    failures: list[str] = []
    label = f"{auth} {method} {path}"
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )

    @settings(
        max_examples=EXAMPLES * 2 if auth == "open" else 3,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, real=st.booleans(), data=st.data())
    def run(case, real, data):
        _counts[label] = _counts.get(label, 0) + 1
        if real:
            _make_real(case, live, data)
        response = case.call()
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, FailureGroup) as exc:
            failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}\n{exc}")
        if response.status_code == 202 and path.startswith("/v1/jobs/"):
            # Keep the worker free: generated dumps and sweeps could run for minutes.
            client.delete(f"/v1/jobs/{response.json()['id']}")

    run()
    assert not failures, f"{len(failures)} failing cases; first ones:\n\n" + "\n\n".join(failures[:3])
