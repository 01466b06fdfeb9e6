"""merge and elemental jobs through the API, with a real worker; dry runs; presets."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import install_model, wait_for, wait_for_job

PROBLEM = "application/problem+json"
CROSS_ATTN_K = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
IN04_CONV = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"


@pytest.fixture
def library(service, tiny_models):
    for key in ("sd1", "sd1-b", "sdxl"):
        install_model(service, tiny_models[key])
    return service.models_dir


def test_merge_job_writes_a_loadable_model_that_chains(service, client, library):
    service.start_worker()
    body = {
        "model_a": "tiny-sd1-a",
        "model_b": "tiny-sd1-b",
        "alpha": "IN00-IN11:0.25, M00:0.5, OUT00-OUT11:0.75",
        "base_alpha": 0.1,
        "output": {"name": "blend.safetensors", "dtype": "fp32", "metadata": {"author": "tests"}},
    }
    job = client.post("/v1/jobs/merge", json=body).json()
    job = wait_for_job(client, job["id"], timeout=120)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["model"]["name"] == "blend.safetensors" and result["arch"] == "sd1"
    assert result["actions"] == {"keep_a": 1, "merge": result["keys"] - 1}

    out = load_file(library / "blend.safetensors")
    a = load_file(library / "tiny-sd1-a.safetensors")
    b = load_file(library / "tiny-sd1-b.safetensors")
    for key, alpha in (
        (IN04_CONV, 0.25),
        (CROSS_ATTN_K, 0.75),
        ("first_stage_model.decoder.conv_in.weight", 0.1),
    ):
        expected = a[key].float() * (1 - alpha) + b[key].float() * alpha
        torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6)
    with safe_open(library / "blend.safetensors", "pt") as fh:
        meta = fh.metadata()
    assert meta["author"] == "tests" and meta["format"] == "pt"
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["request"]["alpha"] == body["alpha"]
    info_a = client.get("/v1/models/tiny-sd1-a").json()
    assert recipe["models"]["a"] == {"name": "tiny-sd1-a.safetensors", "sha256": info_a["sha256"]}
    # The result is in the library, with its arch detected: merges chain.
    assert client.get("/v1/models/blend").json()["arch"] == "sd1"
    chained = client.post(
        "/v1/jobs/merge",
        json={
            "model_a": "blend",
            "model_b": "tiny-sd1-a",
            "alpha": 0.5,
            "output": {"name": "second.safetensors"},
        },
    ).json()
    chained = wait_for_job(client, chained["id"], timeout=120)
    assert chained["status"] == "succeeded", chained
    with safe_open(library / "second.safetensors", "pt") as fh:
        lineage = json.loads(fh.metadata()["sd_merge_models"])
    blend_sha = client.get("/v1/models/blend").json()["sha256"]
    assert lineage[blend_sha]["name"] == "blend.safetensors"
    assert info_a["sha256"] in lineage[blend_sha]["sd_merge_models"], "the parent's own lineage is nested"

    from diffusers import StableDiffusionPipeline

    from worker.checkpoints.tiny_models import tiny_config_dir

    pipe = StableDiffusionPipeline.from_single_file(
        str(library / "second.safetensors"), config=str(tiny_config_dir("sd1")), local_files_only=True
    )
    assert pipe.unet.config.cross_attention_dim == 32


def test_elemental_job_writes_plan_csv(service, client, library):
    service.start_worker()
    body = {
        "model_a": "tiny-sd1-a",
        "model_b": "tiny-sd1-b",
        "alpha": 0.5,
        "elemental": "OUT05:attn2:0.2\nOUT05:attn2.to_k:0,IN99:x:1",
    }
    bad = client.post("/v1/jobs/elemental", json=body)
    assert bad.status_code == 400 and bad.headers["content-type"] == PROBLEM
    problem = bad.json()
    assert problem["field"] == "elemental" and body["elemental"][problem["position"] :].startswith("IN99")
    body["elemental"] = "OUT05:attn2:0.2\nOUT05:attn2.to_k:0, OUT05:nonexistent_element:1"
    job = wait_for_job(client, client.post("/v1/jobs/elemental", json=body).json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert any("nonexistent_element" in w for w in job["warnings"])
    plan_csv = client.get(f"/v1/jobs/{job['id']}/artifacts/plan.csv").text
    rows = {r["key"]: r for r in csv.DictReader(io.StringIO(plan_csv))}
    assert rows[CROSS_ATTN_K]["action"] == "copy_a" and float(rows[CROSS_ATTN_K]["alpha"] or 0) == 0
    v_key = CROSS_ATTN_K.replace("to_k", "to_v")
    assert rows[v_key]["block"] == "OUT05" and float(rows[v_key]["alpha"]) == 0.2
    assert float(rows[IN04_CONV]["alpha"]) == 0.5


def test_dry_run_plan_and_validation(client, library):
    plan = client.post(
        "/v1/plans/merge",
        json={
            "model_a": "tiny-sd1-a",
            "model_b": "tiny-sd1-b",
            "alpha": "GRAD_V",
            "elemental": "BASE:first_stage_model:0",
        },
    )
    assert plan.status_code == 200, plan.text
    keys = {k["key"]: k for k in plan.json()["keys"]}
    assert keys["first_stage_model.decoder.conv_in.weight"]["action"] == "copy_a"
    assert keys["cond_stage_model.transformer.text_model.embeddings.position_ids"]["action"] == "keep_a"
    grad_v = client.get("/v1/presets").json()["presets"]["sd1"]["GRAD_V"]
    assert keys[IN04_CONV]["alpha"] == grad_v[4] and keys[CROSS_ATTN_K]["alpha"] == grad_v[13 + 5]

    mismatch = client.post("/v1/plans/merge", json={"model_a": "tiny-sd1-a", "model_b": "tiny-sdxl-a"})
    assert mismatch.status_code == 400 and mismatch.json()["field"] == "model_b"
    spec = "IN00-IN05:0.2, M00:1, OUT00-OUT99:0.7"
    bad_spec = client.post(
        "/v1/plans/merge", json={"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "alpha": spec}
    )
    body = bad_spec.json()
    assert (
        bad_spec.status_code == 400
        and body["field"] == "alpha"
        and spec[body["position"] :].startswith("OUT99")
    )
    short_list = client.post(
        "/v1/plans/merge", json={"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "alpha": [0.5] * 7}
    )
    assert short_list.status_code == 400 and "25" in short_list.json()["detail"]
    needs_c = client.post(
        "/v1/plans/merge", json={"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "mode": "add_difference"}
    )
    assert needs_c.status_code == 400 and needs_c.json()["field"] == "model_c"
    bad_mode = client.post(
        "/v1/plans/merge", json={"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "mode": "average"}
    )
    assert bad_mode.status_code == 422 and bad_mode.json()["field"] == "mode"
    taken = client.post(
        "/v1/jobs/merge",
        json={"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "output": {"name": "tiny-sd1-a.safetensors"}},
    )
    assert taken.status_code == 409 and taken.json()["field"] == "name"


def test_cancel_running_merge_removes_partial_file(service, client, library):
    service.start_worker(MERGEPROBE_DEBUG_TENSOR_DELAY="0.01")
    job = client.post(
        "/v1/jobs/merge",
        json={"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "output": {"name": "never.safetensors"}},
    ).json()
    wait_for(
        lambda: client.get(f"/v1/jobs/{job['id']}").json()["progress"]["stage"] == "merging tensors",
        timeout=60,
    )
    client.delete(f"/v1/jobs/{job['id']}")
    job = wait_for_job(client, job["id"], timeout=10)
    assert job["status"] == "canceled"
    assert sorted(p.name for p in library.iterdir()) == [
        "tiny-sd1-a.safetensors",
        "tiny-sd1-b.safetensors",
        "tiny-sdxl-a.safetensors",
    ]


def test_element_table_lists_real_element_names(client):
    table = client.get("/v1/archs/sd1/elements").json()
    assert list(table["blocks"]) == [f"IN{i:02d}" for i in range(12)] + ["M00"] + [
        f"OUT{i:02d}" for i in range(12)
    ]
    assert "1.transformer_blocks.0.attn2.to_k.weight" in table["blocks"]["OUT05"]
    assert "time_embed.0.weight" in table["blocks"]["IN00"] and "out.2.weight" in table["blocks"]["OUT11"]
    sdxl = client.get("/v1/archs/sdxl/elements").json()["blocks"]
    assert "1.transformer_blocks.9.attn2.to_k.weight" in sdxl["IN07"], (
        "SDXL's deep levels hold 10 transformers"
    )
    assert client.get("/v1/archs/sd9/elements").status_code == 404
