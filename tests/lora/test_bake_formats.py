"""Every LoRA format baked end to end: uploaded (POST /v1/models), baked by a real worker
(POST /v1/jobs/bake), the output read back with safetensors and every key compared with the formula
written out here with torch, independently of worker.lora.lora_delta.

One service and one worker for the module; the sd1 formats (LoHa, LoKr, kohya DoRA, PEFT, PEFT
DoRA) are baked together in one job, on disjoint tensors, and the sdxl LoRA in another. Module names
and the checkpoint keys they modify are written out (not taken from the code under test); the
shapes are the tiny models' (worker/checkpoints/tiny_models.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import api_client, install_model, running_service, wait_for_job

pytestmark = pytest.mark.e2e

ATOL = 2e-6  # fp32 sums in another order than the worker's; values are O(1)
PROBLEM = "application/problem+json"
UNET = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer.text_model.encoder."
SDXL_TE1 = "conditioner.embedders.0.transformer.text_model.encoder."
SDXL_TE2 = "conditioner.embedders.1.model.transformer."


def _randn(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random factors, stored in `dtype`: the expectation is computed from the stored values."""
    return (torch.randn(shape, generator=generator) * 0.1).to(dtype)


def _alpha(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _upload(client, path: Path):
    return client.post("/v1/models", params={"name": path.name}, content=path.read_bytes())


def _save(directory: Path, name: str, tensors: dict, metadata: dict[str, str]) -> Path:
    path = directory / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def _assert_baked(baked: dict, base: dict, expected: dict, others: set[str] = frozenset()) -> None:
    """Every key of the output: `expected` (fp32) where given, the base cast to fp32 byte for byte
    where no LoRA of the job modifies it (`others`: the keys the job's other LoRAs modify)."""
    assert baked.keys() == base.keys()
    assert not set(expected) & set(others)
    for key, value in expected.items():
        assert baked[key].dtype == torch.float32, key
        torch.testing.assert_close(baked[key], value, rtol=0, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
        assert not torch.equal(baked[key], _f(base[key])), f"{key}: the LoRA changed nothing"
    for key in base.keys() - set(expected) - set(others):
        assert torch.equal(baked[key], base[key].to(torch.float32)), key


def _plus(base: dict, key: str, strength: float, delta: torch.Tensor) -> torch.Tensor:
    return _f(base[key]) + strength * delta.reshape(base[key].shape)


# ------------------------------------------------------------------ sd1: the formats, one job

SD1_META = {"ss_base_model_version": "sd_v1"}
# diffusers' PEFT files say nothing of the architecture, and the tiny models' widths tell none.
SD1_PEFT_META = {"modelspec.architecture": "stable-diffusion-v1/lora"}

# module → (the tiny sd1 key it modifies, its block)
LOHA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": (
        UNET + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",  # (256, 32)
        "IN01",
    ),
    "lora_unet_down_blocks_1_resnets_0_conv1": (
        UNET + "input_blocks.4.0.in_layers.2.weight",  # 64,32,3,3
        "IN04",
    ),
    "lora_unet_up_blocks_3_resnets_1_conv1": (
        UNET + "output_blocks.10.0.in_layers.2.weight",  # 32,64,3,3
        "OUT10",
    ),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (SD1_TE + "layers.0.mlp.fc1.weight", "BASE"),  # (128, 32)
}
LOHA_STRENGTH = 0.7


def _loha_file(g: torch.Generator) -> dict[str, torch.Tensor]:
    linear, tucker, flat_conv, te = LOHA
    return {
        # plain, on a linear layer: w*_a (out, r), w*_b (r, in)
        f"{linear}.hada_w1_a": _randn(g, 256, 4),
        f"{linear}.hada_w1_b": _randn(g, 4, 32),
        f"{linear}.hada_w2_a": _randn(g, 256, 4),
        f"{linear}.hada_w2_b": _randn(g, 4, 32),
        f"{linear}.alpha": _alpha(2.0),
        # Tucker, on a 3x3 conv: t* (r, r, 3, 3), w*_a (r, out), w*_b (r, in)
        f"{tucker}.hada_t1": _randn(g, 3, 3, 3, 3),
        f"{tucker}.hada_w1_a": _randn(g, 3, 64),
        f"{tucker}.hada_w1_b": _randn(g, 3, 32),
        f"{tucker}.hada_t2": _randn(g, 3, 3, 3, 3),
        f"{tucker}.hada_w2_a": _randn(g, 3, 64),
        f"{tucker}.hada_w2_b": _randn(g, 3, 32),
        f"{tucker}.alpha": _alpha(1.5),
        # plain, on a 3x3 conv: the kernel flattened into w*_b (r, in·3·3); fp16, no alpha (= rank)
        f"{flat_conv}.hada_w1_a": _randn(g, 32, 2, dtype=torch.float16),
        f"{flat_conv}.hada_w1_b": _randn(g, 2, 64 * 9, dtype=torch.float16),
        f"{flat_conv}.hada_w2_a": _randn(g, 32, 2, dtype=torch.float16),
        f"{flat_conv}.hada_w2_b": _randn(g, 2, 64 * 9, dtype=torch.float16),
        f"{te}.hada_w1_a": _randn(g, 128, 8),
        f"{te}.hada_w1_b": _randn(g, 8, 32),
        f"{te}.hada_w2_a": _randn(g, 128, 8),
        f"{te}.hada_w2_b": _randn(g, 8, 32),
        f"{te}.alpha": _alpha(4.0),
    }


