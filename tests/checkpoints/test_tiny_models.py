"""The tiny sd1/sd2/sdxl checkpoints: real key names, real topology, and exact diffusers round trips.

Both directions are checked against diffusers' own single-file loader, offline:
diffusers modules -> worker.checkpoints.ldm_convert -> file -> ``from_single_file`` gives back every tensor
exactly, and file -> ``from_single_file`` -> worker.checkpoints.ldm_convert gives back every key of the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from worker.checkpoints import ldm_convert as lc
from worker.checkpoints.tiny_models import (
    TINY_ARCHS,
    TINY_CONFIG_ROOT,
    build_tiny_pipeline_components,
    tiny_checkpoint_state_dict,
    tiny_config_dir,
    tiny_tokenizer_vocab_and_merges,
    write_demo_models,
    write_tiny_checkpoint,
)

U = "model.diffusion_model."
SEED = 1
MB = 1024 * 1024


class Built:
    """One arch generated once: its diffusers components, LDM state dict and written files."""

    def __init__(self, arch: str, root: Path) -> None:
        self.arch = arch
        self.components = build_tiny_pipeline_components(arch, seed=SEED)
        self.sd = tiny_checkpoint_state_dict(arch, seed=SEED)
        self.fp32 = write_tiny_checkpoint(arch, root / f"tiny-{arch}-fp32.safetensors", seed=SEED)
        self.fp16 = write_tiny_checkpoint(
            arch, root / f"tiny-{arch}-fp16.safetensors", seed=SEED, dtype="fp16"
        )
        self._pipe = None

    @property
    def model_names(self) -> tuple[str, ...]:
        return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if self.arch == "sdxl" else ())

    def load(self, path: Path, **kwargs):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if self.arch == "sdxl" else StableDiffusionPipeline
        pipe = cls.from_single_file(
            str(path), config=str(tiny_config_dir(self.arch)), local_files_only=True, **kwargs
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = self.load(self.fp32)
        return self._pipe


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: Built(arch, root) for arch in TINY_ARCHS}


def _keys_matching(sd, pattern: str) -> set[str]:
    rx = re.compile(pattern)
    return {k for k in sd if rx.fullmatch(k)}


def _indices(sd, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in sd if (m := rx.match(k))}


# ------------------------------------------------------------------------------------ key names

COMMON_KEYS = [
    U + "time_embed.0.weight",
    U + "time_embed.2.bias",
    U + "input_blocks.0.0.weight",
    U + "middle_block.0.in_layers.0.weight",
    U + "middle_block.1.proj_in.weight",
    U + "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
    U + "middle_block.2.emb_layers.1.weight",
    U + "out.0.weight",
    U + "out.2.weight",
    U + "output_blocks.5.0.skip_connection.weight",
    "first_stage_model.encoder.conv_in.weight",
    "first_stage_model.encoder.down.0.block.1.conv2.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.encoder.mid.block_2.norm1.bias",
    "first_stage_model.decoder.up.3.block.0.conv1.weight",
    "first_stage_model.decoder.up.3.block.2.conv2.weight",
    "first_stage_model.decoder.up.1.upsample.conv.weight",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "first_stage_model.decoder.norm_out.weight",
    "first_stage_model.quant_conv.weight",
    "first_stage_model.post_quant_conv.bias",
]
ARCH_KEYS = {
    "sd1": [
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        U + "input_blocks.3.0.op.weight",
        U + "output_blocks.2.1.conv.weight",
        U + "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        U + "output_blocks.11.0.skip_connection.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc2.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ],
    "sd2": [
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        U + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        U + "output_blocks.8.2.conv.weight",
        "cond_stage_model.model.token_embedding.weight",
        "cond_stage_model.model.positional_embedding",
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias",
        "cond_stage_model.model.transformer.resblocks.1.attn.out_proj.weight",
        "cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
        "cond_stage_model.model.transformer.resblocks.0.ln_2.bias",
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias",
        "cond_stage_model.model.ln_final.weight",
        "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale",
    ],
    "sdxl": [
        U + "label_emb.0.0.weight",
        U + "label_emb.0.2.bias",
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        U + "input_blocks.7.1.transformer_blocks.1.attn2.to_v.weight",
        U + "output_blocks.2.2.conv.weight",
        U + "output_blocks.5.2.conv.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight",
        "conditioner.embedders.1.model.ln_final.bias",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.logit_scale",
    ],
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_real_key_names_present(built, arch):
    sd = built[arch].sd
    missing = [k for k in COMMON_KEYS + ARCH_KEYS[arch] if k not in sd]
    assert not missing
    prefixes = {
        "sd1": ("cond_stage_model.transformer.text_model.",),
        "sd2": ("cond_stage_model.model.",),
        "sdxl": ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."),
    }[arch]
    allowed = (U, "first_stage_model.", *prefixes)
    assert all(k.startswith(allowed) for k in sd), "a key outside the U-Net, VAE and text encoder layouts"
    # VAE attention is made of 1x1 convs in LDM; OpenCLIP q,k,v are stacked.
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    for key, value in sd.items():
        assert value.is_contiguous(), key
        if not key.endswith("position_ids"):
            assert value.dtype == torch.float32, key
    if arch != "sd2":
        pos = next(v for k, v in sd.items() if k.endswith("embeddings.position_ids"))
        assert pos.dtype == torch.int64 and pos.tolist() == [list(range(77))]
    if arch != "sd1":
        prefix = "cond_stage_model.model." if arch == "sd2" else "conditioner.embedders.1.model."
        width = sd[prefix + "positional_embedding"].shape[1]
        assert sd[prefix + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
        assert sd[prefix + "text_projection"].shape == (width, width)
        assert sd[prefix + "logit_scale"].shape == ()


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_sd1_sd2_topology(built, arch):
    sd = built[arch].sd
    assert _indices(sd, re.escape(U) + r"input_blocks\.(\d+)\.") == set(range(12))
    assert _indices(sd, re.escape(U) + r"output_blocks\.(\d+)\.") == set(range(12))
    assert _indices(sd, re.escape(U) + r"middle_block\.(\d+)\.") == {0, 1, 2}
    with_attention = _indices(sd, re.escape(U) + r"input_blocks\.(\d+)\.1\.transformer_blocks\.")
    assert with_attention == {1, 2, 4, 5, 7, 8}
    assert _indices(sd, re.escape(U) + r"input_blocks\.(\d+)\.0\.op\.weight") == {3, 6, 9}
    assert _indices(sd, re.escape(U) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.") == set(range(3, 12))
    assert _indices(sd, re.escape(U) + r"output_blocks\.(\d+)\.\d\.conv\.weight") == {2, 5, 8}
    assert U + "output_blocks.2.1.conv.weight" in sd and U + "output_blocks.5.2.conv.weight" in sd
    assert not any("label_emb" in k for k in sd)
    # One transformer block per attention, like real sd1/sd2.
    assert _indices(sd, r".*\.transformer_blocks\.(\d+)\.") == {0}
    proj_in = sd[U + "input_blocks.1.1.proj_in.weight"]
    if arch == "sd1":
        assert proj_in.ndim == 4 and proj_in.shape[2:] == (1, 1)  # 1x1 conv
        context = sd["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"].shape[1]
    else:
        assert proj_in.ndim == 2  # linear
        context = sd["cond_stage_model.model.positional_embedding"].shape[1]
    for key in _keys_matching(sd, re.escape(U) + r".*attn2\.to_[kv]\.weight"):
        assert sd[key].shape[1] == context, key
    assert sd[U + "input_blocks.0.0.weight"].shape[:2] == (32, 4)
    assert sd[U + "out.2.weight"].shape[:2] == (4, 32)


def test_sdxl_topology(built):
    sd = built["sdxl"].sd
    assert _indices(sd, re.escape(U) + r"input_blocks\.(\d+)\.") == set(range(9))
    assert _indices(sd, re.escape(U) + r"output_blocks\.(\d+)\.") == set(range(9))
    assert _indices(sd, re.escape(U) + r"input_blocks\.(\d+)\.1\.transformer_blocks\.") == {4, 5, 7, 8}
    assert _indices(sd, re.escape(U) + r"input_blocks\.(\d+)\.0\.op\.weight") == {3, 6}
    assert _indices(sd, re.escape(U) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.") == set(range(6))
    assert _indices(sd, re.escape(U) + r"output_blocks\.(\d+)\.2\.conv\.weight") == {2, 5}
    # transformer depth 1 in the middle level, 2 in the deepest (real sdxl: 2 and 10)
    assert _indices(sd, re.escape(U) + r"input_blocks\.4\.1\.transformer_blocks\.(\d+)\.") == {0}
    assert _indices(sd, re.escape(U) + r"input_blocks\.7\.1\.transformer_blocks\.(\d+)\.") == {0, 1}
    assert _indices(sd, re.escape(U) + r"middle_block\.1\.transformer_blocks\.(\d+)\.") == {0, 1}
    assert sd[U + "input_blocks.4.1.proj_in.weight"].ndim == 2
    clip_l = sd["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"].shape[1]
    big_g = sd["conditioner.embedders.1.model.positional_embedding"].shape[1]
    assert clip_l != big_g  # diffusers tells the two text encoders apart by width
    for key in _keys_matching(sd, re.escape(U) + r".*attn2\.to_[kv]\.weight"):
        assert sd[key].shape[1] == clip_l + big_g, key
    # label_emb: 6 micro-conditioning sinusoids plus the pooled bigG projection
    time_embed_dim = sd[U + "time_embed.0.weight"].shape[0]
    assert sd[U + "label_emb.0.0.weight"].shape == (time_embed_dim, 6 * 8 + big_g)


def _full_size_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The LDM keys of the full-size model (built on the meta device: shapes, no data)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clip(width, layers, heads, act, cls=CLIPTextModel):
        return cls(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=width,
                intermediate_size=4 * width,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                hidden_act=act,
                projection_dim=width,
            )
        )

    sd: dict[str, torch.Tensor] = {}
    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
        )
        sd.update(lc.vae_to_ldm(vae.state_dict()))
        if arch in ("sd1", "sd2"):
            unet = UNet2DConditionModel(
                block_out_channels=(320, 640, 1280, 1280),
                cross_attention_dim=768 if arch == "sd1" else 1024,
                attention_head_dim=8 if arch == "sd1" else [5, 10, 20, 20],
                use_linear_projection=arch == "sd2",
            )
        else:
            unet = UNet2DConditionModel(
                block_out_channels=(320, 640, 1280),
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                transformer_layers_per_block=[1, 2, 10],
                attention_head_dim=[5, 10, 20],
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
        sd.update(lc.unet_to_ldm(unet.state_dict()))
        if arch == "sd1":
            sd.update(lc.clip_l_to_ldm(clip(768, 12, 12, "quick_gelu").state_dict(), lc.SD1_CLIP_PREFIX))
        elif arch == "sd2":
            te = clip(1024, 24, 16, "gelu").state_dict()
            sd.update(lc.open_clip_to_ldm(te, text_projection=torch.empty(1024, 1024), logit_scale=4.6))
        else:
            sd.update(lc.clip_l_to_ldm(clip(768, 12, 12, "quick_gelu").state_dict(), lc.SDXL_CLIP_L_PREFIX))
            big_g = clip(1280, 32, 20, "gelu", CLIPTextModelWithProjection).state_dict()
            sd.update(lc.open_clip_to_ldm(big_g, lc.SDXL_OPENCLIP_PREFIX, logit_scale=4.6))
    return sd


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_same_key_names_as_the_full_size_model(built, arch):
    """Every tiny key exists in the full-size model; what only the full-size one has is depth and
    the 1x1 shortcuts that appear where the (much wider) real model changes channel count."""
    tiny, full = built[arch].sd, _full_size_state_dict(arch)
    # The well-known key counts of the released files: U-Net 686 (sd1/sd2) or 1680 (sdxl), VAE 248.
    assert len([k for k in full if k.startswith(U)]) == (1680 if arch == "sdxl" else 686)
    assert len([k for k in full if k.startswith("first_stage_model.")]) == 248
    assert set(tiny) <= set(full)
    deeper = re.compile(
        r".*\.(skip_connection|nin_shortcut)\.(weight|bias)"
        r"|.*\.transformer_blocks\.[1-9]\d*\..*"
        r"|.*\.(encoder\.layers|resblocks)\.([2-9]|\d\d+)\..*"
    )
    unexplained = sorted(k for k in set(full) - set(tiny) if not deeper.fullmatch(k))
    assert not unexplained
    # Same blocks, same modules in each block.
    module = re.compile(re.escape(U) + r"(input_blocks|output_blocks|middle_block)\.\d+(\.\d+)?")
    assert {m.group(0) for k in tiny if (m := module.match(k))} == {
        m.group(0) for k in full if (m := module.match(k))
    }
    for key in tiny:
        assert tiny[key].ndim == full[key].ndim, key


# ----------------------------------------------------------------------------------- files


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_written_files(built, arch):
    b = built[arch]
    assert b.fp16.stat().st_size < 10 * MB
    with safe_open(b.fp16, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(b.sd)
        for key in f.keys():
            t = f.get_tensor(key)
            expected = torch.int64 if key.endswith("position_ids") else torch.float16
            assert t.dtype == expected, key
            assert torch.equal(t, b.sd[key].to(t.dtype)), key


def test_bf16_and_format_choice(tmp_path):
    path = write_tiny_checkpoint("sd1", tmp_path / "x.weights", seed=3, dtype="bf16")
    assert path == tmp_path / "x.weights"
    with safe_open(path, framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16", "I64"}
    assert write_tiny_checkpoint("sd1", tmp_path / "y.bin", seed=3, fmt="ckpt").read_bytes()[:2] == b"PK"
    with pytest.raises(ValueError, match="dtype"):
        write_tiny_checkpoint("sd1", tmp_path / "z.safetensors", dtype="fp8")
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        write_tiny_checkpoint("sd3", tmp_path / "z.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.weights", "y.bin"], (
        "no partial files left behind"
    )


def test_deterministic_per_seed(built, tmp_path):
    again = write_tiny_checkpoint("sd1", tmp_path / "again.safetensors", seed=SEED, dtype="fp16")
    assert again.read_bytes() == built["sd1"].fp16.read_bytes()
    for arch in TINY_ARCHS:
        same = tiny_checkpoint_state_dict(arch, seed=SEED)
        other = tiny_checkpoint_state_dict(arch, seed=SEED + 1)
        first = built[arch].sd
        assert all(torch.equal(same[k], first[k]) for k in first)
        floats = [k for k in first if first[k].is_floating_point()]
        assert len(floats) == len(first) - (arch != "sd2")
        unchanged = [k for k in floats if torch.equal(other[k], first[k])]
        assert not unchanged, "different seeds must differ in every float tensor"
        norm = re.compile(
            r".*\.(norm\w*|layer_norm\d|final_layer_norm|ln_\w+|in_layers\.0|out_layers\.0|out\.0)\.weight"
        )
        norms = [k for k in floats if norm.fullmatch(k)]
        assert norms and all(0.5 < first[k].mean() < 1.5 for k in norms), "norm weights stay near 1"
    # different archs with the same seed are different models, not reshaped copies
    a, b = built["sd1"].sd, built["sd2"].sd
    key = U + "out.2.weight"
    assert not torch.equal(a[key], b[key])


def test_ckpt_loads_with_weights_only(built, tmp_path):
    path = write_tiny_checkpoint("sd1", tmp_path / "tiny-sd1.ckpt", seed=SEED)
    obj = torch.load(path, weights_only=True, map_location="cpu")
    assert set(obj) == {"state_dict"}
    sd = obj["state_dict"]
    assert set(sd) == set(built["sd1"].sd)
    assert all(torch.equal(sd[k], v) for k, v in built["sd1"].sd.items())
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    # diffusers reads the nested .ckpt too
    pipe = built["sd1"].load(path)
    assert torch.equal(pipe.unet.conv_in.weight, built["sd1"].components["unet"].conv_in.weight)


def test_write_demo_models(tmp_path):
    paths = write_demo_models(tmp_path / "demo")
    names = [p.name for p in paths]
    assert names == [
        "tiny-sd1-a.safetensors",
        "tiny-sd1-b.safetensors",
        "tiny-sd1-c.safetensors",
        "tiny-sd2-a.safetensors",
        "tiny-sd2-b.safetensors",
        "tiny-sdxl-a.safetensors",
        "tiny-sdxl-b.safetensors",
    ]
    assert all(p.parent == tmp_path / "demo" and p.stat().st_size < 10 * MB for p in paths)
    assert len({p.read_bytes() for p in paths}) == len(paths)
    reference = tmp_path / "demo" / "reference"
    reference.write_bytes(b"")
    assert {p.stat().st_mode & 0o777 for p in paths} == {reference.stat().st_mode & 0o777}, (
        "umask-based permissions"
    )
    with safe_open(paths[0], framework="pt") as f:
        assert f.get_tensor(U + "out.2.weight").dtype == torch.float16


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_diffusers_to_single_file_to_diffusers_is_exact(built, arch):
    """Built modules -> our LDM conversion -> file -> diffusers' single-file loader: identical tensors."""
    b = built[arch]
    for name in b.model_names:
        original = b.components[name].state_dict()
        loaded = getattr(b.pipe, name).state_dict()
        assert loaded.keys() == original.keys(), name
        different = [k for k in original if not torch.equal(loaded[k], original[k])]
        assert not different, f"{name}: {different[:5]}"
        assert all(v.dtype == torch.float32 for v in loaded.values() if v.is_floating_point())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fp16_file_loads_as_rounded_weights(built, arch):
    b = built[arch]
    pipe = b.load(b.fp16)
    for name in b.model_names:
        original = b.components[name].state_dict()
        loaded = getattr(pipe, name).state_dict()
        for key, value in original.items():
            assert torch.equal(loaded[key].float(), value.half().float()), f"{name}.{key}"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_single_file_to_diffusers_to_single_file_is_exact(built, arch):
    """File -> diffusers' loader -> our LDM conversion reproduces every key of the file, except
    the ones diffusers has no place for (sd2's text_projection, OpenCLIP's logit_scale)."""
    b = built[arch]
    pipe = b.pipe
    back: dict[str, torch.Tensor] = {}
    back.update(lc.unet_to_ldm(pipe.unet.state_dict()))
    back.update(lc.vae_to_ldm(pipe.vae.state_dict()))
    if arch == "sd1":
        back.update(lc.clip_l_to_ldm(pipe.text_encoder.state_dict(), lc.SD1_CLIP_PREFIX))
        dropped = set()
    elif arch == "sd2":
        back.update(lc.open_clip_to_ldm(pipe.text_encoder.state_dict(), lc.SD2_OPENCLIP_PREFIX))
        dropped = {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
    else:
        back.update(lc.clip_l_to_ldm(pipe.text_encoder.state_dict(), lc.SDXL_CLIP_L_PREFIX))
        back.update(lc.open_clip_to_ldm(pipe.text_encoder_2.state_dict(), lc.SDXL_OPENCLIP_PREFIX))
        dropped = {"conditioner.embedders.1.model.logit_scale"}
    with safe_open(b.fp32, framework="pt") as f:
        file_keys = set(f.keys())
        assert set(back) == file_keys - dropped
        different = [k for k in back if not torch.equal(back[k], f.get_tensor(k))]
    assert not different, different[:5]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pipeline_generates_an_image_offline(built, arch):
    pipe = built[arch].pipe
    out = pipe(
        "a cute girl with a cat",
        negative_prompt="lowres",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shipped_config_dirs(arch):
    from transformers import CLIPTokenizer

    root = tiny_config_dir(arch)
    assert root == TINY_CONFIG_ROOT / arch and root.is_dir()
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    weights = [
        f for f in files if f.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5"))
    ]
    assert not weights
    tokenizers = ["tokenizer", "tokenizer_2"] if arch == "sdxl" else ["tokenizer"]
    encoders = ["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]
    expected = {"model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"}
    expected |= {f"{e}/config.json" for e in encoders}
    for t in tokenizers:
        expected |= {
            f"{t}/{n}"
            for n in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
        }
    assert files == expected

    vocab, merges = tiny_tokenizer_vocab_and_merges()
    assert len(vocab) < 1000 and list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    for t in tokenizers:
        assert json.loads((root / t / "vocab.json").read_text(encoding="utf-8")) == vocab
        lines = (root / t / "merges.txt").read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("#version") and [tuple(line.split(" ")) for line in lines[1:]] == merges
        tok = CLIPTokenizer.from_pretrained(root, subfolder=t, local_files_only=True)
        assert tok.model_max_length == 77
        ids = tok("a cute girl").input_ids
        assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"] and len(ids) == 5
        assert tok.convert_ids_to_tokens(tok("A cat").input_ids[1:-1]) == ["a</w>", "cat</w>"]
        assert len(tok("zebra!").input_ids) > 3  # unknown words fall back to bytes, never to <unk>
    for e in encoders:
        config = json.loads((root / e / "config.json").read_text())
        assert config["vocab_size"] == len(vocab) and config["max_position_embeddings"] == 77
        assert config["eos_token_id"] == vocab["<|endoftext|>"]
