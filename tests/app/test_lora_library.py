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


# ---------------------------------------------------------------------------- the bake dry run

TINY_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # IN01 in sd1
TINY_TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
NOWHERE = "lora_unet_down_blocks_9_attentions_0_proj_in"


def _tiny_sd1_lora(tmp_path, name="tiny-style.safetensors", extra=None, arch="sd_v1"):
    tensors = {
        **_lora(TINY_TO_K, 4, 32, 32, alpha=2.0),
        **_lora(TINY_TE_Q, 4, 32, 32, alpha=4.0),
        **(extra or {}),
    }
    return _file(tmp_path, name, tensors, {"ss_base_model_version": arch})


@pytest.fixture
def bake_library(service, client, tiny_models, tmp_path):
    from tests.conftest import install_model

    install_model(service, tiny_models["sd1"])
    install_model(service, tiny_models["sdxl"])
    assert _upload(client, _tiny_sd1_lora(tmp_path, extra=_lora(NOWHERE, 4, 32, 32))).status_code == 201
    return client


def test_the_bake_dry_run_reports_what_each_lora_matched(bake_library):
    client = bake_library
    lbw = "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"  # BASE on, IN01 (first of the 17) off
    response = client.post(
        "/v1/plans/bake",
        json={
            "model": "tiny-sd1-a",
            "loras": [{"model": "tiny-style", "strength": 0.8}, {"model": "tiny-style", "blocks": lbw}],
        },
    )
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["arch"] == "sd1" and plan["keys_modified"] == 2
    first, second = plan["loras"]
    assert first["matched"] == 2 and first["modules"] == 3
    assert first["matched_by_block"] == {"BASE": 1, "IN01": 1}
    assert first["matched_by_component"] == {"te": 1, "unet": 1}
    assert first["unmatched"] == [NOWHERE] and first["unmatched_count"] == 1
    assert first["strengths"]["IN01"] == pytest.approx(0.8) and first["strengths"]["BASE"] == pytest.approx(
        0.8
    )
    assert second["strengths"]["IN01"] == 0 and second["strengths"]["BASE"] == 1
    assert second["strengths"]["OUT11"] == 1 and second["strengths"]["IN00"] == 0  # unnamed by the 17: 0
    assert any("tiny-style.safetensors" in w and NOWHERE in w for w in plan["warnings"])


def test_loras_that_cannot_apply_are_400s_at_the_dry_run(bake_library, tmp_path):
    client = bake_library
    # An sd1 LoRA on an sdxl model: refused by name (its text encoder modules would match CLIP-L).
    response = client.post(
        "/v1/plans/bake", json={"model": "tiny-sdxl-a", "loras": [{"model": "tiny-style"}]}
    )
    assert response.status_code == 400, response.text
    assert response.json()["type"].endswith("lora-architecture-mismatch")
    assert (
        response.json()["field"] == "loras[0].model" and "tiny-style.safetensors" in response.json()["detail"]
    )
    # Modules named for nothing this checkpoint has: 400 naming the LoRA and its first names.
    nothing = _file(
        tmp_path, "nothing.safetensors", _lora(NOWHERE, 4, 32, 32), {"ss_base_model_version": "sd_v1"}
    )
    assert _upload(client, nothing).status_code == 201
    response = client.post(
        "/v1/plans/bake",
        json={"model": "tiny-sd1-a", "loras": [{"model": "tiny-style"}, {"model": "nothing"}]},
    )
    problem = response.json()
    assert response.status_code == 400 and problem["type"].endswith("lora-matches-nothing")
    assert problem["field"] == "loras[1].model" and NOWHERE in problem["detail"]
    # A LoRA of another size: its update does not fit the tensor.
    wide = _file(
        tmp_path, "wide.safetensors", _lora(TINY_TO_K, 4, 320, 768), {"ss_base_model_version": "sd_v1"}
    )
    assert _upload(client, wide).status_code == 201
    response = client.post("/v1/plans/bake", json={"model": "tiny-sd1-a", "loras": [{"model": "wide"}]})
    assert response.status_code == 400 and response.json()["type"].endswith("lora-shape-mismatch")
    # A checkpoint where a LoRA goes, a bad LBW vector: named fields.
    response = client.post("/v1/plans/bake", json={"model": "tiny-sd1-a", "loras": [{"model": "tiny-sd1-a"}]})
    assert response.status_code == 400 and response.json()["field"] == "loras[0].model"
    response = client.post(
        "/v1/plans/bake", json={"model": "tiny-sd1-a", "loras": [{"model": "tiny-style", "blocks": "1,0,x"}]}
    )
    assert response.status_code == 400 and response.json()["field"] == "loras[0].blocks"