def _loha_expected(t: dict, base: dict) -> dict[str, torch.Tensor]:
    expected = {}
    for module, (key, _) in LOHA.items():
        w = {role: _f(t[f"{module}.{role}"]) for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        rank = w["hada_w1_b"].shape[0]
        alpha = float(t[f"{module}.alpha"]) if f"{module}.alpha" in t else rank
        if f"{module}.hada_t1" in t:
            t1, t2 = _f(t[f"{module}.hada_t1"]), _f(t[f"{module}.hada_t2"])
            # W_n[p, q, k, l] = Σ_ij t_n[i, j, k, l] · w_n_a[i, p] · w_n_b[j, q]
            w1 = torch.einsum("ijkl,ip,jq->pqkl", t1, w["hada_w1_a"], w["hada_w1_b"])
            w2 = torch.einsum("ijkl,ip,jq->pqkl", t2, w["hada_w2_a"], w["hada_w2_b"])
        else:
            w1 = w["hada_w1_a"] @ w["hada_w1_b"]
            w2 = w["hada_w2_a"] @ w["hada_w2_b"]
        delta = (w1 * w2) * (alpha / rank)  # Hadamard product
        expected[key] = _plus(base, key, LOHA_STRENGTH, delta)
    return expected


LOKR = {
    # lokr_w1 whole (8, 4) ⊗ lokr_w2_a (64, 2) @ lokr_w2_b (2, 16): (512, 64)
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (
        UNET + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
        "M00",
    ),
    # lokr_w1 (4, 8) ⊗ lokr_w2 (16, 16, 3, 3), both whole: scale 1 whatever alpha says
    "lora_unet_up_blocks_0_resnets_0_conv1": (
        UNET + "output_blocks.0.0.in_layers.2.weight",  # 64,128,3,3
        "OUT00",
    ),
    # (lokr_w1_a @ lokr_w1_b) (4, 4) ⊗ Tucker lokr_t2 (3, 3, 3, 3) × lokr_w2_a (3, 8) × lokr_w2_b (3, 8)
    "lora_unet_down_blocks_0_resnets_0_conv2": (
        UNET + "input_blocks.1.0.out_layers.3.weight",  # 32,32,3,3
        "IN01",
    ),
    # lokr_w1 (2, 2) ⊗ lokr_w2_a (32, 4) @ lokr_w2_b (4, 32·3·3): the kernel flattened
    "lora_unet_mid_block_resnets_0_conv1": (UNET + "middle_block.0.in_layers.2.weight", "M00"),  # 64,64,3,3
}
LOKR_STRENGTH = -0.6
# 17-value LBW vector: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03 … OUT11; OUT00 is not
# one of them, so the whole-whole conv module is applied at 0.
LOKR_BLOCKS = "1,0.5,1,1,1,1,1,2,1,1,1,1,1,1,1,1,1"
LOKR_WEIGHTS = {"IN01": 0.5, "M00": 2.0, "OUT00": 0.0}


def _lokr_file(g: torch.Generator) -> dict[str, torch.Tensor]:
    linear, whole_conv, tucker_conv, flat_conv = LOKR
    bf16 = torch.bfloat16
    return {
        f"{linear}.lokr_w1": _randn(g, 8, 4, dtype=bf16),
        f"{linear}.lokr_w2_a": _randn(g, 64, 2, dtype=bf16),
        f"{linear}.lokr_w2_b": _randn(g, 2, 16, dtype=bf16),
        f"{linear}.alpha": _alpha(1.0),
        f"{whole_conv}.lokr_w1": _randn(g, 4, 8, dtype=bf16),
        f"{whole_conv}.lokr_w2": _randn(g, 16, 16, 3, 3, dtype=bf16),
        f"{whole_conv}.alpha": _alpha(5.0),
        f"{tucker_conv}.lokr_w1_a": _randn(g, 4, 2, dtype=bf16),
        f"{tucker_conv}.lokr_w1_b": _randn(g, 2, 4, dtype=bf16),
        f"{tucker_conv}.lokr_t2": _randn(g, 3, 3, 3, 3, dtype=bf16),
        f"{tucker_conv}.lokr_w2_a": _randn(g, 3, 8, dtype=bf16),
        f"{tucker_conv}.lokr_w2_b": _randn(g, 3, 8, dtype=bf16),
        f"{tucker_conv}.alpha": _alpha(1.5),
        f"{flat_conv}.lokr_w1": _randn(g, 2, 2, dtype=bf16),
        f"{flat_conv}.lokr_w2_a": _randn(g, 32, 4, dtype=bf16),
        f"{flat_conv}.lokr_w2_b": _randn(g, 4, 32 * 9, dtype=bf16),
        f"{flat_conv}.alpha": _alpha(2.0),
    }


def _lokr_expected(t: dict, base: dict) -> dict[str, torch.Tensor]:
    linear, whole_conv, tucker_conv, flat_conv = LOKR

    def w(module, role):
        return _f(t[f"{module}.{role}"])

    deltas = {
        # scale alpha / rank, rank = lokr_w2_b.shape[0] = 2
        linear: torch.kron(w(linear, "lokr_w1"), w(linear, "lokr_w2_a") @ w(linear, "lokr_w2_b")) * (1.0 / 2),
        # kron of (4, 8, 1, 1) and (16, 16, 3, 3); no factored side: scale 1 (alpha 5 ignored)
        whole_conv: torch.kron(w(whole_conv, "lokr_w1")[:, :, None, None], w(whole_conv, "lokr_w2")),
        # rank = lokr_w2_b.shape[0] = 3, alpha 1.5
        tucker_conv: torch.kron(
            (w(tucker_conv, "lokr_w1_a") @ w(tucker_conv, "lokr_w1_b"))[:, :, None, None],
            torch.einsum(
                "ijkl,ip,jq->pqkl",
                w(tucker_conv, "lokr_t2"),
                w(tucker_conv, "lokr_w2_a"),
                w(tucker_conv, "lokr_w2_b"),
            ).contiguous(),  # torch.kron views its operands
        )
        * (1.5 / 3),
        # (2, 2) ⊗ (32, 288) = (64, 576), read as (64, 64, 3, 3); rank 4, alpha 2
        flat_conv: torch.kron(w(flat_conv, "lokr_w1"), w(flat_conv, "lokr_w2_a") @ w(flat_conv, "lokr_w2_b"))
        * (2.0 / 4),
    }
    expected = {}
    for module, (key, block) in LOKR.items():
        weight = LOKR_WEIGHTS[block]
        if weight == 0:
            continue  # applied at 0: the key stays the base's, checked with the untouched ones
        expected[key] = _plus(base, key, LOKR_STRENGTH * weight, deltas[module])
    return expected


DORA = {
    # kohya LoRA + dora_scale (1, in): one norm per input column (older LyCORIS, ComfyUI's historic case)
    "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_ff_net_0_proj": (
        UNET + "output_blocks.10.1.transformer_blocks.0.ff.net.0.proj.weight",  # (256, 32)
        "OUT10",
    ),
    # text encoder LoRA + dora_scale (out, 1): one norm per output row (LyCORIS wd_on_out)
    "lora_te_text_model_encoder_layers_1_mlp_fc1": (SD1_TE + "layers.1.mlp.fc1.weight", "BASE"),  # (128, 32)
    # LoCon 3x3 conv + dora_scale (out, 1, 1, 1)
    "lora_unet_up_blocks_3_resnets_2_conv1": (
        UNET + "output_blocks.11.0.in_layers.2.weight",  # 32,64,3,3
        "OUT11",
    ),
}
DORA_STRENGTH = 1.0
PEFT_DORA = {
    # PEFT lora_A / lora_B + lora_magnitude_vector (out,): one norm per output row
    "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": (
        UNET + "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",  # (32, 128)
        "OUT11",
    ),
    # On a conv PEFT stores the magnitude (1, out, 1, 1) (its _DoraConvNdLayer: the norm over
    # (in, kh, kw), transposed): still one norm per output channel. A square 1x1 conv ...
    "unet.up_blocks.3.attentions.1.proj_in": (
        UNET + "output_blocks.10.1.proj_in.weight",  # 32,32,1,1
        "OUT10",
    ),
    # ... and a 3x3 one with other input channels
    "unet.up_blocks.3.resnets.0.conv1": (UNET + "output_blocks.9.0.in_layers.2.weight", "OUT09"),  # 32,96,3,3
}
# The bake adds strength · (W' − W) (ComfyUI's convention; see worker/lora/lora_delta.py on DoRA).
PEFT_DORA_STRENGTH = 0.5


def _dora_file(g: torch.Generator, base: dict) -> dict[str, torch.Tensor]:
    linear_in, te_out, conv_out = DORA
    fp16 = torch.float16

    def magnitude(key, dims, shape):
        """‖W‖ along the axis, jittered, as trained DoRA magnitudes are."""
        norm = torch.linalg.vector_norm(_f(base[key]), dim=dims, keepdim=True)
        return (norm * (1 + 0.2 * torch.randn(norm.shape, generator=g))).reshape(shape).to(fp16)

    return {
        f"{linear_in}.lora_down.weight": _randn(g, 4, 32, dtype=fp16),
        f"{linear_in}.lora_up.weight": _randn(g, 256, 4, dtype=fp16),
        f"{linear_in}.alpha": _alpha(2.0),
        f"{linear_in}.dora_scale": magnitude(DORA[linear_in][0], 0, (1, 32)),
        f"{te_out}.lora_down.weight": _randn(g, 8, 32, dtype=fp16),
        f"{te_out}.lora_up.weight": _randn(g, 128, 8, dtype=fp16),
        f"{te_out}.alpha": _alpha(4.0),
        f"{te_out}.dora_scale": magnitude(DORA[te_out][0], 1, (128, 1)),
        f"{conv_out}.lora_down.weight": _randn(g, 4, 64, 3, 3, dtype=fp16),
        f"{conv_out}.lora_up.weight": _randn(g, 32, 4, 1, 1, dtype=fp16),
        f"{conv_out}.alpha": _alpha(1.0),
        f"{conv_out}.dora_scale": magnitude(DORA[conv_out][0], (1, 2, 3), (32, 1, 1, 1)),
    }


def _peft_dora_file(g: torch.Generator, base: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for module, (key, _) in PEFT_DORA.items():
        out, inp, *kernel = base[key].shape
        w = _f(base[key])
        norm = torch.linalg.vector_norm(w, dim=list(range(1, w.dim())))
        magnitude = norm * (1 + 0.2 * torch.randn(norm.shape, generator=g))
        tensors[f"{module}.lora_A.weight"] = _randn(g, 4, inp, *kernel)
        tensors[f"{module}.lora_B.weight"] = _randn(g, out, 4, *[1 for _ in kernel])
        tensors[f"{module}.lora_magnitude_vector"] = magnitude.reshape(1, out, 1, 1) if kernel else magnitude
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": True}
    return tensors, {**SD1_PEFT_META, "lora_adapter_metadata": json.dumps(config)}


def _dora_expected(t: dict, peft: dict, base: dict) -> dict[str, torch.Tensor]:
    """W' = m · V / ‖V‖, V = W + alpha / rank · up @ down, the norm along the module's axis. (LyCORIS
    adds float32's eps to ‖V‖, PEFT does not: 1e-7 relative at most, within ATOL.)"""
    expected = {}
    for module, (key, _) in DORA.items():
        w = _f(base[key])
        down, up = _f(t[f"{module}.lora_down.weight"]), _f(t[f"{module}.lora_up.weight"])
        rank = down.shape[0]
        v = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (float(t[f"{module}.alpha"]) / rank)
        m = _f(t[f"{module}.dora_scale"])
        if m.shape[0] == 1:  # (1, in[, 1, 1]): over the output (and kernel) dims
            norm = torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != 1], keepdim=True)
        else:  # (out, 1[, 1, 1]): over the input (and kernel) dims
            norm = torch.linalg.vector_norm(v, dim=list(range(1, v.dim())), keepdim=True)
        assert norm.shape == m.shape
        expected[key] = w + DORA_STRENGTH * (m * v / norm - w)
    for module, (key, _) in PEFT_DORA.items():
        w = _f(base[key])
        a, b = peft[f"{module}.lora_A.weight"], peft[f"{module}.lora_B.weight"]
        v = w + (b.flatten(1) @ a.flatten(1)).reshape(w.shape) * (8 / 4)  # lora_alpha 8 (metadata), rank 4
        m = peft[f"{module}.lora_magnitude_vector"].reshape(-1, *[1] * (w.dim() - 1))  # (out, 1[, 1, 1])
        norm = torch.linalg.vector_norm(v, dim=list(range(1, v.dim())), keepdim=True)  # per output channel
        expected[key] = w + PEFT_DORA_STRENGTH * (m * v / norm - w)
    return expected


