"""Full-size checkpoint layouts, element tables and streamed random checkpoints."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mergeprobe.checkpoints.archs import (  # noqa: E402
    BASE,
    UNET_PREFIX,
    block_of_key,
    detect_arch,
    element_of_key,
    get_arch,
)
from mergeprobe.checkpoints.checkpoint_headers import TensorInfo, read_checkpoint_header  # noqa: E402
from mergeprobe.checkpoints.elements import element_names, element_table_document  # noqa: E402
from worker.checkpoints.full_layouts import (  # noqa: E402
    ELEMENTS_ROOT,
    FULL_ARCHS,
    element_table,
    file_order,
    full_state_dict_layout,
    layout_numel,
    render_element_table,
    write_random_checkpoint,
)

ARCHS = list(FULL_ARCHS)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def test_sd1_counts_match_the_published_model():
    layout = full_state_dict_layout("sd1")
    assert sum(1 for k in layout if k.startswith(UNET_PREFIX)) == 686
    assert layout_numel(layout, UNET_PREFIX) == 859_520_964
    assert layout_numel(layout, "first_stage_model.") == pytest.approx(83.65e6, rel=0.001)
    assert layout_numel(layout, "cond_stage_model.") == 123_060_480 + 77  # + position_ids
    assert layout_numel(layout) == pytest.approx(1.066e9, rel=0.01)


def test_sd2_has_all_24_open_clip_blocks_and_the_projection():
    layout = full_state_dict_layout("sd2")
    assert layout_numel(layout, UNET_PREFIX) == pytest.approx(865.9e6, rel=0.001)
    prefix = "cond_stage_model.model."
    assert layout[prefix + "transformer.resblocks.23.attn.in_proj_weight"] == ((3072, 1024), "F16")
    assert f"{prefix}transformer.resblocks.24.ln_1.weight" not in layout
    assert layout[prefix + "text_projection"] == ((1024, 1024), "F16")
    assert layout[prefix + "logit_scale"] == ((), "F16")
    assert not any("position_ids" in k for k in layout)


def test_sdxl_counts_match_the_published_model():
    layout = full_state_dict_layout("sdxl")
    assert sum(1 for k in layout if k.startswith(UNET_PREFIX)) == 1680
    assert len(layout) == 2515
    assert layout_numel(layout, UNET_PREFIX) == pytest.approx(2.567e9, rel=0.001)
    assert layout_numel(layout) == pytest.approx(3.5e9, rel=0.03)
    big_g = "conditioner.embedders.1.model."
    assert layout[big_g + "text_projection"] == ((1280, 1280), "F16")
    assert layout[big_g + "transformer.resblocks.31.attn.in_proj_weight"] == ((3840, 1280), "F16")
    assert layout[UNET_PREFIX + "label_emb.0.0.weight"] == ((1280, 2816), "F16")


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_shapes_follow_the_ldm_conventions(arch):
    layout = full_state_dict_layout(arch)
    assert layout["first_stage_model.encoder.mid.attn_1.q.weight"] == ((512, 512, 1, 1), "F16")
    assert layout["first_stage_model.decoder.mid.attn_1.proj_out.weight"] == ((512, 512, 1, 1), "F16")
    ids = [k for k in layout if k.endswith("position_ids")]
    assert all(layout[k] == ((1, 77), "I64") for k in ids)
    assert len(ids) == {"sd1": 1, "sd2": 0, "sdxl": 1}[arch]
    assert {dtype for _, dtype in layout.values()} <= {"F16", "I64"}
    assert {dtype for _, dtype in full_state_dict_layout(arch, "bf16").values()} <= {"BF16", "I64"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_key_has_a_block_and_the_arch_is_detected(arch):
    a = get_arch(arch)
    layout = full_state_dict_layout(arch)
    blocks = {block_of_key(a, key) for key in layout}
    assert blocks == set(a.blocks)
    assert (
        detect_arch({k: TensorInfo(k, dtype, shape, (0, 0)) for k, (shape, dtype) in layout.items()}) == arch
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tiny_model_key_is_a_real_key(arch):
    """The tiny test models are the full ones, narrower: same names, same ranks, same dtypes.
    (The full models have more keys: more text encoder layers, and shortcut convolutions
    where the channel count changes between levels, which the tiny models keep constant.)"""
    from worker.checkpoints.tiny_models import tiny_checkpoint_state_dict

    full = full_state_dict_layout(arch, "fp32")
    tiny = tiny_checkpoint_state_dict(arch)
    assert set(tiny) <= set(full)
    for key, tensor in tiny.items():
        shape, dtype = full[key]
        assert tensor.ndim == len(shape), key
        assert dtype == ("I64" if "position_ids" in key else "F32"), key


@pytest.mark.parametrize("arch", ARCHS)
def test_committed_element_tables_are_current(arch):
    path = ELEMENTS_ROOT / f"{arch}.json"
    assert path.read_text(encoding="utf-8") == render_element_table(arch), (
        f"{path} is stale: run `python -m worker.checkpoints.full_layouts --write-element-tables`"
    )
    table = element_table(arch)
    assert element_names(arch) == table
    assert list(table) == list(get_arch(arch).unet_blocks)
    assert BASE not in table
    document = element_table_document(arch)
    assert document["arch"] == arch
    assert sum(document["base"]["prefixes"].values()) == sum(
        1 for k in full_state_dict_layout(arch) if block_of_key(get_arch(arch), k) == BASE
    )


def test_element_tables_hold_the_expected_names():
    sd1 = element_names("sd1")
    assert "1.transformer_blocks.0.attn2.to_k.weight" in sd1["OUT05"]
    assert "time_embed.0.weight" in sd1["IN00"]
    assert "out.2.weight" in sd1["OUT11"]
    assert "2.conv.weight" in sd1["OUT08"]  # the upsampler after the attention
    assert not any("attn" in e for e in sd1["IN11"])
    sdxl = element_names("sdxl")
    assert "label_emb.0.0.weight" in sdxl["IN00"]
    assert "1.transformer_blocks.9.attn1.to_q.weight" in sdxl["IN07"]
    assert "1.transformer_blocks.9.attn1.to_q.weight" in sdxl["M00"]
    a = get_arch("sdxl")
    assert (
        element_of_key(a, UNET_PREFIX + "input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight")
        in sdxl["IN07"]
    )
    with pytest.raises(KeyError):
        element_names("sd3")


def test_write_random_checkpoint_streams_a_subset(tmp_path):
    from safetensors import safe_open

    layout = full_state_dict_layout("sd1")
    keys = [
        *list(layout)[:6],
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        UNET_PREFIX + "input_blocks.4.1.proj_in.weight",
        UNET_PREFIX + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",  # > one fill chunk
    ]
    path = write_random_checkpoint("sd1", tmp_path / "r.safetensors", seed=3, keys=keys)
    again = write_random_checkpoint("sd1", tmp_path / "r2.safetensors", seed=3, keys=reversed(keys))
    other = write_random_checkpoint("sd1", tmp_path / "r3.safetensors", seed=4, keys=keys)
    assert path.read_bytes() == again.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*partial*"))

    header = read_checkpoint_header(path)
    assert list(header.tensors) == file_order({k: layout[k] for k in keys})
    assert header.metadata == {"format": "pt"}
    with safe_open(str(path), "pt") as f, safe_open(str(other), "pt") as g:
        assert set(f.keys()) == set(keys)
        for key in keys:
            tensor = f.get_tensor(key)
            shape, dtype = layout[key]
            assert tuple(tensor.shape) == shape
            assert str(tensor.dtype) == ("torch.int64" if dtype == "I64" else "torch.float16")
            if dtype == "I64":
                assert tensor.flatten().tolist() == list(range(77))
            else:
                assert tensor.isfinite().all()
                if tensor.numel() > 1000:
                    assert 0.9 < tensor.float().std().item() < 1.1
                assert not tensor.equal(g.get_tensor(key))
    big = UNET_PREFIX + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert _numel(layout[big][0]) > 1 << 22


def test_write_random_checkpoint_refuses_unknown_keys(tmp_path):
    with pytest.raises(KeyError):
        write_random_checkpoint("sd1", tmp_path / "x.safetensors", seed=0, keys=["nope"])
    assert not list(tmp_path.iterdir())


def test_element_table_json_is_plain_data():
    for arch in ARCHS:
        document = json.loads((ELEMENTS_ROOT / f"{arch}.json").read_text(encoding="utf-8"))
        assert all(names == sorted(names) for names in document["blocks"].values())
