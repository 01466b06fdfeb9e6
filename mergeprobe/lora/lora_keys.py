"""Which checkpoint key a LoRA file's module name modifies.

LoRA files name the modules they patch in their trainer's conventions, never in the checkpoint's:

* kohya sd-scripts (and LyCORIS, A1111/Forge, ComfyUI, OneTrainer, which read the same files):
  ``lora_unet_<module path with "." replaced by "_">``, the path being the *diffusers* one for
  sd1/sd2 (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``) and the *LDM*
  one for sdxl (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``: sd-scripts trains
  SDXL on its own LDM-named U-Net); text encoders ``lora_te_`` (sd1/sd2), ``lora_te1_`` / ``lora_te2_``
  (sdxl) followed by the *transformers* CLIPTextModel path (``text_model_encoder_layers_0_self_attn_q_proj``),
  also for sd2's and sdxl's OpenCLIP towers, whose q/k/v are row slices of the fused ``attn.in_proj_weight``;
* diffusers / PEFT: ``unet.<dotted diffusers path>`` (``.lora_A.weight`` / ``.lora_B.weight``),
  ``text_encoder.<transformers path>``, ``text_encoder_2.…``, sometimes with ``base_model.model.`` in front
  or without the component prefix; the older attention-processor form
  ``unet.….attn1.processor.to_q_lora.down.weight`` / ``….processor.to_out_lora.up.weight``;
* the checkpoint's own key without ``.weight`` (ComfyUI's "generic" format,
  ``diffusion_model.input_blocks.1.1.proj_in``).

``LoraKeyTable.for_checkpoint(arch, keys)`` builds, from the LDM keys of one checkpoint (a header is
enough), the table normalised module name → ``LoraTarget`` (the LDM weight key, the rows of a fused
q/k/v it is, the component and the block), and ``LoraKeyTable.match(name)`` normalises any LoRA file
key (``lora_unet_….lora_down.weight``, ``unet.….lora_A.weight``, ``….alpha`` …) and looks it up.

The U-Net diffusers ↔ LDM correspondence is the inverse of ``worker/checkpoints/ldm_convert.py``'s
(``_UNET_RESNET_PARTS``, ``_UNET_FIXED``, ``_unet_prefix_tables``; its tests check it against
diffusers' own single-file loader), read here from the LDM key structure (the first downsampler's
index gives the blocks per level) instead of the diffusers one. The OpenCLIP names invert its
``_OPEN_CLIP_LAYER_PARTS`` / ``_OPEN_CLIP_FIXED``; the component prefixes are its ``SD1_CLIP_PREFIX`` …
No torch: this runs in the HTTP front end on checkpoint headers.

The name rules follow kohya sd-scripts ``networks/lora.py`` (``LORA_PREFIX_UNET = "lora_unet"``,
``LORA_PREFIX_TEXT_ENCODER = "lora_te"``, ``…1 = "lora_te1"``, ``…2 = "lora_te2"``,
``lora_name = (prefix + "." + name + "." + child_name).replace(".", "_")``) and ComfyUI ``comfy/lora.py``
(``model_lora_keys_unet``: ``lora_unet_`` + LDM path and + diffusers path, ``unet.`` + diffusers path with
``.to_`` → ``.processor.to_`` and ``to_out.0`` → ``to_out``; ``model_lora_keys_clip``: ``lora_te_`` and
``lora_te1_`` both name the first text encoder, ``text_encoder.text_model.…`` / ``text_encoder_2.…``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from mergeprobe.checkpoints.archs import BASE, UNKNOWN, get_arch

__all__ = [
    "TEXT_ENCODERS",
    "Component",
    "LoraKeyTable",
    "LoraTarget",
    "TextEncoderSpec",
    "normalise_module_name",
    "unet_ldm_to_diffusers",
]

Component = Literal["unet", "te", "te1", "te2"]


@dataclass(frozen=True)
class LoraTarget:
    """The checkpoint tensor a LoRA module modifies."""

    key: str  # the LDM weight key
    rows: tuple[int, int] | None  # [start, stop) rows of a fused q/k/v in_proj_weight; None: the whole tensor
    component: str  # "unet", "te" (sd1/sd2), "te1" / "te2" (sdxl)
    block: str  # BASE for text encoders, INnn / M00 / OUTnn for the U-Net (archs.block_of_key)


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str
    prefix: str  # LDM key prefix (worker/checkpoints/ldm_convert.py *_PREFIX)
    kind: Literal["clip", "open_clip"]
    config: str  # folder of its transformers config under mergeprobe/configs/full/<arch>/ (default width)


# ldm_convert.SD1_CLIP_PREFIX, SD2_OPENCLIP_PREFIX, SDXL_CLIP_L_PREFIX, SDXL_OPENCLIP_PREFIX.
TEXT_ENCODERS: dict[str, tuple[TextEncoderSpec, ...]] = {
    "sd1": (TextEncoderSpec("te", "cond_stage_model.transformer.", "clip", "text_encoder"),),
    "sd2": (TextEncoderSpec("te", "cond_stage_model.model.", "open_clip", "text_encoder"),),
    "sdxl": (
        TextEncoderSpec("te1", "conditioner.embedders.0.transformer.", "clip", "text_encoder"),
        TextEncoderSpec("te2", "conditioner.embedders.1.model.", "open_clip", "text_encoder_2"),
    ),
}

# ----------------------------------------------------------------------------- U-Net names

# Inverse of ldm_convert._UNET_RESNET_PARTS (diffusers ResnetBlock2D part -> LDM ResBlock part).
_RESNET_PARTS_LDM_TO_DIFFUSERS = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)
# Inverse of ldm_convert._UNET_FIXED.
_UNET_FIXED_LDM_TO_DIFFUSERS = (
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
)
_UNET_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE_BLOCK = re.compile(r"middle_block\.(\d+)\.(.+)$")
_DOWNSAMPLER = re.compile(r"input_blocks\.(\d+)\.0\.op\.")
_INPUT_BLOCK = re.compile(r"input_blocks\.(\d+)\.")


def _resnet(prefix: str, rest: str) -> str | None:
    for ldm, diffusers in _RESNET_PARTS_LDM_TO_DIFFUSERS:
        if rest.startswith(ldm + "."):
            return prefix + diffusers + rest[len(ldm) :]
    return None


def unet_blocks_per_level(unet_keys: Iterable[str]) -> int:
    """LDM input blocks per U-Net level (ResBlocks + the downsampler): the first downsampler's index.

    ``unet_keys`` are relative to the U-Net prefix. ldm_convert numbers ``input_blocks`` as
    ``per_level * level + layer + 1`` with the downsampler of level i at ``per_level * (i + 1)``."""
    keys = list(unet_keys)
    ops = [int(m.group(1)) for k in keys if (m := _DOWNSAMPLER.match(k))]
    if ops:
        return min(ops)
    inputs = [int(m.group(1)) for k in keys if (m := _INPUT_BLOCK.match(k))]
    return max(inputs, default=0) + 1  # a single level: no downsampler


def unet_ldm_to_diffusers(rest: str, per_level: int) -> str | None:
    """The diffusers ``UNet2DConditionModel`` parameter name of an LDM U-Net key given without the
    ``model.diffusion_model.`` prefix (``input_blocks.1.0.in_layers.2.weight`` ->
    ``down_blocks.0.resnets.0.conv1.weight``), or None when it has none: ldm_convert.unet_to_ldm backwards."""
    for ldm, diffusers in _UNET_FIXED_LDM_TO_DIFFUSERS:
        if rest.startswith(ldm):
            return diffusers + rest[len(ldm) :]
    if m := _UNET_BLOCK.match(rest):
        kind, n, slot, inner = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "input_blocks":
            if n == 0:
                return None
            level, layer = divmod(n - 1, per_level)
            if layer == per_level - 1:  # the level's downsampler
                if slot == 0 and inner.startswith("op."):
                    return f"down_blocks.{level}.downsamplers.0.conv." + inner[len("op.") :]
                return None
            if slot == 0:
                return _resnet(f"down_blocks.{level}.resnets.{layer}.", inner)
            return f"down_blocks.{level}.attentions.{layer}.{inner}" if slot == 1 else None
        level, layer = divmod(n, per_level)
        if slot == 0:
            return _resnet(f"up_blocks.{level}.resnets.{layer}.", inner)
        # A level's last output block ends with the upsampler: slot 2 after an attention, else slot 1.
        # The LDM Upsample's only child is `conv`; a SpatialTransformer has none of that name.
        if slot in (1, 2) and inner.startswith("conv.") and layer == per_level - 1:
            return f"up_blocks.{level}.upsamplers.0.{inner}"
        return f"up_blocks.{level}.attentions.{layer}.{inner}" if slot == 1 else None
    if m := _MIDDLE_BLOCK.match(rest):
        n, inner = int(m.group(1)), m.group(2)
        if n % 2 == 0:
            return _resnet(f"mid_block.resnets.{n // 2}.", inner)
        return f"mid_block.attentions.0.{inner}" if n == 1 else None
    return None


# ---------------------------------------------------------------------- text encoder names

# Inverse of ldm_convert._OPEN_CLIP_LAYER_PARTS (transformers CLIPEncoderLayer part -> OpenCLIP part).
_OPEN_CLIP_LAYER_PARTS = (
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)
# Inverse of the weight entries of ldm_convert._OPEN_CLIP_FIXED (positional_embedding has no module;
# text_projection is stored transposed, so a LoRA delta for it would need a transpose: not mapped).
_OPEN_CLIP_FIXED = (
    ("token_embedding", "embeddings.token_embedding"),
    ("ln_final", "final_layer_norm"),
)
_OPEN_CLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.weight$")
_OPEN_CLIP_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")


def _default_width(arch: str, spec: TextEncoderSpec) -> int | None:
    path = resources.files("mergeprobe").joinpath("configs", "full", arch, spec.config, "config.json")
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["hidden_size"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _shape_of(value: Any) -> tuple[int, ...] | None:
    """A shape from a header value: a tensor / TensorInfo (``.shape``), a shape tuple, or
    ``(shape, dtype)`` as ``worker.checkpoints.full_layouts.full_state_dict_layout`` gives."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return tuple(int(d) for d in shape)
    if isinstance(value, tuple | list):
        if len(value) == 2 and isinstance(value[0], tuple | list):
            return tuple(int(d) for d in value[0])
        if all(isinstance(d, int) for d in value):
            return tuple(value)
    return None