PEFT = {
    # unet.lora_alpha 8, rank 4
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (
        UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",  # (64, 32)
        "IN04",
    ),
    # a 1x1 conv (lora_A (r, in, 1, 1), lora_B (out, r, 1, 1)); unet.alpha_pattern gives it 16
    "unet.up_blocks.1.attentions.0.proj_in": (
        UNET + "output_blocks.3.1.proj_in.weight",  # 64,64,1,1
        "OUT03",
    ),
    # text_encoder.lora_alpha 6 with use_rslora: scale alpha / sqrt(rank), rank 4
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": (
        SD1_TE + "layers.0.self_attn.k_proj.weight",
        "BASE",
    ),
    # the same, rank 8 (text_encoder.rank_pattern)
    "text_encoder.text_model.encoder.layers.1.mlp.fc2": (
        SD1_TE + "layers.1.mlp.fc2.weight",  # (32, 128)
        "BASE",
    ),
}
PEFT_STRENGTH = 0.9
PEFT_SCALES = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 8 / 4,
    "unet.up_blocks.1.attentions.0.proj_in": 16 / 4,
    "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": 6 / math.sqrt(4),
    "text_encoder.text_model.encoder.layers.1.mlp.fc2": 6 / math.sqrt(8),
}


def _peft_file(g: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    to_k, proj_in, k_proj, fc2 = PEFT
    tensors = {
        f"{to_k}.lora_A.weight": _randn(g, 4, 32),
        f"{to_k}.lora_B.weight": _randn(g, 64, 4),
        f"{proj_in}.lora_A.weight": _randn(g, 4, 64, 1, 1),
        f"{proj_in}.lora_B.weight": _randn(g, 64, 4, 1, 1),
        f"{k_proj}.lora_A.weight": _randn(g, 4, 32),
        f"{k_proj}.lora_B.weight": _randn(g, 32, 4),
        f"{fc2}.lora_A.weight": _randn(g, 8, 128),
        f"{fc2}.lora_B.weight": _randn(g, 32, 8),
    }
    # diffusers' save_lora_weights: each component's LoraConfig, its keys prefixed by the component
    config = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.alpha_pattern": {"up_blocks.1.attentions.0.proj_in": 16},
        "unet.use_rslora": False,
        "text_encoder.r": 4,
        "text_encoder.lora_alpha": 6,
        "text_encoder.rank_pattern": {"text_model.encoder.layers.1.mlp.fc2": 8},
        "text_encoder.use_rslora": True,
    }
    return tensors, {**SD1_PEFT_META, "lora_adapter_metadata": json.dumps(config)}


