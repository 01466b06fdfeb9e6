"""LoRA module names (kohya, diffusers/PEFT, LDM paths) → the checkpoint keys they modify.

The truth is ``worker.checkpoints.param_map``: for every Linear and Conv2d of the real diffusers /
transformers modules (the tiny test models, and the full-size ones built on the meta device), the
LDM key its weight becomes, and for OpenCLIP's fused in_proj which third of it."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from mergeprobe.checkpoints.archs import BASE, UNET_PREFIX, get_arch
from mergeprobe.lora.lora_keys import LoraKeyTable, LoraTarget, normalise_module_name

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from worker.checkpoints.full_layouts import full_config_dir, full_state_dict_layout  # noqa: E402
from worker.checkpoints.param_map import ldm_groups_of  # noqa: E402
from worker.checkpoints.tiny_models import (  # noqa: E402
    build_tiny_pipeline_components,
    tiny_checkpoint_state_dict,
)

ARCHS = ("sd1", "sd2", "sdxl")
# pipeline component -> (kohya prefix, PEFT prefix, our component name)
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("lora_te_", "text_encoder.", "te")},
    "sd2": {"text_encoder": ("lora_te_", "text_encoder.", "te")},
    "sdxl": {
        "text_encoder": ("lora_te1_", "text_encoder.", "te1"),
        "text_encoder_2": ("lora_te2_", "text_encoder_2.", "te2"),
    },
}
P = UNET_PREFIX


def _check_every_module(arch: str, pipe, table: LoraKeyTable) -> int:
    """Every Linear/Conv2d of the U-Net and text encoders, by its kohya, PEFT and LDM-path names."""
    groups = ldm_groups_of(pipe, arch)
    where = {param: (key, params) for key, params in groups.items() for param in params}
    architecture = get_arch(arch)
    checked = 0
    components = {"unet": ("lora_unet_", "unet.", "unet"), **TEXT_ENCODERS[arch]}
    for component, (kohya, peft, ours) in components.items():
        for path, module in getattr(pipe, component).named_modules():
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                continue
            if path.endswith("text_projection"):
                # OpenCLIP stores it transposed ([width, embed]): not a target (a delta would need a .T)
                assert table.match(f"{kohya}{path.replace('.', '_')}") is None
                assert table.match(f"{peft}{path}.lora_A.weight") is None
                continue
            key, params = where[(component, f"{path}.weight")]
            rows = None
            if len(params) > 1:  # OpenCLIP in_proj: q, k, v stacked along dim 0
                i, out = params.index((component, f"{path}.weight")), module.weight.shape[0]
                rows = (i * out, (i + 1) * out)
            block = architecture.split_key(key)[0] if ours == "unet" else BASE
            expected = LoraTarget(key, rows, ours, block)
            if ours == "unet":
                names = [
                    f"lora_unet_{path.replace('.', '_')}.lora_down.weight",
                    f"lora_unet_{path.replace('.', '_')}",
                    f"unet.{path}.lora_A.weight",
                    f"base_model.model.{path}.lora_B.weight",
                    f"{path}.alpha",
                    # the LDM path: kohya's sdxl naming, ComfyUI
                    f"lora_unet_{key[len(P) : -len('.weight')].replace('.', '_')}.lora_up.weight",
                ]
            else:
                inner = path.removeprefix("text_model.")  # transformers >= 5.6 dropped the nesting
                names = [
                    f"{kohya}text_model_{inner.replace('.', '_')}.lora_down.weight",
                    f"{kohya}text_model_{inner.replace('.', '_')}.alpha",
                    f"{peft}{path}.lora_A.weight",
                    f"{peft}text_model.{inner}.lora_B.weight",
                ]
            for name in names:
                assert table.match(name) == expected, (name, table.match(name), expected)
            checked += 1
    return checked


@pytest.mark.parametrize("arch", ARCHS)
def test_every_module_of_the_tiny_models(arch):
    pipe = SimpleNamespace(**build_tiny_pipeline_components(arch))
    table = LoraKeyTable.for_checkpoint(arch, tiny_checkpoint_state_dict(arch))
    assert not table.ambiguous
    assert _check_every_module(arch, pipe, table) > 20


def _full_size_modules(arch: str) -> SimpleNamespace:
    import json

    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = full_config_dir(arch)
    parts = {}
    with torch.device("meta"):
        for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            parts[name] = cls.from_config(json.loads((root / name / "config.json").read_text()))
        for name, cls_name in (
            ("text_encoder", "CLIPTextModel"),
            ("text_encoder_2", "CLIPTextModelWithProjection"),
        ):
            if (root / name).is_dir():
                config = transformers.CLIPTextConfig.from_pretrained(root / name, local_files_only=True)
                parts[name] = getattr(transformers, cls_name)(config)
    return SimpleNamespace(**parts)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_module_of_the_full_size_models(arch):
    table = LoraKeyTable.for_checkpoint(arch, full_state_dict_layout(arch))
    assert not table.ambiguous
    # every U-Net weight has its LDM-path name and (all of them being diffusers modules) a diffusers one
    unet_weights = [k for k in full_state_dict_layout(arch) if k.startswith(P) and k.endswith(".weight")]
    assert len(table.entries["unet"]) == 2 * len(unet_weights)
    assert _check_every_module(arch, _full_size_modules(arch), table) > 200


def _full(arch: str) -> LoraKeyTable:
    return LoraKeyTable.for_checkpoint(arch, full_state_dict_layout(arch))


def test_sd1_full_size_names():
    table = _full("sd1")
    expect = {
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": (
            P + "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
            "IN05",
        ),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (
            P + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "IN01",
        ),
        "lora_unet_mid_block_resnets_0_conv1": (P + "middle_block.0.in_layers.2.weight", "M00"),
        "lora_unet_mid_block_resnets_1_time_emb_proj": (P + "middle_block.2.emb_layers.1.weight", "M00"),
        "lora_unet_middle_block_1_proj_in": (P + "middle_block.1.proj_in.weight", "M00"),
        "lora_unet_up_blocks_1_attentions_2_proj_out": (P + "output_blocks.5.1.proj_out.weight", "OUT05"),
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj": (
            P + "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
            "OUT11",
        ),
        "lora_unet_up_blocks_0_upsamplers_0_conv": (P + "output_blocks.2.1.conv.weight", "OUT02"),
        "lora_unet_up_blocks_1_upsamplers_0_conv": (P + "output_blocks.5.2.conv.weight", "OUT05"),
        "lora_unet_down_blocks_2_downsamplers_0_conv": (P + "input_blocks.9.0.op.weight", "IN09"),
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": (
            P + "input_blocks.4.0.skip_connection.weight",
            "IN04",
        ),
        "lora_unet_up_blocks_2_resnets_2_conv2": (P + "output_blocks.8.0.out_layers.3.weight", "OUT08"),
        "lora_unet_conv_in": (P + "input_blocks.0.0.weight", "IN00"),
        "lora_unet_conv_out": (P + "out.2.weight", "OUT11"),
        "lora_unet_time_embedding_linear_1": (P + "time_embed.0.weight", "IN00"),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": (
            P + "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",
            "IN01",
        ),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": (
            P + "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            "M00",
        ),
        "diffusion_model.input_blocks.1.1.proj_in": (P + "input_blocks.1.1.proj_in.weight", "IN01"),
        "lora_te_text_model_encoder_layers_11_mlp_fc2.lora_up.weight": (
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
            BASE,
        ),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            BASE,
        ),
        "text_model.encoder.layers.0.self_attn.out_proj.lora_A.weight": (
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight",
            BASE,
        ),
    }
    for name, (key, block) in expect.items():
        target = table.match(name)
        assert target is not None, name
        assert (target.key, target.block, target.rows) == (key, block, None), name


def test_sd2_open_clip_slices_and_native_names():
    table = _full("sd2")
    in_proj = "cond_stage_model.model.transformer.resblocks.{}.attn.in_proj_weight"
    for proj, rows in (("q", (0, 1024)), ("k", (1024, 2048)), ("v", (2048, 3072))):
        target = table.match(f"lora_te_text_model_encoder_layers_23_self_attn_{proj}_proj.lora_down.weight")
        assert target == LoraTarget(in_proj.format(23), rows, "te", BASE)
        target = table.match(f"text_encoder.text_model.encoder.layers.0.self_attn.{proj}_proj.lora_A.weight")
        assert target == LoraTarget(in_proj.format(0), rows, "te", BASE)
    prefix = "cond_stage_model.model.transformer.resblocks.5."
    for name, key in (
        ("lora_te_text_model_encoder_layers_5_mlp_fc1", prefix + "mlp.c_fc.weight"),
        ("lora_te_text_model_encoder_layers_5_mlp_fc2", prefix + "mlp.c_proj.weight"),
        ("lora_te_text_model_encoder_layers_5_self_attn_out_proj", prefix + "attn.out_proj.weight"),
        ("lora_te_model_transformer_resblocks_5_mlp_c_fc", prefix + "mlp.c_fc.weight"),
        ("lora_te_transformer_resblocks_5_mlp_c_proj", prefix + "mlp.c_proj.weight"),
        ("lora_te_model_transformer_resblocks_5_attn_out_proj", prefix + "attn.out_proj.weight"),
        ("lora_te_model_transformer_resblocks_5_attn_in_proj", prefix + "attn.in_proj_weight"),
    ):
        assert table.match(name) == LoraTarget(key, None, "te", BASE), name
    assert table.match("lora_te_text_model_encoder_layers_24_mlp_fc1") is None  # ViT-H has 24 blocks


def test_sdxl_full_size_names():
    table = _full("sdxl")
    te2 = "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
    assert table.match("lora_te2_text_model_encoder_layers_31_self_attn_v_proj.lora_up.weight") == (
        LoraTarget(te2, (2560, 3840), "te2", BASE)
    )
    te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
    for name in (
        "lora_te1_text_model_encoder_layers_3_mlp_fc1",
        "lora_te_text_model_encoder_layers_3_mlp_fc1",
    ):
        assert table.match(name) == LoraTarget(te1, None, "te1", BASE)
    expect = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
            "IN04",
        ),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_v": (
            "input_blocks.4.1.transformer_blocks.1.attn2.to_v.weight",
            "IN04",
        ),
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": (
            "middle_block.1.transformer_blocks.9.ff.net.2.weight",
            "M00",
        ),
        "lora_unet_output_blocks_2_2_conv": ("output_blocks.2.2.conv.weight", "OUT02"),
        "lora_unet_up_blocks_0_upsamplers_0_conv": ("output_blocks.2.2.conv.weight", "OUT02"),
        "lora_unet_up_blocks_2_resnets_0_conv_shortcut": (
            "output_blocks.6.0.skip_connection.weight",
            "OUT06",
        ),
        "lora_unet_down_blocks_1_downsamplers_0_conv": ("input_blocks.6.0.op.weight", "IN06"),
        "lora_unet_input_blocks_3_0_op": ("input_blocks.3.0.op.weight", "IN03"),
        "lora_unet_add_embedding_linear_1": ("label_emb.0.0.weight", "IN00"),
        "lora_unet_label_emb_0_2": ("label_emb.0.2.weight", "IN00"),
        "lora_unet_time_embedding_linear_2": ("time_embed.2.weight", "IN00"),
        "lora_unet_conv_out": ("out.2.weight", "OUT08"),
    }
    for name, (key, block) in expect.items():
        assert table.match(name) == LoraTarget(P + key, None, "unet", block), name


def test_open_clip_width_without_shapes_comes_from_the_full_config():
    keys = list(full_state_dict_layout("sdxl"))
    with_shapes, without = _full("sdxl"), LoraKeyTable.for_checkpoint("sdxl", keys)
    name = "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"
    assert without.match(name) == with_shapes.match(name)
    assert without.match(name).rows == (1280, 2560)


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        ("sd1", "lora_unet_foo"),
        ("sd1", "lora_unet_down_blocks_3_attentions_0_proj_in"),  # the deepest sd1 level has no attention
        ("sd1", "lora_unet_down_blocks_9_resnets_0_conv1"),
        ("sd1", "lora_unet_input_blocks_99_1_proj_in"),
        ("sd1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"),  # sd1 has one text encoder
        ("sd1", "lora_te_text_model_encoder_layers_12_mlp_fc1"),  # CLIP-L has 12 layers
        ("sd1", "lora_te_text_model_encoder_layers_0_self_attn_in_proj"),
        ("sd2", "lora_te_text_model_text_projection"),  # stored transposed: not mapped
        ("sdxl", "lora_unet_down_blocks_0_attentions_0_proj_in"),  # sdxl's first level has no attention
        ("sdxl", "text_model.encoder.layers.0.mlp.fc1.lora_A.weight"),  # which text encoder: ambiguous
        ("sdxl", "lora_prior_unet_input_blocks_4_1_proj_in"),
        ("sdxl", ""),
    ],
)
def test_unknown_names(arch, name):
    assert _full(arch).match(name) is None


def test_normalise_module_name():
    assert normalise_module_name("lora_unet_mid_block_resnets_0_conv1.lora_down.weight") == (
        "unet",
        "mid_block_resnets_0_conv1",
    )
    assert normalise_module_name(
        "base_model.model.text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_A.weight"
    ) == (
        "te2",
        "encoder_layers_1_mlp_fc1",
    )
    assert normalise_module_name("lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a") == (
        "te1",
        "encoder_layers_0_self_attn_q_proj",
    )
    assert normalise_module_name(
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    ) == (
        "unet",
        "up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
    )


def test_lora_keys_does_not_import_torch():
    code = "import sys, mergeprobe.lora.lora_keys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