# ------------------------------------------------------------------------------ LoRA names

# Parameter suffixes of LoRA file keys: PEFT (lora_A/lora_B, DoRA magnitude), kohya (lora_down/up/mid,
# alpha, dora_scale), old diffusers attention processors (to_q_lora.down.weight, lora_linear_layer),
# LyCORIS (LoHa hada_*, LoKr lokr_*, full diff, norms), and a bare .weight / .bias (generic format).
_PARAM_SUFFIX = re.compile(
    r"\.(?:lora_[AB](?:\.default)?\.weight|lora_(?:down|up|mid)\.weight|lora_magnitude_vector(?:\.default)?"
    r"|lora(?:_linear_layer)?\.(?:down|up)\.weight|(?:down|up)\.weight|alpha|dora_scale"
    r"|hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t[12])|diff(?:_b)?|[wb]_norm|weight|bias)$"
)
_UNDERSCORED_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lycoris_", "unet"),  # SimpleTuner's LyCORIS export (ComfyUI model_lora_keys_unet)
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te1"),
)
_DOTTED_PREFIXES = (
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
)
_OLD_ATTN_PROCESSOR = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)(?:_lora)?(?:\.0)?$")
_TE_ATTN_ALIASES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def normalise_module_name(name: str) -> tuple[str | None, str]:
    """(component hint, normalised module name) of a LoRA file key or module name.

    The hint is "unet", "te1" (the first text encoder: ``lora_te_``, ``lora_te1_``, ``text_encoder.``),
    "te2" or None (no component prefix). The name is the module path with "." replaced by "_", without
    the parameter suffix; text encoder names lose a leading ``text_model_`` / ``model_``."""
    name = _PARAM_SUFFIX.sub("", name.strip())
    name = name.removeprefix("base_model.model.")
    hint: str | None = None
    dotted = True
    for prefix, component in _UNDERSCORED_PREFIXES:
        if name.startswith(prefix):
            hint, name, dotted = component, name[len(prefix) :], False
            break
    else:
        for prefix, component in _DOTTED_PREFIXES:
            if name.startswith(prefix):
                hint, name = component, name[len(prefix) :]
                break
    if dotted and (m := _OLD_ATTN_PROCESSOR.search(name)):
        proj = m.group(1)
        if ".self_attn" in name or name.startswith("text_model."):  # transformers CLIP attention
            name = name[: m.start()] + "." + _TE_ATTN_ALIASES[proj]
        else:
            name = name[: m.start()] + "." + proj + (".0" if proj == "to_out" else "")
    flat = name.replace(".", "_")
    if hint != "unet":
        for lead in ("text_model_", "model_"):
            flat = flat.removeprefix(lead)
    return hint, flat