def _peft_expected(t: dict, base: dict) -> dict[str, torch.Tensor]:
    expected = {}
    for module, (key, _) in PEFT.items():
        a, b = t[f"{module}.lora_A.weight"], t[f"{module}.lora_B.weight"]
        delta = (b.flatten(1) @ a.flatten(1)) * PEFT_SCALES[module]
        expected[key] = _plus(base, key, PEFT_STRENGTH, delta)
    return expected


@pytest.fixture(scope="module")
def bake_service(redis_url, tmp_path_factory, tiny_models):
    """One service with the tiny sd1 and sdxl models and one worker, for the module."""
    with running_service(redis_url, tmp_path_factory.mktemp("bake-formats") / "data") as svc:
        install_model(svc, tiny_models["sd1"])
        install_model(svc, tiny_models["sdxl"])
        svc.start_worker()
        with api_client(svc) as client:
            yield svc, client


def _bake(service, client, body: dict) -> tuple[dict, dict]:
    response = client.post("/v1/jobs/bake", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout=120)
    assert job["status"] == "succeeded", json.dumps(job)[:3000]
    return job, load_file(service.models_dir / body["output"]["name"])


@pytest.fixture(scope="module")
def sd1_bake(bake_service, tiny_models, tmp_path_factory):
    """The sd1 formats baked in one job: {"job", "baked" (the output), "base", "files": LoRA → its
    tensors, "targets": LoRA → the keys its modules modify}."""
    service, client = bake_service
    directory = tmp_path_factory.mktemp("sd1-loras")
    base = load_file(tiny_models["sd1"])
    g = torch.Generator().manual_seed(13)
    peft, peft_meta = _peft_file(g)
    peft_dora, peft_dora_meta = _peft_dora_file(g, base)
    files = {
        "bake-loha": (_loha_file(g), {**SD1_META, "ss_network_module": "lycoris.kohya"}),
        "bake-lokr": (_lokr_file(g), {**SD1_META, "ss_network_module": "lycoris.kohya"}),
        "bake-dora": (_dora_file(g, base), SD1_META),
        "bake-peft": (peft, peft_meta),
        "bake-peft-dora": (peft_dora, peft_dora_meta),
    }
    for name, (tensors, metadata) in files.items():
        response = _upload(client, _save(directory, f"{name}.safetensors", tensors, metadata))
        assert response.status_code == 201, response.text
    loras = [
        {"model": "bake-loha", "strength": LOHA_STRENGTH},
        {"model": "bake-lokr", "strength": LOKR_STRENGTH, "blocks": LOKR_BLOCKS},
        {"model": "bake-dora", "strength": DORA_STRENGTH},
        {"model": "bake-peft", "strength": PEFT_STRENGTH},
        {"model": "bake-peft-dora", "strength": PEFT_DORA_STRENGTH},
    ]
    body = {
        "model": "tiny-sd1-a",
        "loras": loras,
        "output": {"name": "sd1-formats.safetensors", "dtype": "fp32"},
    }
    job, baked = _bake(service, client, body)
    tensors = {name: t for name, (t, _) in files.items()}
    targets = [key for table in (LOHA, LOKR, DORA, PEFT, PEFT_DORA) for key, _ in table.values()]
    assert len(targets) == len(set(targets))  # disjoint: each key is one module's
    return {
        "job": job,
        "baked": baked,
        "base": base,
        "files": tensors,
        "targets": {
            "bake-loha": {k for k, _ in LOHA.values()},
            "bake-lokr": {k for k, _ in LOKR.values()},
            "bake-dora": {k for k, _ in DORA.values()},
            "bake-peft": {k for k, _ in PEFT.values()},
            "bake-peft-dora": {k for k, _ in PEFT_DORA.values()},
        },
    }


