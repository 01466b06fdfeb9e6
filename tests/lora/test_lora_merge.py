"""lora_merge jobs through the API with a real worker: concatenated ranks are exact (baking the merged
LoRA equals baking its inputs), an SVD merge reports each module's error truly."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file, save_file  # noqa: E402

from tests.app.test_lora_library import BAKED, _random_lora  # noqa: E402
from tests.conftest import api_client, install_model, running_service, wait_for_job  # noqa: E402

PROBLEM = "application/problem+json"
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
KEY_TO_K = BAKED["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"][0]
KEY_TE_Q = BAKED["lora_te_text_model_encoder_layers_0_self_attn_q_proj"][0]
LBW = "1,0.5,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2"  # BASE 1, IN01 0.5, OUT11 2


def _peft_lora(path, base):
    """A diffusers/PEFT LoRA (rank 3, lora_alpha 6 from the metadata) on two layers the kohya one
    also modifies, under their diffusers / transformers names."""
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for name, key in ((f"unet.{TO_K}", KEY_TO_K), (f"text_encoder.{TE_Q}", KEY_TE_Q)):
        out, inp = base[key].shape
        tensors[f"{name}.lora_A.weight"] = torch.randn(3, inp, generator=g) * 0.1
        tensors[f"{name}.lora_B.weight"] = torch.randn(out, 3, generator=g) * 0.1
    metadata = {
        "lora_adapter_metadata": json.dumps({"lora_alpha": 6, "r": 3}),
        "modelspec.architecture": "stable-diffusion-v1/lora",  # the tiny widths tell no architecture
    }
    save_file(tensors, str(path), metadata)
    return tensors


def _loha_lora(path, base):
    key = KEY_TO_K
    out, inp = base[key].shape
    g = torch.Generator().manual_seed(12)
    name = "lora_unet_" + TO_K.replace(".", "_")
    tensors = {
        f"{name}.hada_w1_a": torch.randn(out, 2, generator=g) * 0.3,
        f"{name}.hada_w1_b": torch.randn(2, inp, generator=g) * 0.3,
        f"{name}.hada_w2_a": torch.randn(out, 2, generator=g) * 0.3,
        f"{name}.hada_w2_b": torch.randn(2, inp, generator=g) * 0.3,
        f"{name}.alpha": torch.tensor(2.0),
    }
    save_file(tensors, str(path), {"ss_base_model_version": "sd_v1"})
    return tensors


@pytest.fixture(scope="module")
def lora_library(redis_url, tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("lora-merge")
    with running_service(redis_url, tmp / "data") as service:
        install_model(service, tiny_models["sd1"])
        install_model(service, tiny_models["sdxl"])
        base = load_file(tiny_models["sd1"])
        kohya, kohya_path = _random_lora(tmp, base, name="kohya-style.safetensors")
        peft = _peft_lora(tmp / "peft-style.safetensors", base)
        loha = _loha_lora(tmp / "loha-style.safetensors", base)
        service.start_worker()
        with api_client(service) as client:
            for path in (kohya_path, tmp / "peft-style.safetensors", tmp / "loha-style.safetensors"):
                response = client.post("/v1/models", params={"name": path.name}, content=path.read_bytes())
                assert response.status_code == 201, response.text
            yield service, client, base, {"kohya": kohya, "peft": peft, "loha": loha}


def _run(client, kind, body, timeout=120):
    response = client.post(f"/v1/jobs/{kind}", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout=timeout)
    assert job["status"] == "succeeded", job
    return job


def test_concatenated_ranks_bake_exactly_as_the_inputs(lora_library):
    service, client, base, _ = lora_library
    inputs = [
        {"model": "kohya-style", "strength": 0.8, "blocks": LBW},
        {"model": "peft-style", "strength": -0.4},
    ]
    job = _run(
        client,
        "lora_merge",
        {
            "loras": inputs,
            "model": "tiny-sd1-a",
            "mode": "concat",
            "output": {"name": "both.safetensors", "dtype": "fp32"},
        },
    )
    result = job["result"]
    ranks = {m["name"]: m["rank"] for m in result["modules"]}
    # Shared layers hold both inputs' ranks (4 + 3), each named once as sd-scripts names it.
    assert ranks["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"] == 7
    assert ranks["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == 7
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 4
    assert len(ranks) == len(BAKED)
    assert result["max_relative_error"] < 1e-6
    assert [r["matched"] for r in result["loras"]] == [4, 2]

    one = _run(
        client,
        "bake",
        {
            "model": "tiny-sd1-a",
            "loras": [{"model": "both"}],
            "output": {"name": "one.safetensors", "dtype": "fp32"},
        },
    )
    two = _run(
        client,
        "bake",
        {"model": "tiny-sd1-a", "loras": inputs, "output": {"name": "two.safetensors", "dtype": "fp32"}},
    )
    assert one["result"]["keys"] == two["result"]["keys"]
    baked_once = load_file(service.models_dir / "one.safetensors")
    baked_twice = load_file(service.models_dir / "two.safetensors")
    for key, _ in BAKED.values():
        assert not torch.equal(baked_once[key], base[key].float()), key
        torch.testing.assert_close(baked_once[key], baked_twice[key], atol=1e-6, rtol=0)


def _expected_sum(factors, base):
    """Σ strength · ΔW of the kohya (0.8, blocks LBW) and PEFT (0.4) inputs, per key, written out."""
    weights = {"BASE": 1.0, "IN01": 0.5, "OUT11": 2.0}
    kohya, peft = factors["kohya"], factors["peft"]
    out = {}
    for module, (key, block) in BAKED.items():
        down, up = kohya[f"{module}.lora_down.weight"], kohya[f"{module}.lora_up.weight"]
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(4, -1)) * (2.0 / 4) * 0.8 * weights[block]
        out[key] = delta
    for name, key in ((f"unet.{TO_K}", KEY_TO_K), (f"text_encoder.{TE_Q}", KEY_TE_Q)):
        out[key] = out[key] + 0.4 * (peft[f"{name}.lora_B.weight"] @ peft[f"{name}.lora_A.weight"]) * (6 / 3)
    return out


def test_an_svd_merge_reduces_to_the_rank_and_reports_its_error(lora_library):
    service, client, base, factors = lora_library
    inputs = [
        {"model": "kohya-style", "strength": 0.8, "blocks": LBW},
        {"model": "peft-style", "strength": 0.4},
    ]
    job = _run(
        client,
        "lora_merge",
        {
            "loras": inputs,
            "model": "tiny-sd1-a",
            "mode": "svd",
            "rank": 2,
            "output": {"name": "small.safetensors", "dtype": "fp32"},
        },
    )
    result = job["result"]
    lora = load_file(service.models_dir / "small.safetensors")
    expected = _expected_sum(factors, base)
    for module in result["modules"]:
        name, key = module["name"], module["key"]
        assert module["rank"] == 2
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        assert float(lora[f"{name}.alpha"]) == 2.0
        got = up.reshape(up.shape[0], -1) @ down.reshape(2, -1)
        want = expected[key].reshape(got.shape)
        error = math.sqrt(float((got - want).square().sum() / want.square().sum()))
        assert error == pytest.approx(module["relative_error"], rel=1e-3, abs=1e-6), name
        # The best rank-2 approximation: its error is the spectrum's tail.
        s = torch.linalg.svdvals(want)
        assert error == pytest.approx(math.sqrt(float((s[2:] ** 2).sum() / (s**2).sum())), rel=1e-3)
        assert 0 < error < 1


def test_loha_merges_by_svd_and_not_by_concatenation(lora_library):
    _, client, base, factors = lora_library
    body = {
        "loras": [{"model": "loha-style"}, {"model": "kohya-style"}],
        "model": "tiny-sd1-a",
        "mode": "concat",
    }
    response = client.post("/v1/jobs/lora_merge", json=body)
    assert response.status_code == 400 and response.json()["field"] == "mode", response.text
    job = _run(client, "lora_merge", {**body, "mode": "svd", "rank": 64, "output": {"dtype": "fp32"}})
    to_k = next(m for m in job["result"]["modules"] if m["key"] == KEY_TO_K)
    assert to_k["rank"] == min(base[KEY_TO_K].shape)  # full rank: the Hadamard product is not low rank
    assert to_k["relative_error"] < 1e-5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"loras": [{"model": "kohya-style"}], "model": "tiny-sdxl-a"}, "model"),
        # Without `model`, the published sd1 checkpoint's layers: the tiny LoRA does not fit them.
        ({"loras": [{"model": "kohya-style"}]}, "loras[0].model"),
        ({"loras": [{"model": "tiny-sd1-a"}]}, "loras[0].model"),
        ({"loras": [{"model": "kohya-style", "blocks": "1,2,x"}], "model": "tiny-sd1-a"}, "loras[0].blocks"),
        ({"loras": []}, "loras"),
        ({"loras": [{"model": "kohya-style"}], "model": "tiny-sd1-a", "mode": "svd", "rank": 0}, "rank"),
    ],
)
def test_bad_lora_merges_are_400s_naming_the_field(lora_library, body, field):
    _, client, _, _ = lora_library
    response = client.post("/v1/jobs/lora_merge", json=body)
    assert response.status_code in (400, 422), response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem = response.json()
    assert problem.get("field") == field or any(e.get("field") == field for e in problem.get("errors", [])), (
        problem
    )


def test_concat_refuses_what_it_would_ignore_and_ranks_over_the_cap(lora_library, tmp_path):
    """Found in review: concat took rank/energy silently, and 32 copies of a LoRA made rank 2048."""
    _, client, _, _ = lora_library
    for extra in ({"energy": 0.5}, {"rank": 1}, {"conv_rank": 1}):
        body = {"loras": [{"model": "kohya-style"}], "model": "tiny-sd1-a", "mode": "concat", **extra}
        response = client.post("/v1/jobs/lora_merge", json=body)
        assert response.status_code == 400 and response.json()["field"] == next(iter(extra)), response.text
    many = {"loras": [{"model": "kohya-style"}] * 32, "model": "tiny-sd1-a", "mode": "concat"}  # 32 × 4
    job = _run(client, "lora_merge", many)  # 32 × 4 = 128 ≤ 1024
    assert {m["rank"] for m in job["result"]["modules"]} == {128}
    from tests.app.test_lora_library import _file

    big = {}
    g = torch.Generator().manual_seed(3)
    name = "lora_unet_" + TO_K.replace(".", "_")
    big[f"{name}.lora_down.weight"] = torch.randn(600, 32, generator=g)
    big[f"{name}.lora_up.weight"] = torch.randn(32, 600, generator=g)
    path = _file(tmp_path, "wide-rank.safetensors", big, {"ss_base_model_version": "sd_v1"})
    assert client.post("/v1/models", params={"name": path.name}, content=path.read_bytes()).status_code == 201
    response = client.post(
        "/v1/jobs/lora_merge",
        json={
            "loras": [{"model": "wide-rank"}, {"model": "wide-rank"}],
            "model": "tiny-sd1-a",
            "mode": "concat",
        },
    )
    assert response.status_code == 400 and response.json()["field"] == "loras", response.text


def test_factors_that_overflow_the_output_dtype_fail_the_job_clearly(lora_library, tmp_path):
    _, client, base, _ = lora_library
    from tests.app.test_lora_library import _file

    out, inp = base[KEY_TO_K].shape
    name = "lora_unet_" + TO_K.replace(".", "_")
    huge = {
        f"{name}.lora_down.weight": torch.ones(2, inp),
        f"{name}.lora_up.weight": torch.ones(out, 2),
        f"{name}.alpha": torch.tensor(1e30),
    }
    path = _file(tmp_path, "huge-alpha.safetensors", huge, {"ss_base_model_version": "sd_v1"})
    assert client.post("/v1/models", params={"name": path.name}, content=path.read_bytes()).status_code == 201
    body = {"loras": [{"model": "huge-alpha"}], "model": "tiny-sd1-a", "output": {"dtype": "fp16"}}
    job = wait_for_job(client, client.post("/v1/jobs/lora_merge", json=body).json()["id"], timeout=120)
    assert job["status"] == "failed", job
    assert job["error"]["type"].endswith("lora-overflow") and job["error"]["field"] == "output.dtype", job[
        "error"
    ]
    # A strength × alpha / rank that fp16 holds only split between the factors: √ on each.
    moderate = {**huge, f"{name}.alpha": torch.tensor(2.0e5)}  # scale 1e5: up·down ~ 1e5 per element
    path = _file(tmp_path, "big-alpha.safetensors", moderate, {"ss_base_model_version": "sd_v1"})
    assert client.post("/v1/models", params={"name": path.name}, content=path.read_bytes()).status_code == 201
    body = {
        "loras": [{"model": "big-alpha"}],
        "model": "tiny-sd1-a",
        "output": {"dtype": "fp16", "name": "big.safetensors"},
    }
    job = wait_for_job(client, client.post("/v1/jobs/lora_merge", json=body).json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["result"]["max_relative_error"] < 1e-3


def test_a_module_on_the_whole_fused_in_proj_keeps_its_open_clip_name(lora_library, tmp_path):
    """Found in review: an sd2 module on OpenCLIP's whole in_proj had no kohya name (a 500). It is
    merged under its own name, against the published sd2 layout (no checkpoint needed)."""
    _, client, _, _ = lora_library
    from tests.app.test_lora_library import _file

    name = "lora_te_transformer_resblocks_0_attn_in_proj"
    g = torch.Generator().manual_seed(4)
    factors = {
        f"{name}.lora_down.weight": torch.randn(2, 1024, generator=g),
        f"{name}.lora_up.weight": torch.randn(3072, 2, generator=g),
        f"{name}.alpha": torch.tensor(2.0),
    }
    path = _file(tmp_path, "inproj.safetensors", factors, {"ss_base_model_version": "sd_v2"})
    assert client.post("/v1/models", params={"name": path.name}, content=path.read_bytes()).status_code == 201
    body = {
        "loras": [{"model": "inproj", "strength": 0.5}],
        "output": {"dtype": "fp32", "name": "inproj-2.safetensors"},
    }
    job = _run(client, "lora_merge", body)
    assert [m["name"] for m in job["result"]["modules"]] == [name]
    assert (
        job["result"]["modules"][0]["key"]
        == "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    )
    lora = load_file(lora_library[0].models_dir / "inproj-2.safetensors")
    product = lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]
    expected = 0.5 * factors[f"{name}.lora_up.weight"] @ factors[f"{name}.lora_down.weight"]
    torch.testing.assert_close(product, expected, atol=1e-5, rtol=1e-5)
    assert lora[f"{name}.alpha"].dtype == torch.float32