class LoraKeyTable:
    """Normalised LoRA module names of one checkpoint → the tensors they modify."""

    def __init__(
        self,
        arch: str,
        entries: Mapping[str, Mapping[str, LoraTarget]],
        by_key: Mapping[str, LoraTarget],
        ambiguous: Mapping[str, Iterable[str]] | None = None,
        per_level: int = 3,
    ):
        self.arch = arch
        self.per_level = per_level  # LDM input blocks per U-Net level (unet_blocks_per_level)
        # component → normalised name → target
        self.entries: dict[str, dict[str, LoraTarget]] = {c: dict(t) for c, t in entries.items()}
        self.by_key: dict[str, LoraTarget] = dict(by_key)  # LDM weight key → target (rows None)
        # component → names two different keys claimed (left out of `entries`: match gives None)
        self.ambiguous: dict[str, frozenset[str]] = {c: frozenset(n) for c, n in (ambiguous or {}).items()}

    @classmethod
    def for_checkpoint(cls, arch: str, keys: Iterable[str] | Mapping[str, Any]) -> LoraKeyTable:
        """The table of a checkpoint of architecture ``arch`` ("sd1", "sd2", "sdxl") with ``keys``.

        ``keys`` may map keys to shapes (tensors, ``TensorInfo``, shape tuples, ``(shape, dtype)``):
        the OpenCLIP width that splits ``in_proj_weight`` into q/k/v rows is read from its shape, and
        only without one taken from the full-size model's config (``configs/full/<arch>/``)."""
        architecture = get_arch(arch)
        shapes = keys if isinstance(keys, Mapping) else None
        key_list = [k for k in keys if isinstance(k, str)]
        entries: dict[str, dict[str, LoraTarget]] = {}
        ambiguous: dict[str, set[str]] = {}
        by_key: dict[str, LoraTarget] = {}

        def block_of(key: str) -> str:
            try:
                return architecture.split_key(key)[0]
            except ValueError:
                return UNKNOWN

        def add(component: str, name: str, target: LoraTarget) -> None:
            table = entries.setdefault(component, {})
            seen = table.get(name)
            if seen is not None and seen != target:
                ambiguous.setdefault(component, set()).add(name)
            table[name] = target

        prefix = architecture.unet_prefix
        unet_rest = [k[len(prefix) :] for k in key_list if k.startswith(prefix)]
        per_level = unet_blocks_per_level(unet_rest)
        for rest in unet_rest:
            if not rest.endswith(".weight"):
                continue
            key = prefix + rest
            target = LoraTarget(key, None, "unet", block_of(key))
            by_key[key] = target
            add("unet", rest[: -len(".weight")].replace(".", "_"), target)  # LDM path (kohya sdxl, ComfyUI)
            diffusers = unet_ldm_to_diffusers(rest, per_level)
            if diffusers is not None:
                add("unet", diffusers[: -len(".weight")].replace(".", "_"), target)

        for spec in TEXT_ENCODERS[architecture.name]:
            te_keys = [k for k in key_list if k.startswith(spec.prefix)]
            if spec.kind == "clip":
                for key in te_keys:
                    rest = key[len(spec.prefix) :]
                    if not (rest.startswith("text_model.") and rest.endswith(".weight")):
                        continue
                    target = LoraTarget(key, None, spec.component, BASE)
                    by_key[key] = target
                    add(spec.component, rest[len("text_model.") : -len(".weight")].replace(".", "_"), target)
                continue
            default_width = None
            for key in te_keys:
                rest = key[len(spec.prefix) :]
                if m := _OPEN_CLIP_IN_PROJ.match(rest):
                    layer = m.group(1)
                    shape = _shape_of(shapes[key]) if shapes is not None else None
                    if shape is not None and len(shape) == 2:
                        width = shape[1]
                    else:
                        default_width = default_width or _default_width(arch, spec)
                        width = default_width
                    whole = LoraTarget(key, None, spec.component, BASE)
                    by_key[key] = whole
                    add(spec.component, f"transformer_resblocks_{layer}_attn_in_proj", whole)
                    if width is None:
                        continue
                    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                        rows = (i * width, (i + 1) * width)
                        add(
                            spec.component,
                            f"encoder_layers_{layer}_self_attn_{proj}",
                            LoraTarget(key, rows, spec.component, BASE),
                        )
                    continue
                target = LoraTarget(key, None, spec.component, BASE)
                if m := _OPEN_CLIP_LAYER.match(rest):
                    layer, part = m.group(1), m.group(2)
                    for open_clip, transformers in _OPEN_CLIP_LAYER_PARTS:
                        if part == open_clip:
                            by_key[key] = target
                            add(
                                spec.component,
                                f"encoder_layers_{layer}_{transformers}".replace(".", "_"),
                                target,
                            )
                            add(spec.component, rest[: -len(".weight")].replace(".", "_"), target)
                    continue
                for open_clip, transformers in _OPEN_CLIP_FIXED:
                    if rest == open_clip + ".weight":
                        by_key[key] = target
                        add(spec.component, transformers.replace(".", "_"), target)
                        add(spec.component, open_clip, target)

        for component, names in ambiguous.items():
            for name in names:
                del entries[component][name]
        return cls(architecture.name, entries, by_key, ambiguous, per_level)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def _component(self, hint: str) -> str | None:
        if hint == "unet":
            return "unet"
        specs = TEXT_ENCODERS[self.arch]
        index = 0 if hint == "te1" else 1
        return specs[index].component if index < len(specs) else None

    def match(self, module_name: str) -> LoraTarget | None:
        """The tensor a LoRA file key / module name modifies, or None when this checkpoint has none
        (or the name is ambiguous: a bare text encoder name in an sdxl table)."""
        bare = _PARAM_SUFFIX.sub("", module_name.strip())
        for candidate in (bare + ".weight", "model." + bare + ".weight"):
            if candidate in self.by_key:  # the checkpoint's own key (ComfyUI's generic format)
                return self.by_key[candidate]
        hint, name = normalise_module_name(module_name)
        if hint is not None:
            component = self._component(hint)
            return self.entries.get(component, {}).get(name) if component else None
        found = self.entries.get("unet", {}).get(name)
        if found is not None:
            return found
        te_name = name.removeprefix("text_model_").removeprefix("model_")
        hits = [t[te_name] for c, t in self.entries.items() if c != "unet" and te_name in t]
        return hits[0] if len(hits) == 1 else None

    def __len__(self) -> int:
        return sum(len(t) for t in self.entries.values())

    def kohya_name(self, target: LoraTarget) -> str:
        """The module name kohya sd-scripts gives the layer ``target`` is, the name LoRAs we write
        use: ``lora_unet_`` + the diffusers path (sd1/sd2) or the LDM path (sdxl, as sd-scripts'
        SDXL U-Net names it), ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + the transformers
        CLIPTextModel path (OpenCLIP's q/k/v are row ranges of ``in_proj_weight``)."""
        if target.component == "unet":
            rest = target.key[len(get_arch(self.arch).unet_prefix) :]
            path = rest if self.arch == "sdxl" else unet_ldm_to_diffusers(rest, self.per_level) or rest
            return "lora_unet_" + path.removesuffix(".weight").replace(".", "_")
        names = [
            name
            for name, found in self.entries.get(target.component, {}).items()
            if found == target and name.startswith(("encoder_layers_", "embeddings_", "final_layer_norm"))
        ]
        if names:
            return f"lora_{target.component}_text_model_{names[0]}"
        # OpenCLIP's whole fused in_proj (q, k and v in one module, as some LoRAs hold it) has no
        # transformers name: its own OpenCLIP name, which this table (and ComfyUI) read back.
        own = [name for name, found in self.entries.get(target.component, {}).items() if found == target]
        if not own:
            raise KeyError(f"{target.key}{target.rows or ''}: no module name for it")
        return f"lora_{target.component}_{own[0]}"