# ------------------------------------------------------------------------------------- the bake job

# kohya module → (the tiny sd1 checkpoint key it modifies, its block): written out here, not taken
# from the code under test.
BAKED = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "IN01",
    ),
    "lora_unet_down_blocks_0_resnets_0_conv1": (
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "IN01",
    ),
    "lora_unet_up_blocks_3_attentions_2_proj_out": (
        "model.diffusion_model.output_blocks.11.1.proj_out.weight",
        "OUT11",
    ),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "BASE",
    ),
}


def _random_lora(tmp_path, base, rank=4, name="baked-style.safetensors"):
    """A kohya LoRA of random factors on the BAKED modules of a tiny sd1 checkpoint (`base`: its
    tensors): LoCon k×k down + 1×1 up on a conv, a linear LoRA on a 1×1 conv (proj_out)."""
    import torch

    generator = torch.Generator().manual_seed(7)
    factors = {}
    for module, (key, _) in BAKED.items():
        out, inp, *kernel = base[key].shape
        down_shape = (rank, inp, *kernel) if kernel and kernel[0] > 1 else (rank, inp)
        up_shape = (out, rank, 1, 1) if len(down_shape) == 4 else (out, rank)
        factors[f"{module}.lora_down.weight"] = torch.randn(down_shape, generator=generator) * 0.1
        factors[f"{module}.lora_up.weight"] = torch.randn(up_shape, generator=generator) * 0.1
        factors[f"{module}.alpha"] = torch.tensor(2.0)
    return factors, _file(tmp_path, name, factors, {"ss_base_model_version": "sd_v1"})


def _delta(factors, module, shape, rank=4):
    """ΔW = up · down · alpha / rank, written out."""
    down, up = factors[f"{module}.lora_down.weight"], factors[f"{module}.lora_up.weight"]
    return (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shape) * (2.0 / rank)


