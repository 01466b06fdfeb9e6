"""describe_lora: LoRA / LoCon / LoHa / LoKr / DoRA / PEFT files described from their headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeprobe.checkpoints.checkpoint_headers import read_checkpoint_header
from mergeprobe.lora.lora_formats import LoraFile, LoraFormatError, describe_lora

UNET_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
UNET_TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
UNET_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float16)


def _alpha(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _lora(module: str, rank: int, out: int, inp: int, alpha: float | None = None) -> dict[str, torch.Tensor]:
    tensors = {f"{module}.lora_down.weight": _t(rank, inp), f"{module}.lora_up.weight": _t(out, rank)}
    if alpha is not None:
        tensors[f"{module}.alpha"] = _alpha(alpha)
    return tensors


def _write(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def _describe(path: Path, *, read: bool = True) -> LoraFile | None:
    header = read_checkpoint_header(path)
    return describe_lora(header, path if read else None)


def _kohya_sd1() -> dict[str, torch.Tensor]:
    return {
        **_lora(UNET_TO_K, 4, 320, 768, alpha=2.0),
        **_lora(TE_Q, 8, 768, 768, alpha=4.0),
        f"{UNET_CONV}.lora_down.weight": _t(4, 320, 3, 3),
        f"{UNET_CONV}.lora_up.weight": _t(320, 4, 1, 1),
        f"{UNET_CONV}.alpha": _alpha(1.0),
    }


def test_kohya_lora_and_locon_with_metadata(tmp_path: Path) -> None:
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1"}),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": "v1-5-pruned.safetensors",
        "ss_tag_frequency": json.dumps({"dir": {"tag": 3}}),
    }
    path = _write(tmp_path, _kohya_sd1(), metadata)
    lora = _describe(path)
    assert lora is not None
    assert lora.module_count == 3
    assert lora.formats == ("kohya-locon", "kohya-lora")
    assert lora.algorithms == ("lora", "locon")
    assert lora.ranks == (4, 8)
    assert lora.alphas == (1.0, 2.0, 4.0)
    assert lora.touches_unet and lora.text_encoders == ("te",) and lora.touches_text_encoders
    assert (lora.arch, lora.arch_source) == ("sd1", "metadata ss_base_model_version='sd_v1'")
    assert lora.training_metadata["ss_network_module"] == "networks.lora"
    assert lora.training_metadata["ss_network_dim"] == "8"
    assert "conv_dim" in lora.training_metadata["ss_network_args"]
    assert "ss_tag_frequency" not in lora.training_metadata
    assert lora.unrecognised == () and lora.unbakeable_modules == () and not lora.dora

    to_k = lora.modules[UNET_TO_K]
    assert (to_k.algorithm, to_k.key_style, to_k.component) == ("lora", "kohya", "unet")
    assert (to_k.rank, to_k.alpha, to_k.alpha_source, to_k.scale) == (4, 2.0, "tensor", 0.5)
    assert (to_k.is_conv, to_k.tucker, to_k.delta_shape) == (False, False, (320, 768))
    assert to_k.keys == {
        "down": f"{UNET_TO_K}.lora_down.weight",
        "up": f"{UNET_TO_K}.lora_up.weight",
        "alpha": f"{UNET_TO_K}.alpha",
    }
    conv = lora.modules[UNET_CONV]
    assert (conv.algorithm, conv.rank, conv.alpha, conv.is_conv) == ("locon", 4, 1.0, True)
    assert conv.delta_shape == (320, 320, 3, 3)
    assert lora.modules[TE_Q].component == "te" and lora.modules[TE_Q].delta_shape == (768, 768)


def test_alpha_unread_without_a_path(tmp_path: Path) -> None:
    lora = _describe(_write(tmp_path, _kohya_sd1()), read=False)
    assert lora is not None and lora.path is None
    assert lora.alphas == ()
    module = lora.modules[UNET_TO_K]
    assert (module.alpha, module.alpha_source, module.scale) == (None, "tensor", None)


def test_arch_from_text_encoder_width_then_cross_attention(tmp_path: Path) -> None:
    lora = _describe(_write(tmp_path, _kohya_sd1()))
    assert lora is not None
    assert (lora.arch, lora.arch_source) == ("sd1", "text encoder hidden size 768")

    sd2_te = _lora(TE_Q, 4, 1024, 1024) | _lora(UNET_TO_K, 4, 320, 1024)
    lora = _describe(_write(tmp_path, sd2_te))
    assert lora is not None and (lora.arch, lora.arch_source) == ("sd2", "text encoder hidden size 1024")

    lora = _describe(_write(tmp_path, _lora(UNET_TO_K, 4, 320, 1024) | _lora(UNET_TO_Q, 4, 320, 320)))
    assert lora is not None
    assert (lora.arch, lora.arch_source) == ("sd2", "U-Net cross-attention to_k input width 1024")
    assert lora.modules[UNET_TO_K].alpha_source == "default" and lora.modules[UNET_TO_K].scale == 1.0

    lora = _describe(_write(tmp_path, _lora(UNET_TO_Q, 4, 320, 320)))
    assert lora is not None and lora.arch == "unknown"
    assert lora.arch_source.startswith("no metadata")


def test_arch_from_modelspec(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _lora(UNET_TO_Q, 4, 320, 320),
        {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
    )
    lora = _describe(path)
    assert lora is not None
    assert (lora.arch, lora.arch_source) == (
        "sdxl",
        "metadata modelspec.architecture='stable-diffusion-xl-v1-base/lora'",
    )
    assert lora.training_metadata == {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}

    path = _write(tmp_path, _lora(UNET_TO_Q, 4, 320, 320), {"ss_base_model_version": "flux1"})
    lora = _describe(path)
    assert lora is not None and lora.arch == "unknown" and "flux1" in lora.arch_source


def test_locon_with_lora_mid(tmp_path: Path) -> None:
    module = "lora_unet_up_blocks_1_resnets_0_conv2"
    tensors = {
        f"{module}.lora_down.weight": _t(4, 320, 1, 1),
        f"{module}.lora_mid.weight": _t(4, 4, 3, 3),
        f"{module}.lora_up.weight": _t(640, 4, 1, 1),
        f"{module}.alpha": _alpha(2.0),
    }
    lora = _describe(_write(tmp_path, tensors))
    assert lora is not None
    m = lora.modules[module]
    assert (m.algorithm, m.rank, m.alpha, m.is_conv, m.tucker) == ("locon", 4, 2.0, True, True)
    assert m.delta_shape == (640, 320, 3, 3)
    assert set(m.keys) == {"down", "mid", "up", "alpha"}


def test_loha_plain_and_tucker(tmp_path: Path) -> None:
    plain = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tucker = UNET_CONV
    tensors = {
        f"{plain}.hada_w1_a": _t(320, 4),
        f"{plain}.hada_w1_b": _t(4, 768),
        f"{plain}.hada_w2_a": _t(320, 4),
        f"{plain}.hada_w2_b": _t(4, 768),
        f"{plain}.alpha": _alpha(2.0),
        f"{tucker}.hada_t1": _t(8, 8, 3, 3),
        f"{tucker}.hada_w1_a": _t(8, 640),
        f"{tucker}.hada_w1_b": _t(8, 320),
        f"{tucker}.hada_t2": _t(8, 8, 3, 3),
        f"{tucker}.hada_w2_a": _t(8, 640),
        f"{tucker}.hada_w2_b": _t(8, 320),
        f"{tucker}.alpha": _alpha(8.0),
    }
    lora = _describe(_write(tmp_path, tensors, {"ss_network_module": "lycoris.kohya"}))
    assert lora is not None
    assert lora.formats == ("lycoris-loha",) and lora.ranks == (4, 8) and lora.alphas == (2.0, 8.0)
    p = lora.modules[plain]
    assert (p.algorithm, p.key_style, p.rank, p.alpha, p.scale) == ("loha", "lycoris", 4, 2.0, 0.5)
    assert (p.is_conv, p.tucker, p.delta_shape) == (None, False, (320, 768))
    t = lora.modules[tucker]
    assert (t.rank, t.is_conv, t.tucker, t.delta_shape, t.scale) == (8, True, True, (640, 320, 3, 3), 1.0)


def test_lokr_full_w1_and_factored_w2(tmp_path: Path) -> None:
    factored = UNET_TO_K
    whole = UNET_TO_Q
    conv = UNET_CONV
    tensors = {
        f"{factored}.lokr_w1": _t(4, 8),
        f"{factored}.lokr_w2_a": _t(80, 2),
        f"{factored}.lokr_w2_b": _t(2, 96),
        f"{factored}.alpha": _alpha(1.0),
        f"{whole}.lokr_w1": _t(4, 4),
        f"{whole}.lokr_w2": _t(80, 80),
        f"{whole}.alpha": _alpha(3.0),
        f"{conv}.lokr_w1": _t(4, 4),
        f"{conv}.lokr_w2": _t(80, 80, 3, 3),
    }
    lora = _describe(_write(tmp_path, tensors))
    assert lora is not None and lora.algorithms == ("lokr",)
    f = lora.modules[factored]
    assert (f.rank, f.alpha, f.scale, f.delta_shape, f.is_conv) == (2, 1.0, 0.5, (320, 768), None)
    assert set(f.keys) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}
    w = lora.modules[whole]
    assert (w.rank, w.alpha, w.scale, w.delta_shape, w.is_conv) == ("full", 3.0, 1.0, (320, 320), False)
    c = lora.modules[conv]
    assert (c.rank, c.delta_shape, c.is_conv) == ("full", (320, 320, 3, 3), True)
    assert lora.ranks == (2,)
    # 768-wide cross attention in a LoKr: structure still tells sd1
    assert (lora.arch, lora.arch_source) == ("sd1", "U-Net cross-attention to_k input width 768")


def test_dora_kohya_and_peft(tmp_path: Path) -> None:
    tensors = _lora(UNET_TO_K, 4, 320, 768, alpha=4.0) | {f"{UNET_TO_K}.dora_scale": _t(1, 768)}
    tensors |= _lora(UNET_TO_Q, 4, 320, 320, alpha=4.0)
    lora = _describe(_write(tmp_path, tensors))
    assert lora is not None and lora.dora
    assert lora.modules[UNET_TO_K].dora and not lora.modules[UNET_TO_Q].dora
    assert lora.modules[UNET_TO_K].keys["dora_scale"] == f"{UNET_TO_K}.dora_scale"

    peft = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {
        f"{peft}.lora_A.weight": _t(4, 768),
        f"{peft}.lora_B.weight": _t(640, 4),
        f"{peft}.lora_magnitude_vector": _t(640),
    }
    lora = _describe(_write(tmp_path, tensors))
    assert lora is not None and lora.dora and lora.formats == ("peft-lora",)
    assert lora.modules[peft].keys["magnitude"] == f"{peft}.lora_magnitude_vector"


def test_peft_file_sdxl_with_metadata_alpha(tmp_path: Path) -> None:
    unet = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    te1 = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {
        f"{unet}.lora_A.weight": _t(4, 2048),
        f"{unet}.lora_B.weight": _t(640, 4),
        f"{te1}.lora_A.weight": _t(8, 768),
        f"{te1}.lora_B.weight": _t(768, 8),
        f"{te2}.lora_A.weight": _t(8, 1280),
        f"{te2}.lora_B.weight": _t(1280, 8),
    }
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    lora = _describe(_write(tmp_path, tensors, metadata))
    assert lora is not None
    assert lora.formats == ("peft-lora",) and lora.ranks == (4, 8) and lora.alphas == (8.0,)
    assert lora.text_encoders == ("te", "te2") and lora.touches_unet
    assert lora.arch == "sdxl" and "two text encoders" in lora.arch_source
    u = lora.modules[unet]
    assert (u.component, u.rank, u.alpha, u.alpha_source, u.scale) == ("unet", 4, 8.0, "metadata", 2.0)
    assert u.keys == {"down": f"{unet}.lora_A.weight", "up": f"{unet}.lora_B.weight"}
    assert u.delta_shape == (640, 2048)
    t = lora.modules[te1]
    assert (t.component, t.alpha, t.alpha_source, t.scale) == ("te", None, "default", 1.0)


def test_older_diffusers_naming(tmp_path: Path) -> None:
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {f"{module}.lora.down.weight": _t(4, 1024), f"{module}.lora.up.weight": _t(320, 4)}
    lora = _describe(_write(tmp_path, tensors))
    assert lora is not None and lora.formats == ("diffusers-lora",)
    assert lora.modules[module].rank == 4
    assert (lora.arch, lora.arch_source) == ("sd2", "U-Net cross-attention to_k input width 1024")


def test_kohya_sdxl_by_structure(tmp_path: Path) -> None:
    tensors = (
        _lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 4, 768, 768, alpha=1.0)
        | _lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 4, 1280, 1280, alpha=1.0)
        | _lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 4, 640, 2048, alpha=1.0)
    )
    lora = _describe(_write(tmp_path, tensors))
    assert lora is not None
    assert lora.text_encoders == ("te1", "te2") and lora.touches_unet
    assert (lora.arch, lora.arch_source) == (
        "sdxl",
        "two text encoders (lora_te1_/lora_te2_ or text_encoder_2 modules)",
    )


def test_full_and_ia3_recognised_but_unbakeable(tmp_path: Path) -> None:
    tensors = {
        f"{UNET_TO_K}.diff": _t(320, 768),
        f"{UNET_TO_K}.diff_b": _t(320),
        f"{UNET_TO_Q}.weight": _t(320),
        f"{UNET_TO_Q}.on_input": torch.tensor(0),
    }
    lora = _describe(_write(tmp_path, tensors))
    assert lora is not None
    assert lora.formats == ("lycoris-full", "lycoris-ia3")
    assert set(lora.unbakeable_modules) == {UNET_TO_K, UNET_TO_Q}
    full, ia3 = lora.modules[UNET_TO_K], lora.modules[UNET_TO_Q]
    assert (full.algorithm, full.rank, full.delta_shape, full.scale) == ("full", None, (320, 768), 1.0)
    assert (ia3.algorithm, ia3.rank, ia3.delta_shape) == ("ia3", None, None)
    assert ia3.keys == {"ia3_weight": f"{UNET_TO_Q}.weight", "on_input": f"{UNET_TO_Q}.on_input"}


def test_checkpoint_is_not_a_lora(tmp_path: Path) -> None:
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": _t(320, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": _t(320),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": _t(768),
    }
    assert _describe(_write(tmp_path, tensors)) is None
    # one LoRA-looking module among many other keys: still not a LoRA
    tensors |= _lora(UNET_TO_Q, 4, 320, 320) | {f"x.{i}.weight": _t(2) for i in range(4)}
    assert _describe(_write(tmp_path, tensors)) is None


def test_few_unrecognised_keys_are_listed(tmp_path: Path) -> None:
    tensors = _kohya_sd1() | {"bundle_emb.myembed.string_to_param.*": _t(2, 768)}
    lora = _describe(_write(tmp_path, tensors))
    assert lora is not None and lora.unrecognised == ("bundle_emb.myembed.string_to_param.*",)


@pytest.mark.parametrize(
    ("tensors", "module", "problem"),
    [
        ({f"{UNET_TO_K}.lora_up.weight": _t(320, 4)}, UNET_TO_K, "without its down"),
        ({f"{UNET_TO_K}.lora_down.weight": _t(4, 768)}, UNET_TO_K, "without its up"),
        (
            {f"{UNET_TO_K}.lora_down.weight": _t(4, 768), f"{UNET_TO_K}.lora_up.weight": _t(320, 8)},
            UNET_TO_K,
            "rank mismatch",
        ),
        (
            {f"{UNET_TO_K}.hada_w1_a": _t(320, 4), f"{UNET_TO_K}.hada_w2_a": _t(320, 4)},
            UNET_TO_K,
            "hada_w1_b is missing",
        ),
        (
            {
                f"{UNET_TO_K}.lokr_w1": _t(4, 8),
                f"{UNET_TO_K}.lokr_w2_a": _t(80, 2),
                f"{UNET_TO_K}.lokr_w2_b": _t(4, 96),
            },
            UNET_TO_K,
            "rank mismatch",
        ),
        (
            {f"{UNET_TO_K}.lokr_w1": _t(4, 8), f"{UNET_TO_K}.lora_down.weight": _t(4, 768)},
            UNET_TO_K,
            "mixes",
        ),
        (
            {f"{UNET_TO_K}.lora_down.weight": _t(4, 768), f"{UNET_TO_K}.lora_up.weight": _t(320, 4)}
            | {f"{UNET_TO_K}.alpha": _t(2)},
            UNET_TO_K,
            "not a scalar",
        ),
    ],
)
def test_malformed_lora_names_the_module(
    tmp_path: Path, tensors: dict[str, torch.Tensor], module: str, problem: str
) -> None:
    tensors = tensors | _lora(UNET_TO_Q, 4, 320, 320)
    with pytest.raises(LoraFormatError, match=problem) as info:
        _describe(_write(tmp_path, tensors))
    assert module in str(info.value)
    assert isinstance(info.value, ValueError)


def test_alpha_read_from_a_ckpt(tmp_path: Path) -> None:
    path = tmp_path / "lora.ckpt"
    torch.save(_lora(UNET_TO_K, 4, 320, 768, alpha=2.5), path)
    lora = _describe(path)
    assert lora is not None and lora.modules[UNET_TO_K].alpha == 2.5


def test_lokr_factored_w1_and_tucker_w2(tmp_path: Path) -> None:
    tensors = {
        f"{UNET_CONV}.lokr_w1_a": _t(4, 3),
        f"{UNET_CONV}.lokr_w1_b": _t(3, 8),
        f"{UNET_CONV}.lokr_t2": _t(2, 2, 3, 3),
        f"{UNET_CONV}.lokr_w2_a": _t(2, 80),
        f"{UNET_CONV}.lokr_w2_b": _t(2, 40),
        f"{UNET_CONV}.alpha": _alpha(1.0),
    }
    lora = _describe(_write(tmp_path, tensors))
    assert lora is not None
    m = lora.modules[UNET_CONV]
    # rank: w2's factor (ComfyUI's convention) when both sides are factored
    assert (m.rank, m.tucker, m.is_conv, m.delta_shape, m.scale) == (2, True, True, (320, 320, 3, 3), 0.5)


def test_peft_use_rslora_scales_by_the_square_root_of_the_rank(tmp_path: Path) -> None:
    """PEFT's use_rslora: scaling = lora_alpha / sqrt(r), carried as the effective alpha · sqrt(r)."""
    unet = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {
        f"{unet}.lora_A.weight": _t(16, 768),
        f"{unet}.lora_B.weight": _t(640, 16),
        f"{te}.lora_A.weight": _t(4, 768),
        f"{te}.lora_B.weight": _t(768, 4),
        **_lora(TE_Q.replace("layers_0", "layers_1"), 4, 768, 768, alpha=2.0),  # kohya: its tensor's
    }
    config = {"unet.r": 16, "unet.lora_alpha": 8, "unet.use_rslora": True, "text_encoder.lora_alpha": 8}
    lora = _describe(_write(tmp_path, tensors, {"lora_adapter_metadata": json.dumps(config)}))
    assert lora is not None
    u, t = lora.modules[unet], lora.modules[te]
    assert (u.rank, u.alpha, u.alpha_source, u.scale) == (16, 32.0, "metadata", 2.0)  # 8 / sqrt(16)
    assert (t.rank, t.alpha, t.alpha_source, t.scale) == (4, 8.0, "metadata", 2.0)  # 8 / 4: no rslora
    kohya = lora.modules[TE_Q.replace("layers_0", "layers_1")]
    assert (kohya.alpha, kohya.alpha_source, kohya.scale) == (2.0, "tensor", 0.5)
    assert lora.alphas == (2.0, 8.0, 32.0)

    # Unprefixed keys (a single LoraConfig) apply to every component; no lora_alpha: alpha = rank,
    # so the scale is rank / sqrt(rank) = sqrt(rank).
    config = {"r": 16, "use_rslora": True, "text_encoder.lora_alpha": 6, "text_encoder.use_rslora": False}
    lora = _describe(_write(tmp_path, tensors, {"lora_adapter_metadata": json.dumps(config)}))
    assert lora is not None
    u, t = lora.modules[unet], lora.modules[te]
    assert (u.alpha, u.alpha_source, u.scale) == (64.0, "metadata", 4.0)
    assert (t.alpha, t.alpha_source, t.scale) == (6.0, "metadata", 1.5)