def _report(bake: dict, name: str) -> dict:
    (report,) = [r for r in bake["job"]["result"]["loras"] if r["lora"]["name"] == f"{name}.safetensors"]
    return report


def _others(bake: dict, *names: str) -> set[str]:
    return {key for name, keys in bake["targets"].items() if name not in names for key in keys}


def _blocks(table: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, block in table.values():
        counts[block] = counts.get(block, 0) + 1
    return dict(sorted(counts.items()))


def test_loha_plain_tucker_and_flattened_conv(sd1_bake):
    expected = _loha_expected(sd1_bake["files"]["bake-loha"], sd1_bake["base"])
    assert len(expected) == len(LOHA)
    _assert_baked(sd1_bake["baked"], sd1_bake["base"], expected, _others(sd1_bake, "bake-loha"))
    report = _report(sd1_bake, "bake-loha")
    assert report["formats"] == ["lycoris-loha"] and report["modules"] == report["matched"] == len(LOHA)
    assert report["matched_by_block"] == _blocks(LOHA) == {"BASE": 1, "IN01": 1, "IN04": 1, "OUT10": 1}
    assert report["matched_by_component"] == {"te": 1, "unet": 3}
    assert report["unmatched"] == [] and report["unbakeable"] == []


def test_lokr_whole_factored_tucker_and_flattened_conv(sd1_bake):
    expected = _lokr_expected(sd1_bake["files"]["bake-lokr"], sd1_bake["base"])
    assert len(expected) == len(LOKR) - 1  # OUT00's at block weight 0
    _assert_baked(sd1_bake["baked"], sd1_bake["base"], expected, _others(sd1_bake, "bake-lokr"))
    report = _report(sd1_bake, "bake-lokr")
    assert report["formats"] == ["lycoris-lokr"] and report["matched"] == len(LOKR)
    assert report["matched_by_block"] == _blocks(LOKR) == {"IN01": 1, "M00": 2, "OUT00": 1}
    assert report["matched_by_component"] == {"unet": 4}
    assert report["strengths"]["M00"] == pytest.approx(LOKR_STRENGTH * 2)
    assert report["strengths"]["IN01"] == pytest.approx(LOKR_STRENGTH * 0.5)
    assert report["strengths"]["OUT00"] == 0


def test_dora_scale_on_either_axis_and_peft_magnitude(sd1_bake):
    base = sd1_bake["base"]
    files = sd1_bake["files"]
    expected = _dora_expected(files["bake-dora"], files["bake-peft-dora"], base)
    assert len(expected) == len(DORA) + len(PEFT_DORA)
    others = _others(sd1_bake, "bake-dora", "bake-peft-dora")
    _assert_baked(sd1_bake["baked"], base, expected, others)
    # Not a plain LoRA: the norm is that of W + ΔW, along the axis dora_scale's shape says.
    for module, (key, _) in DORA.items():
        down = _f(files["bake-dora"][f"{module}.lora_down.weight"])
        up = _f(files["bake-dora"][f"{module}.lora_up.weight"])
        plain = _f(base[key]) + (up.flatten(1) @ down.flatten(1)).reshape(base[key].shape) * (
            float(files["bake-dora"][f"{module}.alpha"]) / down.shape[0]
        )
        assert (sd1_bake["baked"][key] - plain).abs().max() > 1e-3, key
    report = _report(sd1_bake, "bake-dora")
    assert report["formats"] == ["kohya-locon", "kohya-lora"] and report["matched"] == len(DORA)
    assert report["matched_by_block"] == _blocks(DORA) == {"BASE": 1, "OUT10": 1, "OUT11": 1}
    assert report["matched_by_component"] == {"te": 1, "unet": 2}
    report = _report(sd1_bake, "bake-peft-dora")
    assert report["formats"] == ["peft-locon", "peft-lora"] and report["matched"] == len(PEFT_DORA)
    assert report["matched_by_block"] == _blocks(PEFT_DORA) == {"OUT09": 1, "OUT10": 1, "OUT11": 1}


def test_peft_unet_and_text_encoder_with_metadata_alpha_and_rslora(sd1_bake):
    expected = _peft_expected(sd1_bake["files"]["bake-peft"], sd1_bake["base"])
    _assert_baked(sd1_bake["baked"], sd1_bake["base"], expected, _others(sd1_bake, "bake-peft"))
    report = _report(sd1_bake, "bake-peft")
    assert report["formats"] == ["peft-lora"] and report["matched"] == len(PEFT)
    assert report["matched_by_block"] == _blocks(PEFT) == {"BASE": 2, "IN04": 1, "OUT03": 1}
    assert report["matched_by_component"] == {"te": 2, "unet": 2}


def test_every_key_is_a_lora_s_or_the_base_s(sd1_bake):
    """No key the job's LoRAs do not name changed; the formats' tests check the others."""
    targets = set().union(*sd1_bake["targets"].values())
    _assert_baked(sd1_bake["baked"], sd1_bake["base"], {}, targets)
    assert sd1_bake["job"]["result"]["loras"][1]["strengths"]["OUT00"] == 0


# ------------------------------------------------------------------------- sdxl: kohya, te1 + te2

IN_PROJ = SDXL_TE2 + "resblocks.0.attn.in_proj_weight"  # (192, 64): q, k, v rows of 64
SDXL = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
        SDXL_TE1 + "layers.0.self_attn.q_proj.weight",
        None,
    ),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (IN_PROJ, (0, 64)),
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (IN_PROJ, (64, 128)),
    "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (IN_PROJ, (128, 192)),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": (
        SDXL_TE2 + "resblocks.0.mlp.c_fc.weight",
        None,
    ),  # (256, 64)
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (
        UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",  # (64, 96)
        None,
    ),
    "lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k": (
        UNET + "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight",  # (64, 96), IN07 at 0
        None,
    ),
    "lora_unet_middle_block_1_proj_in": (UNET + "middle_block.1.proj_in.weight", None),  # (64, 64)
    "lora_unet_output_blocks_0_1_proj_in": (UNET + "output_blocks.0.1.proj_in.weight", None),  # (64, 64)
    # LoCon 3x3 on IN01, which the 12-value vector does not name: 0
    "lora_unet_input_blocks_1_0_in_layers_2": (UNET + "input_blocks.1.0.in_layers.2.weight", None),
}
SDXL_BLOCK = {
    "lora_te1": "BASE",
    "lora_te2": "BASE",
    "lora_unet_input_blocks_4": "IN04",
    "lora_unet_input_blocks_7": "IN07",
    "lora_unet_middle_block": "M00",
    "lora_unet_output_blocks_0": "OUT00",
    "lora_unet_input_blocks_1": "IN01",
}
# 12 values: BASE, IN04, IN05, IN07, IN08, M00, OUT00 … OUT05
SDXL_LBW = "0.5,1.5,0,0,0,-1,2,0,0,0,0,0"
SDXL_WEIGHTS = {"BASE": 0.5, "IN04": 1.5, "IN07": 0.0, "M00": -1.0, "OUT00": 2.0, "IN01": 0.0}
SDXL_STRENGTH = 0.8


