"""The block tables on the real key names the tiny models carry."""

from __future__ import annotations

import pytest

from mergeprobe.checkpoints.archs import (
    ARCHITECTURES,
    SD1,
    SDXL,
    block_of_key,
    detect_arch,
    element_of_key,
    get_arch,
)
from mergeprobe.checkpoints.checkpoint_headers import read_checkpoint_header

P = "model.diffusion_model."


def test_block_lists():
    assert SD1.blocks[0] == "BASE" and len(SD1.unet_blocks) == 25 and len(SDXL.unet_blocks) == 19
    assert SD1.unet_blocks[11:14] == ("IN11", "M00", "OUT00")
    assert SDXL.unet_blocks[-1] == "OUT08"
    with pytest.raises(KeyError, match="unknown architecture"):
        get_arch("sd3")


@pytest.mark.parametrize(
    ("key", "block", "element"),
    [
        (
            P + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
            "IN04",
            "1.transformer_blocks.0.attn2.to_k.weight",
        ),
        (P + "input_blocks.0.0.weight", "IN00", "0.weight"),
        (P + "time_embed.0.weight", "IN00", "time_embed.0.weight"),
        (P + "middle_block.1.proj_in.weight", "M00", "1.proj_in.weight"),
        (P + "output_blocks.11.1.norm.bias", "OUT11", "1.norm.bias"),
        (P + "out.2.weight", "OUT11", "out.2.weight"),
        ("first_stage_model.decoder.conv_in.weight", "BASE", "first_stage_model.decoder.conv_in.weight"),
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "BASE",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        ),
    ],
)
def test_sd1_key_to_block_and_element(key, block, element):
    assert block_of_key(SD1, key) == block
    assert element_of_key(SD1, key) == element


def test_sdxl_special_keys():
    assert block_of_key(SDXL, P + "label_emb.0.0.weight") == "IN00"
    assert block_of_key(SDXL, P + "out.0.weight") == "OUT08"
    with pytest.raises(ValueError, match="does not exist in sdxl"):
        block_of_key(SDXL, P + "input_blocks.9.0.op.weight")


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_models_detect_and_map_every_key(tiny_models, arch):
    header = read_checkpoint_header(tiny_models[arch])
    assert detect_arch(header.tensors) == arch
    table = ARCHITECTURES[arch]
    seen = {block_of_key(table, key) for key in header.tensors}
    assert seen == set(table.blocks), "every block holds keys and no key falls outside the table"
    # Blocks without cross-attention are exactly those that read no text.
    with_attn2 = {block_of_key(table, k) for k in header.tensors if ".attn2." in k and k.startswith(P)}
    assert set(table.unet_blocks) - with_attn2 == table.textless_blocks


def test_detect_unet_only_and_unknown(tiny_models):
    for arch in ("sd1", "sd2"):
        header = read_checkpoint_header(tiny_models[arch])
        unet_only = {k: v for k, v in header.tensors.items() if k.startswith(P)}
        assert detect_arch(unet_only) == arch
    assert detect_arch({"foo.weight": header.tensors[next(iter(header.tensors))]}) == "unknown"


def test_architectures_are_their_data_files():
    """Everything the code knows of an architecture comes from its file: a changed file is a changed
    architecture, with no code touched."""
    from mergeprobe.checkpoints.archs import ARCHITECTURES, architecture_data, architecture_from_data

    for name, arch in ARCHITECTURES.items():
        data = architecture_data(name)
        assert architecture_from_data(data) == arch
        assert data["name"] == name and arch.conv_in == arch.unet_prefix + "input_blocks.0.0.weight"
    data = architecture_data("sd1")
    data["prefixes"]["unet"] = "unet."
    data["unet"]["output_blocks"] = 3
    shallow = architecture_from_data(data)
    assert shallow.split_key("unet.output_blocks.2.0.weight") == ("OUT02", "0.weight")
    assert shallow.split_key("unet.out.2.bias") == ("OUT02", "out.2.bias")
    assert shallow.split_key("model.diffusion_model.out.2.bias")[0] == "BASE"  # not its U-Net
    with pytest.raises(ValueError, match="OUT03"):
        shallow.split_key("unet.output_blocks.3.0.weight")
