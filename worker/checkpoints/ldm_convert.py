"""diffusers / transformers state dicts -> original LDM single-file ("A1111") key layout.

Real Stable Diffusion checkpoints as people share them (``*.safetensors`` / ``*.ckpt``) hold one
flat state dict in the layout of the original CompVis/Stability code:

* U-Net        ``model.diffusion_model.*``  (``input_blocks.N``, ``middle_block``, ``output_blocks.N``)
* VAE          ``first_stage_model.*``      (``encoder.down.N.block.M``, ``decoder.up.N``, ``mid.attn_1``)
* text encoder ``cond_stage_model.transformer.text_model.*``  (sd1: transformers CLIP-L)
               ``cond_stage_model.model.*``                   (sd2: OpenCLIP ViT-H)
               ``conditioner.embedders.0.transformer.text_model.*`` and
               ``conditioner.embedders.1.model.*``            (sdxl: CLIP-L + OpenCLIP bigG)

The functions here translate the state dicts of diffusers/transformers modules into that layout.
Every translation is explicit and strict: a key that has no known LDM name raises ``KeyError``
instead of being dropped. The opposite direction is diffusers' own single-file loader
(``diffusers.loaders.single_file_utils``); the tests check that both directions agree exactly.

The U-Net and VAE structure (number of levels, layers per level, which levels have attention)
is read from the key names, so the same code converts tiny test models and full-size ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from mergeprobe.checkpoints.archs import UNET_PREFIX, VAE_PREFIX

__all__ = [
    "SD1_CLIP_PREFIX",
    "SD2_OPENCLIP_PREFIX",
    "SDXL_CLIP_L_PREFIX",
    "SDXL_OPENCLIP_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "clip_l_to_ldm",
    "open_clip_to_ldm",
    "unet_to_ldm",
    "vae_to_ldm",
]

SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

# OpenCLIP's logit scale as trained (clamped at ln(100)); real OpenCLIP text towers carry it.
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)

StateDict = Mapping[str, torch.Tensor]


def _max_index(keys, pattern: str) -> int:
    """Largest integer captured by ``pattern`` (one group) over ``keys``; -1 when none matches."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(found, default=-1)


def _rename_by_prefix(key: str, prefixes: list[tuple[str, str]]) -> tuple[str, str, str] | None:
    """(old prefix, new prefix, rest) for the longest matching old prefix, or None."""
    best = None
    for old, new in prefixes:
        if key.startswith(old) and (best is None or len(old) > len(best[0])):
            best = (old, new)
    if best is None:
        return None
    return best[0], best[1], key[len(best[0]) :]


# --------------------------------------------------------------------------------------- U-Net

# ResnetBlock2D (diffusers) -> ResBlock (LDM)
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_UNET_FIXED = [
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    # SDXL's micro-conditioning ("text_time") embedding.
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
]