def _sdxl_block(module: str) -> str:
    return next(block for prefix, block in SDXL_BLOCK.items() if module.startswith(prefix + "_"))


def _sdxl_file(g: torch.Generator, base: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, (module, (key, rows)) in enumerate(SDXL.items()):
        out, inp, *kernel = base[key].shape
        if rows is not None:
            out = rows[1] - rows[0]
        rank = 2 + i % 3
        down = (rank, inp, *kernel)  # a 3x3 down with a 1x1 up on a conv (LoCon)
        up = (out, rank, 1, 1) if kernel else (out, rank)
        tensors[f"{module}.lora_down.weight"] = _randn(g, *down, dtype=torch.float16)
        tensors[f"{module}.lora_up.weight"] = _randn(g, *up, dtype=torch.float16)
        tensors[f"{module}.alpha"] = _alpha(float(rank + i % 2))
    return tensors


def _sdxl_expected(t: dict, base: dict) -> dict[str, torch.Tensor]:
    expected: dict[str, torch.Tensor] = {}
    for module, (key, rows) in SDXL.items():
        weight = SDXL_WEIGHTS[_sdxl_block(module)]
        if weight == 0:
            continue
        down, up = _f(t[f"{module}.lora_down.weight"]), _f(t[f"{module}.lora_up.weight"])
        rank = down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)) * (float(t[f"{module}.alpha"]) / rank)
        value = expected.setdefault(key, _f(base[key]).clone())
        part = value if rows is None else value[rows[0] : rows[1]]
        part += SDXL_STRENGTH * weight * delta.reshape(part.shape)
    return expected


