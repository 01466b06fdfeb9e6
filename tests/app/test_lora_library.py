"""LoRA files in the library (issue 13, first part): uploaded, described, refused where they cannot
be told or applied, and never taken where a job needs a checkpoint."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from tests.lora.test_lora_formats import TE_Q, UNET_CONV, UNET_TO_K, _alpha, _kohya_sd1, _lora, _t

PROBLEM = "application/problem+json"


def _upload(client, path, name=None):
    return client.post("/v1/models", params={"name": name or path.name}, content=path.read_bytes())


def _file(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_kohya_lora_is_stored_and_described(client, tmp_path):
    lora = _file(
        tmp_path, "style.safetensors", _kohya_sd1(), {"ss_base_model_version": "sd_v1", "ss_network_dim": "8"}
    )
    response = _upload(client, lora)
    assert response.status_code == 201, response.text
    info = client.get("/v1/models/style").json()
    assert info["kind"] == "lora" and info["arch"] == "sd1"
    described = info["lora"]
    assert described["formats"] == ["kohya-locon", "kohya-lora"]
    assert described["module_count"] == 3 and described["ranks"] == [4, 8]
    assert described["alphas"] == [1.0, 2.0, 4.0]  # read from the file
    assert described["touches_unet"] and described["text_encoders"] == ["te"]
    assert described["training_metadata"]["ss_network_dim"] == "8"
    assert "ss_base_model_version" in described["arch_source"]
    listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert listed["style.safetensors"]["kind"] == "lora"


def test_loras_that_cannot_be_told_or_applied_are_refused(client, tmp_path):
    # No metadata and only a U-Net conv module: nothing says which architecture it is for.
    unknown = {
        f"{UNET_CONV}.lora_down.weight": _t(4, 320, 3, 3),
        f"{UNET_CONV}.lora_up.weight": _t(320, 4, 1, 1),
        f"{UNET_CONV}.alpha": _alpha(1.0),
    }
    broken = {f"{UNET_TO_K}.lora_up.weight": _t(320, 4)}  # an up without its down
    for name, tensors, slug in (
        ("which.safetensors", unknown, "unknown-lora-architecture"),
        ("broken.safetensors", {**_lora(TE_Q, 8, 768, 768), **broken}, "invalid-lora"),
    ):
        response = _upload(client, _file(tmp_path, name, tensors))
        assert response.status_code == 400 and response.headers["content-type"] == PROBLEM, response.text
        problem = response.json()
        assert problem["type"].endswith(slug) and problem["field"] == "body", problem
        assert name in problem["detail"]
    assert client.get("/v1/models").json()["models"] == []


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("inspect", {"model": "style"}, "model"),
        ("merge", {"model_a": "style", "model_b": "style"}, "model_a"),
        ("dump", {"model": "style", "prompt": "a cat", "steps": 1, "width": 64, "height": 64}, "model"),
    ],
)
def test_a_lora_is_not_a_checkpoint_to_jobs(client, tmp_path, kind, body, field):
    lora = _file(tmp_path, "style.safetensors", _kohya_sd1(), {"ss_base_model_version": "sd_v1"})
    assert _upload(client, lora).status_code == 201
    response = client.post(f"/v1/jobs/{kind}", json=body)
    assert response.status_code == 400, response.text
    problem = response.json()
    assert problem["type"].endswith("wrong-model-kind") and problem["field"] == field
    assert "style.safetensors is a LoRA (kohya-locon, kohya-lora, sd1)" in problem["detail"]