def test_a_bake_adds_each_module_at_its_strength_and_block_weight(service, client, tiny_models, tmp_path):
    import torch
    from safetensors.torch import load_file

    from tests.conftest import install_model, wait_for_job

    install_model(service, tiny_models["sd1"])
    base = load_file(tiny_models["sd1"])
    factors, lora = _random_lora(tmp_path, base)
    assert _upload(client, lora).status_code == 201
    lbw = "1,0.5,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2"  # BASE 1, IN01 0.5, OUT11 2
    body = {
        "model": "tiny-sd1-a",
        "loras": [
            {"model": "baked-style", "strength": 0.8, "blocks": lbw},
            {"model": "baked-style", "strength": 0.3},
        ],
        "output": {"name": "baked.safetensors", "dtype": "fp32"},
    }
    service.start_worker()
    job = wait_for_job(client, client.post("/v1/jobs/bake", json=body).json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    first, second = job["result"]["loras"]
    assert first["matched"] == 4 and first["matched_by_block"] == {"BASE": 1, "IN01": 2, "OUT11": 1}

    baked = load_file(service.models_dir / "baked.safetensors")
    assert baked.keys() == base.keys()
    block_weight = {"BASE": 1.0, "IN01": 0.5, "OUT11": 2.0}
    for module, (key, block) in BAKED.items():
        expected = base[key].float() + (0.8 * block_weight[block] + 0.3) * _delta(
            factors, module, base[key].shape
        )
        torch.testing.assert_close(baked[key], expected, rtol=0, atol=2e-6)
    untouched = [k for k in base if k not in {key for key, _ in BAKED.values()}]
    for key in untouched:
        assert torch.equal(baked[key], base[key].to(baked[key].dtype)), key

    # A merge with the same LoRA: added to the merge result, in the same pass.
    b = load_file(tiny_models["sd1-b"])
    install_model(service, tiny_models["sd1-b"])
    merge = {
        "model_a": "tiny-sd1-a",
        "model_b": "tiny-sd1-b",
        "alpha": 0.25,
        "loras": [{"model": "baked-style", "strength": 0.5}],
        "output": {"name": "merged-styled.safetensors", "dtype": "fp32"},
    }
    job = wait_for_job(client, client.post("/v1/jobs/merge", json=merge).json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["result"]["loras"][0]["matched"] == 4
    merged = load_file(service.models_dir / "merged-styled.safetensors")
    for module, (key, _) in BAKED.items():
        blend = torch.lerp(base[key].float(), b[key].float(), 0.25)
        expected = blend + 0.5 * _delta(factors, module, base[key].shape)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=2e-6)


def test_a_layer_named_twice_is_applied_once_and_the_merge_dry_run_reports_loras(bake_library, tmp_path):
    """Found in review: kohya's LDM-path and diffusers-path names of one layer in one file."""
    client = bake_library
    ldm_name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"  # = TINY_TO_K
    twice = _file(
        tmp_path,
        "twice.safetensors",
        {**_lora(TINY_TO_K, 4, 32, 32, alpha=2.0), **_lora(ldm_name, 4, 32, 32, alpha=2.0)},
        {"ss_base_model_version": "sd_v1"},
    )
    assert _upload(client, twice).status_code == 201
    plan = client.post("/v1/plans/bake", json={"model": "tiny-sd1-a", "loras": [{"model": "twice"}]}).json()
    assert plan["loras"][0]["matched"] == 1 and plan["keys_modified"] == 1
    assert any("applied once" in w and ldm_name in w for w in plan["warnings"]), plan["warnings"]
    # The merge dry run matches a merge's LoRAs as the job will, and refuses the same things.
    merge = {"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-a", "loras": [{"model": "tiny-style"}]}
    answer = client.post("/v1/plans/merge", json=merge)
    assert answer.status_code == 200 and answer.json()["loras"][0]["matched"] == 2
    answer = client.post(
        "/v1/plans/merge", json={**merge, "loras": [{"model": "tiny-style", "blocks": 1e300}]}
    )
    assert answer.status_code == 400 and answer.json()["field"] == "loras[0].blocks"


def test_a_lora_of_rank_0_is_refused_at_upload(client, tmp_path):
    empty = _file(
        tmp_path, "empty.safetensors", _lora(TINY_TO_K, 0, 32, 32), {"ss_base_model_version": "sd_v1"}
    )
    response = _upload(client, empty)
    assert response.status_code == 400 and "rank 0" in response.json()["detail"]


def test_loras_leave_a_random_merge_as_it_is_and_add_their_delta(tmp_path, tiny_models, monkeypatch):
    """Found in review: the LoRA's key was merged in one range, so dare drew other random masks."""
    import os

    import torch
    from safetensors.torch import load_file

    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.merging.merge_plan import MergeRequest
    from mergeprobe.service.kinds import KINDS
    from mergeprobe.service.settings import Settings
    from worker.context import JobContext
    from worker.engines.merge import run_merge
    from worker.merging import merge_executor

    monkeypatch.setattr(merge_executor, "CHUNK_ELEMENTS", 256)  # several ranges per key of the tiny model
    models = tmp_path / "models"
    models.mkdir()
    for key in ("sd1", "sd1-b"):
        os.link(tiny_models[key], models / tiny_models[key].name)
    base = load_file(tiny_models["sd1"])
    factors, lora = _random_lora(tmp_path, base)
    os.replace(lora, models / lora.name)
    settings = Settings(data_dir=tmp_path / "data", models_dir=models)
    library = ModelLibrary(settings)

    def merged(name: str, loras: list) -> dict:
        request = MergeRequest(
            model_a="tiny-sd1-a",
            model_b="tiny-sd1-b",
            mode="dare",
            alpha=0.5,
            beta=0.5,
            seed=7,
            loras=loras,
            output={"name": name, "dtype": "fp32"},
        )
        run_merge(JobContext.local(KINDS["merge"], request, settings=settings, library=library))
        return load_file(models / name)

    plain = merged("plain.safetensors", [])
    styled = merged("styled.safetensors", [{"model": "baked-style", "strength": 0.5}])
    for module, (key, _) in BAKED.items():
        assert base[key].numel() > 256, key  # merged in several ranges
        torch.testing.assert_close(
            styled[key], plain[key] + 0.5 * _delta(factors, module, base[key].shape), rtol=0, atol=2e-6
        )
    untouched = set(plain) - {key for key, _ in BAKED.values()}
    assert all(torch.equal(plain[k], styled[k]) for k in untouched)