def test_sdxl_kohya_te1_te2_rows_unet_and_block_weights(bake_service, tiny_models, tmp_path):
    service, client = bake_service
    base = load_file(tiny_models["sdxl"])
    tensors = _sdxl_file(torch.Generator().manual_seed(21), base)
    path = _save(tmp_path, "bake-sdxl.safetensors", tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert _upload(client, path).status_code == 201
    body = {
        "model": "tiny-sdxl-a",
        "loras": [{"model": "bake-sdxl", "strength": SDXL_STRENGTH, "blocks": SDXL_LBW}],
        "output": {"name": "sdxl-baked.safetensors", "dtype": "fp32"},
    }
    job, baked = _bake(service, client, body)
    expected = _sdxl_expected(tensors, base)
    # q, k and v each modify their rows of the one fused in_proj_weight
    assert IN_PROJ in expected and len(expected) == 6
    _assert_baked(baked, base, expected)
    (report,) = job["result"]["loras"]
    assert report["arch"] == "sdxl" and report["formats"] == ["kohya-locon", "kohya-lora"]
    assert report["modules"] == report["matched"] == len(SDXL) and report["unmatched"] == []
    assert report["matched_by_block"] == {"BASE": 5, "IN01": 1, "IN04": 1, "IN07": 1, "M00": 1, "OUT00": 1}
    assert report["matched_by_component"] == {"te1": 1, "te2": 4, "unet": 5}
    for block, weight in SDXL_WEIGHTS.items():
        assert report["strengths"][block] == pytest.approx(SDXL_STRENGTH * weight), block


# ------------------------------------------------------------------------- refused at upload

SD1_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # (32, 32)


def test_a_dora_scale_that_fits_no_axis_is_refused_at_upload(bake_service, tmp_path):
    _, client = bake_service
    g = torch.Generator().manual_seed(5)
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"  # (256, 32)
    tensors = {
        f"{SD1_TO_K}.lora_down.weight": _randn(g, 4, 32),
        f"{SD1_TO_K}.lora_up.weight": _randn(g, 32, 4),
        f"{module}.lora_down.weight": _randn(g, 4, 32),
        f"{module}.lora_up.weight": _randn(g, 256, 4),
        f"{module}.dora_scale": _randn(g, 32, 1),  # neither (256, 1) nor (1, 32)
    }
    path = _save(tmp_path, "bad-dora.safetensors", tensors, SD1_META)
    response = _upload(client, path)
    assert response.status_code == 400 and response.headers["content-type"] == PROBLEM, response.text
    problem = response.json()
    assert problem["type"].endswith("invalid-lora") and problem["field"] == "body", problem
    assert (
        module in problem["detail"] and "dora_scale" in problem["detail"] and "bad-dora" in problem["detail"]
    )
    assert not any(m["name"] == "bad-dora.safetensors" for m in client.get("/v1/models").json()["models"])
