"""lora_extract jobs through the API with a real worker: a LoRA from (A merged with B) − A, baked
back into A, gives the merge's touched weights within the error the job reports."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.conftest import api_client, install_model, running_service, wait_for_job  # noqa: E402

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def extraction(redis_url, tmp_path_factory, tiny_models):
    """One service: A and B installed, M = A merged with B, and two extractions of M − A."""
    with running_service(redis_url, tmp_path_factory.mktemp("extract") / "data") as service:
        install_model(service, tiny_models["sd1"])
        install_model(service, tiny_models["sd1-b"])
        install_model(service, tiny_models["sdxl"])
        service.start_worker()
        with api_client(service) as client:
            merge = {
                "model_a": "tiny-sd1-a",
                "model_b": "tiny-sd1-b",
                "alpha": "IN00-IN05:0.6, M00:0.3, _:0.2",
                "base_alpha": 0.5,
                "output": {"name": "blend.safetensors", "dtype": "fp32"},
            }
            job = wait_for_job(client, client.post("/v1/jobs/merge", json=merge).json()["id"], timeout=120)
            assert job["status"] == "succeeded", job
            jobs = {}
            for name, body in {
                "low": {"rank": 3, "conv_rank": 2, "svd": "full"},
                "randomised": {"rank": 3, "text_encoders": False},
                # the request's metadata cannot replace the architecture we write (found in review)
                "full": {
                    "rank": 512,
                    "conv_rank": 512,
                    "output": {"metadata": {"ss_base_model_version": "sdxl_base_v1-0", "note": "mine"}},
                },
            }.items():
                request = {
                    "model_tuned": "blend",
                    "model_base": "tiny-sd1-a",
                    **body,
                    "output": {
                        **body.get("output", {}),
                        "name": f"extract-{name}.safetensors",
                        "dtype": "fp32",
                    },
                }
                response = client.post("/v1/jobs/lora_extract", json=request)
                assert response.status_code == 202, response.text
                jobs[name] = response.json()["id"]
            results = {}
            for name, job_id in jobs.items():
                job = wait_for_job(client, job_id, timeout=180)
                assert job["status"] == "succeeded", job
                results[name] = job
            yield service, client, results


def _module_delta(lora: dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
    rank = down.shape[0]
    scale = float(lora[f"{name}.alpha"]) / rank
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape) * scale


def test_an_extracted_lora_baked_back_gives_the_merge_within_the_reported_error(extraction, tiny_models):
    service, client, results = extraction
    result = results["low"]["result"]
    a = load_file(tiny_models["sd1"])
    merged = load_file(service.models_dir / "blend.safetensors")
    lora = load_file(service.models_dir / "extract-low.safetensors")

    # The file: kohya names, LoCon convs, alpha = rank, the library reads it as an sd1 LoRA.
    info = client.get(f"/v1/models/{result['model']['id']}").json()
    assert info["kind"] == "lora" and info["lora"]["arch"] == "sd1", info
    modules = {m["name"]: m for m in result["modules"]}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert (
        lora[f"{conv}.lora_down.weight"].shape[1:]
        == a["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"].shape[1:]
    )
    assert lora[f"{conv}.lora_up.weight"].shape[2:] == (1, 1)
    assert {m["rank"] for m in result["modules"]} <= {2, 3}
    assert result["ranks"] == {
        str(r): sum(1 for m in result["modules"] if m["rank"] == r)
        for r in (2, 3)
        if any(m["rank"] == r for m in result["modules"])
    }

    # Bake it back into A: each touched weight is A + ΔW_lora; its distance to the merge, relative to
    # the merge's own difference, is the module's reported error.
    bake = {
        "model": "tiny-sd1-a",
        "loras": [{"model": result["model"]["id"]}],
        "output": {"name": "back.safetensors", "dtype": "fp32"},
    }
    job = wait_for_job(client, client.post("/v1/jobs/bake", json=bake).json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["result"]["loras"][0]["matched"] == len(modules)
    back = load_file(service.models_dir / "back.safetensors")
    squared_residual = squared_total = 0.0
    for name, module in modules.items():
        key = module["key"]
        target = merged[key].float() - a[key].float()
        got = back[key].float() - a[key].float()
        if "in_proj" in key:  # OpenCLIP only; sd1's text encoder is CLIP
            continue
        residual = float((got - target).double().square().sum())
        total = float(target.double().square().sum())
        assert math.sqrt(residual / total) == pytest.approx(module["relative_error"], rel=1e-3, abs=1e-6), (
            name
        )
        torch.testing.assert_close(got, _module_delta(lora, name, a[key].shape), atol=1e-6, rtol=0)
        squared_residual += residual
        squared_total += total
    assert math.sqrt(squared_residual / squared_total) == pytest.approx(result["relative_error"], rel=1e-3)
    assert 0 < result["relative_error"] < 1 and result["max_relative_error"] >= result["relative_error"]

    # What the LoRA does not carry: conv_in, time embedding, norms … differ and are named.
    assert result["not_carried"]["count"] > 0
    assert "model.diffusion_model.input_blocks.0.0.weight" in result["not_carried"]["keys"] or result[
        "not_carried"
    ]["by_block"].get("IN00")
    assert any("not carries" in w or "no LoRA module carries" in w for w in results["low"]["warnings"])
    csv = client.get(f"/v1/jobs/{results['low']['id']}/artifacts/modules.csv").text.splitlines()
    assert csv[0] == "name,key,block,rank,relative_error" and len(csv) == len(modules) + 1


def test_full_rank_extraction_is_exact_and_the_metadata_says_what_it_is(extraction, tiny_models):
    service, _, results = extraction
    result = results["full"]["result"]
    assert result["max_relative_error"] < 1e-5
    with safe_open(service.models_dir / "extract-full.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["note"] == "mine"
    assert json.loads(metadata["ss_network_args"])["conv_dim"] == str(
        max(m["rank"] for m in result["modules"] if "resnets" in m["name"])
    )
    recipe = json.loads(metadata["mergeprobe_recipe"])
    assert recipe["kind"] == "lora_extract" and recipe["model_base"]["name"] == "tiny-sd1-a.safetensors"


def test_randomised_extraction_without_text_encoders(extraction):
    _, _, results = extraction
    result = results["randomised"]["result"]
    assert result["modules"] and not any(m["name"].startswith("lora_te") for m in result["modules"])
    assert not any("resnets" in m["name"] for m in result["modules"])  # no conv_rank: no convs
    exact = {m["name"]: m["relative_error"] for m in results["low"]["result"]["modules"]}
    for module in result["modules"]:
        if module["name"] in exact and "resnets" not in module["name"]:
            # rank 3 of a small layer: the randomised range finder is as good as the exact SVD
            assert module["relative_error"] <= exact[module["name"]] * 1.02 + 1e-6, module


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model_tuned": "tiny-sd1-a", "model_base": "tiny-sd1-a"}, "model_base"),
        ({"model_tuned": "blend", "model_base": "tiny-sdxl-a"}, "model_base"),
        ({"model_tuned": "blend", "model_base": "nope"}, "model_base"),
        ({"model_tuned": "blend", "model_base": "tiny-sd1-a", "rank": 0}, "rank"),
        ({"model_tuned": "blend", "model_base": "tiny-sd1-a", "energy": 1.5}, "energy"),
        (
            {"model_tuned": "blend", "model_base": "tiny-sd1-a", "output": {"name": "blend.safetensors"}},
            "output.name",
        ),
        ({"model_tuned": "extract-low", "model_base": "tiny-sd1-a"}, "model_tuned"),
    ],
)
def test_bad_extractions_are_400s_naming_the_field(extraction, body, field):
    _, client, _ = extraction
    response = client.post("/v1/jobs/lora_extract", json=body)
    assert response.status_code in (400, 404, 409, 422), response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem = response.json()
    assert problem.get("field") == field or any(e.get("field") == field for e in problem.get("errors", [])), (
        problem
    )


def test_alpha_is_stored_in_float32_and_identical_models_are_a_clear_failure(
    extraction, tiny_models, tmp_path
):
    service, client, results = extraction
    with safe_open(service.models_dir / "extract-low.safetensors", "pt") as f:
        alphas = [f.get_tensor(k) for k in f.keys() if k.endswith(".alpha")]
    assert alphas and all(a.dtype == torch.float32 and a.dim() == 0 for a in alphas)
    # The same values in another file (an fp32 copy): accepted, then a failed job saying why.
    from safetensors.torch import save_file

    copy = {k: v.float() if v.is_floating_point() else v for k, v in load_file(tiny_models["sd1"]).items()}
    save_file(copy, str(service.models_dir / "tiny-sd1-a-fp32.safetensors"))
    body = {"model_tuned": "tiny-sd1-a-fp32", "model_base": "tiny-sd1-a"}
    response = client.post("/v1/jobs/lora_extract", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout=120)
    assert job["status"] == "failed" and job["error"]["type"].endswith("nothing-to-extract"), job
    assert job["error"]["status"] == 422 and job["error"]["field"] == "model_tuned"