def _unet_prefix_tables(keys) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(resnet prefixes, other prefixes): diffusers module prefix -> LDM module prefix."""
    levels = _max_index(keys, r"down_blocks\.(\d+)\.") + 1
    layers = _max_index(keys, r"down_blocks\.0\.resnets\.(\d+)\.") + 1
    if levels < 1 or layers < 1:
        raise ValueError("not a diffusers UNet2DConditionModel state dict (no down_blocks.N.resnets.M)")
    mid_resnets = _max_index(keys, r"mid_block\.resnets\.(\d+)\.") + 1

    resnets: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = list(_UNET_FIXED)
    per_level = layers + 1  # LDM: `layers` ResBlocks (+ attention), then one downsampler
    for i in range(levels):
        for j in range(layers):
            n = per_level * i + j + 1
            resnets.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0."))
            others.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1."))
        if i < levels - 1:
            others.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per_level * (i + 1)}.0.op.")
            )
        up_has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
        for j in range(layers + 1):
            n = per_level * i + j
            resnets.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0."))
            others.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1."))
        if i < levels - 1:
            # The upsampler follows the last ResBlock (and its attention, when the level has one).
            slot = 2 if up_has_attention else 1
            others.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per_level * i + layers}.{slot}."))
    for j in range(mid_resnets):
        resnets.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    others.append(("mid_block.attentions.0.", "middle_block.1."))
    return resnets, others


def unet_to_ldm(state_dict: StateDict, prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the LDM layout (``model.diffusion_model.*``).

    Transformer (attention) blocks keep their inner names (``proj_in``, ``transformer_blocks.K.attn1.to_q``,
    ``ff.net.0.proj`` ...): the LDM SpatialTransformer uses the same ones. ResBlocks are renamed
    (``norm1`` -> ``in_layers.0``, ``conv_shortcut`` -> ``skip_connection`` ...).
    """
    keys = list(state_dict)
    resnets, others = _unet_prefix_tables(keys)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        hit = _rename_by_prefix(key, resnets)
        if hit is not None:
            _, new, rest = hit
            part, _, param = rest.partition(".")
            if part not in _UNET_RESNET_PARTS:
                raise KeyError(f"U-Net key {key!r}: unknown ResBlock part {part!r}")
            out[prefix + new + _UNET_RESNET_PARTS[part] + "." + param] = state_dict[key]
            continue
        hit = _rename_by_prefix(key, others)
        if hit is None:
            raise KeyError(f"U-Net key {key!r} has no LDM name")
        _, new, rest = hit
        out[prefix + new + rest] = state_dict[key]
    return out


# ----------------------------------------------------------------------------------------- VAE