LOCON_3X3 = {
    f"{UNET_CONV}.lora_down.weight": _t(4, 320, 3, 3),
    f"{UNET_CONV}.lora_up.weight": _t(640, 4, 1, 1),
}
PEFT_TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
PEFT_CONV = "unet.down_blocks.1.resnets.0.conv1"


@pytest.mark.parametrize(
    ("tensors", "module"),
    [
        (_lora(UNET_TO_K, 4, 320, 768) | {f"{UNET_TO_K}.dora_scale": _t(320, 1)}, UNET_TO_K),  # per out
        (_lora(UNET_TO_K, 4, 320, 768) | {f"{UNET_TO_K}.dora_scale": _t(1, 768)}, UNET_TO_K),  # per in
        (_lora(UNET_TO_K, 4, 320, 768) | {f"{UNET_TO_K}.dora_scale": _t(320)}, UNET_TO_K),
        (LOCON_3X3 | {f"{UNET_CONV}.dora_scale": _t(640, 1, 1, 1)}, UNET_CONV),
        (LOCON_3X3 | {f"{UNET_CONV}.dora_scale": _t(1, 320, 1, 1)}, UNET_CONV),
        (  # LoHa with the kernel flattened into hada_w*_b: `in` is a divisor of its columns
            {
                f"{UNET_CONV}.hada_w1_a": _t(640, 4),
                f"{UNET_CONV}.hada_w1_b": _t(4, 320 * 9),
                f"{UNET_CONV}.hada_w2_a": _t(640, 4),
                f"{UNET_CONV}.hada_w2_b": _t(4, 320 * 9),
                f"{UNET_CONV}.dora_scale": _t(1, 320, 1, 1),
            },
            UNET_CONV,
        ),
        (
            {
                f"{PEFT_TO_K}.lora_A.weight": _t(4, 768),
                f"{PEFT_TO_K}.lora_B.weight": _t(640, 4),
                f"{PEFT_TO_K}.lora_magnitude_vector": _t(640),
            },
            PEFT_TO_K,
        ),
        (  # PEFT on a conv: (1, out, 1, 1), still per output channel
            {
                f"{PEFT_CONV}.lora_A.weight": _t(4, 320, 3, 3),
                f"{PEFT_CONV}.lora_B.weight": _t(640, 4, 1, 1),
                f"{PEFT_CONV}.lora_magnitude_vector.weight": _t(1, 640, 1, 1),
            },
            PEFT_CONV,
        ),
    ],
)
def test_dora_magnitudes_on_either_axis_are_taken(
    tmp_path: Path, tensors: dict[str, torch.Tensor], module: str
) -> None:
    lora = _describe(_write(tmp_path, tensors | _lora(UNET_TO_Q, 4, 320, 320)))
    assert lora is not None and lora.modules[module].dora