_VAE_FIXED = {
    "encoder.conv_in.": "encoder.conv_in.",
    "encoder.conv_out.": "encoder.conv_out.",
    "encoder.conv_norm_out.": "encoder.norm_out.",
    "decoder.conv_in.": "decoder.conv_in.",
    "decoder.conv_out.": "decoder.conv_out.",
    "decoder.conv_norm_out.": "decoder.norm_out.",
    "quant_conv.": "quant_conv.",
    "post_quant_conv.": "post_quant_conv.",
}
_VAE_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# diffusers Attention (current names and the pre-0.14 ones) -> LDM AttnBlock (1x1 convs).
_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def vae_to_ldm(state_dict: StateDict, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout (``first_stage_model.*``).

    The decoder's up blocks are numbered the other way round in LDM (``decoder.up.0`` is the
    full-resolution level), and the mid-block attention projections are 1x1 convolutions there:
    ``[C, C]`` linear weights become ``[C, C, 1, 1]``.
    """
    keys = list(state_dict)
    resnets: list[tuple[str, str]] = []
    attentions: list[tuple[str, str]] = []
    fixed: list[tuple[str, str]] = list(_VAE_FIXED.items())

    def add_resnets(diffusers: str, ldm: str, base: int = 0) -> None:
        for j in range(_max_index(keys, re.escape(diffusers) + r"(\d+)\.") + 1):
            resnets.append((f"{diffusers}{j}.", f"{ldm}{j + base}."))

    for i in range(_max_index(keys, r"encoder\.down_blocks\.(\d+)\.") + 1):
        add_resnets(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
        fixed.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
    levels = _max_index(keys, r"decoder\.up_blocks\.(\d+)\.") + 1
    for i in range(levels):
        ldm = levels - 1 - i
        add_resnets(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{ldm}.block.")
        fixed.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{ldm}.upsample.conv."))
    for part in ("encoder", "decoder"):
        add_resnets(f"{part}.mid_block.resnets.", f"{part}.mid.block_", base=1)
        attentions.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))

    out: dict[str, torch.Tensor] = {}
    for key in keys:
        value = state_dict[key]
        hit = _rename_by_prefix(key, resnets)
        if hit is not None:
            _, new, rest = hit
            part, _, param = rest.partition(".")
            if part not in _VAE_RESNET_PARTS:
                raise KeyError(f"VAE key {key!r}: unknown ResnetBlock part {part!r}")
            out[f"{prefix}{new}{_VAE_RESNET_PARTS[part]}.{param}"] = value
            continue
        hit = _rename_by_prefix(key, attentions)
        if hit is not None:
            _, new, rest = hit
            part, _, param = rest.rpartition(".")
            if part not in _VAE_ATTENTION_PARTS:
                raise KeyError(f"VAE key {key!r}: unknown attention part {part!r}")
            if param == "weight" and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)  # linear -> 1x1 conv
            out[f"{prefix}{new}{_VAE_ATTENTION_PARTS[part]}.{param}"] = value
            continue
        hit = _rename_by_prefix(key, fixed)
        if hit is None:
            raise KeyError(f"VAE key {key!r} has no LDM name")
        _, new, rest = hit
        out[prefix + new + rest] = value
    return out


# -------------------------------------------------------------------------------- text encoders


def clip_l_to_ldm(
    state_dict: StateDict, prefix: str = SD1_CLIP_PREFIX, *, position_ids: bool = True
) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict in the LDM layout: ``<prefix>text_model.*``.

    LDM's FrozenCLIPEmbedder wraps a transformers CLIPTextModel, so the names below ``text_model.``
    are the transformers ones. transformers >= 5.6 no longer nests them under ``text_model.``
    itself; both forms are accepted. ``position_ids`` adds the int64 ``embeddings.position_ids``
    buffer ([1, max_positions]) that real SD1/SDXL files carry (transformers stopped saving it).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("text_projection."):
            raise KeyError(f"{key!r}: the LDM CLIP-L text encoder has no projection (use CLIPTextModel)")
        inner = key if key.startswith("text_model.") else "text_model." + key
        if inner == "text_model.embeddings.position_ids":
            continue  # re-added below, in its canonical form
        out[prefix + inner] = value
    if position_ids:
        weight = out.get(prefix + "text_model.embeddings.position_embedding.weight")
        if weight is None:
            raise KeyError("CLIP state dict without embeddings.position_embedding.weight")
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(weight.shape[0], dtype=torch.int64)[
            None
        ]
    return out


_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def open_clip_to_ldm(
    state_dict: StateDict,
    prefix: str = SD2_OPENCLIP_PREFIX,
    *,
    text_projection: torch.Tensor | None = None,
    logit_scale: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` state dict in the OpenCLIP layout.

    ``<prefix>transformer.resblocks.N.attn.in_proj_weight`` is q, k and v concatenated (rows);
    ``attn.out_proj``, ``ln_1``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj`` per block;
    ``token_embedding.weight``, ``positional_embedding``, ``ln_final``; ``text_projection`` is
    ``[width, embed_dim]``, the transpose of transformers' ``text_projection.weight``.

    ``text_projection`` supplies that tensor (already in the OpenCLIP orientation) for a model
    without one (sd2's text encoder is a CLIPTextModel, yet real sd2 files carry the projection);
    ``logit_scale`` adds the scalar ``logit_scale`` that real OpenCLIP text towers carry.
    """
    inner = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in inner.items():
        if key in _OPEN_CLIP_FIXED:
            out[prefix + _OPEN_CLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.t().contiguous()
        elif key == "embeddings.position_ids":
            continue  # OpenCLIP has no such buffer
        elif m := _LAYER_KEY.match(key):
            layer, part, param = int(m.group(1)), m.group(2), m.group(3)
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[part[len("self_attn.") :][0]] = value
            elif part in _OPEN_CLIP_LAYER_PARTS:
                out[f"{prefix}transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_PARTS[part]}.{param}"] = value
            else:
                raise KeyError(f"text encoder key {key!r} has no OpenCLIP name")
        else:
            raise KeyError(f"text encoder key {key!r} has no OpenCLIP name")
    for (layer, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {layer}: q/k/v {param} incomplete ({sorted(parts)})")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], 0
        )
    if text_projection is not None:
        if prefix + "text_projection" in out:
            raise ValueError(
                "text_projection given twice (the state dict already has text_projection.weight)"
            )
        out[prefix + "text_projection"] = text_projection
    if logit_scale is not None:
        out[prefix + "logit_scale"] = torch.as_tensor(logit_scale, dtype=torch.float32).reshape(())
    return out