@pytest.mark.parametrize(
    ("tensors", "module", "problem"),
    [
        (  # (in, 1): neither (out, 1) nor (1, in)
            _lora(UNET_TO_K, 4, 320, 768) | {f"{UNET_TO_K}.dora_scale": _t(768, 1)},
            UNET_TO_K,
            r"dora_scale \[768, 1\] fits neither the output axis \(\[320, 1, …\]\) nor the input axis",
        ),
        (
            _lora(UNET_TO_K, 4, 320, 768) | {f"{UNET_TO_K}.dora_scale": _t(1, 320)},
            UNET_TO_K,
            r"dora_scale \[1, 320\] fits neither",
        ),
        (LOCON_3X3 | {f"{UNET_CONV}.dora_scale": _t(1, 320, 3, 3)}, UNET_CONV, "dora_scale .* fits neither"),
        (LOCON_3X3 | {f"{UNET_CONV}.dora_scale": _t(320, 1, 1, 1)}, UNET_CONV, "dora_scale .* fits neither"),
        (
            {
                f"{PEFT_TO_K}.lora_A.weight": _t(4, 768),
                f"{PEFT_TO_K}.lora_B.weight": _t(640, 4),
                f"{PEFT_TO_K}.lora_magnitude_vector": _t(768),  # the input width
            },
            PEFT_TO_K,
            "lora_magnitude_vector .* not one value per output channel",
        ),
        (
            {
                f"{PEFT_TO_K}.lora_A.weight": _t(4, 768),
                f"{PEFT_TO_K}.lora_B.weight": _t(640, 4),
                f"{PEFT_TO_K}.lora_magnitude_vector": _t(640),
                f"{PEFT_TO_K}.dora_scale": _t(640, 1),
            },
            PEFT_TO_K,
            "both a dora_scale and a lora_magnitude_vector",
        ),
        (  # a k×k lora_up without lora_mid: lora_delta only takes 1×1 (the rank would pass: 1·2·2 = 4)
            {
                f"{UNET_CONV}.lora_down.weight": _t(4, 320, 1, 1),
                f"{UNET_CONV}.lora_up.weight": _t(640, 1, 2, 2),
            },
            UNET_CONV,
            r"lora_up \[640, 1, 2, 2\] must be 1×1",
        ),
        (
            {
                f"{UNET_CONV}.lora_down.weight": _t(4, 320, 3, 3),
                f"{UNET_CONV}.lora_up.weight": _t(640, 4, 3, 3),
            },
            UNET_CONV,
            "must be 1×1",
        ),
        (  # with lora_mid too
            {
                f"{UNET_CONV}.lora_down.weight": _t(4, 320, 1, 1),
                f"{UNET_CONV}.lora_mid.weight": _t(4, 4, 3, 3),
                f"{UNET_CONV}.lora_up.weight": _t(640, 1, 2, 2),
            },
            UNET_CONV,
            "must be 1×1",
        ),
        (
            {f"{UNET_CONV}.lokr_w1": _t(4, 4), f"{UNET_CONV}.lokr_w2": _t(160, 80, 3)},
            UNET_CONV,
            r"w2 must be 2-D \(linear\) or 4-D \(conv\)",
        ),
    ],
)
def test_factors_lora_delta_would_refuse_are_refused_from_the_header(
    tmp_path: Path, tensors: dict[str, torch.Tensor], module: str, problem: str
) -> None:
    with pytest.raises(LoraFormatError, match=problem) as info:
        _describe(_write(tmp_path, tensors | _lora(UNET_TO_Q, 4, 320, 320)))
    assert module in str(info.value)
