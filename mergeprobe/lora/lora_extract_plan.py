"""The plan of a LoRA extraction: which layers of `model_tuned − model_base` become modules, under
which kohya names, at which rank cap. Decided from the two headers (no torch), by the API at
submission and again by the worker from the pinned files.

The layers are the ones kohya sd-scripts' LoRA network trains and its extract_lora_from_models.py
extracts: in the U-Net, every linear and 1×1 conv layer of the transformers (attention q/k/v/out,
feed-forward, proj_in/proj_out); with `conv_rank`, also the ResBlocks, downsamplers and upsamplers
(3×3 convs at `conv_rank`, their time-embedding linear and 1×1 shortcut at `rank`), as sd-scripts
does with `conv_dim`; in the text encoders (`text_encoders`), the attention and MLP linears.
conv_in, conv_out, the time and label embeddings, norms and the VAE are never extracted: a
difference there is reported as not carried by the LoRA.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

from mergeprobe.checkpoints.archs import UNKNOWN, get_arch
from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader
from mergeprobe.checkpoints.library import ModelEntry, ModelLibrary, PinnedModel
from mergeprobe.lora.lora_keys import LoraKeyTable, LoraTarget, unet_ldm_to_diffusers
from mergeprobe.lora.lora_output import LoraLayer, LoraOutput, LowRankFields, lora_output_name
from mergeprobe.service.errors import InvalidInput

_TE_LAYER = re.compile(r"encoder_layers_\d+_(?:self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")
_CONV_PARENTS = (".resnets.", ".downsamplers.", ".upsamplers.")


class ExtractRequest(LowRankFields):
    """A LoRA from the difference of two checkpoints of one architecture."""

    model_tuned: str = Field(
        description="The fine-tune (or merge) whose difference is extracted.", examples=["tiny-sd1-b"]
    )
    model_base: str = Field(description="The model it was tuned from.", examples=["tiny-sd1-a"])
    text_encoders: bool = Field(default=True, description="Extract the text encoders' layers too.")
    min_diff: float = Field(
        default=0.0,
        ge=0,
        description="A layer whose largest |ΔW| is at most this is left out (reported as unchanged). "
        "sd-scripts' --min_diff (0.01) applies to the text encoders as a whole instead.",
    )
    svd: Literal["randomized", "full"] = Field(
        default="randomized",
        description="`randomized`: a randomised SVD of rank cap + 8 with 2 power iterations per layer "
        "(Halko et al.), seeded by `seed`; `full`: torch.linalg.svd, as sd-scripts does.",
    )
    clamp_quantile: float | None = Field(
        default=None,
        gt=0.5,
        le=1,
        description="Clamp both factors to ± this quantile of their absolute values, as sd-scripts' extractor "
        "does with 0.99. Default: no clamping (the stored factors are the SVD's).",
    )
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where the SVDs run.")
    output: LoraOutput = Field(default_factory=LoraOutput)


class ExtractInputs(BaseModel):
    arch: str
    tuned: PinnedModel
    base: PinnedModel
    output: str = Field(description="File name of the result.")
    layers: int = Field(description="Layers the plan extracts.")


def _layer_shape(header: CheckpointHeader, target: LoraTarget) -> tuple[int, ...]:
    shape = tuple(header.tensors[target.key].shape)
    if target.rows is None:
        return shape
    return (target.rows[1] - target.rows[0], *shape[1:])


def extract_layers(arch: str, header: CheckpointHeader, request: ExtractRequest) -> list[LoraLayer]:
    """The layers an extraction makes modules of, from the tuned model's header."""
    architecture = get_arch(arch)
    table = LoraKeyTable.for_checkpoint(arch, header.tensors)
    layers: list[LoraLayer] = []
    for key, info in header.tensors.items():
        if not key.startswith(architecture.unet_prefix) or not key.endswith(".weight") or len(info.shape) < 2:
            continue
        diffusers = unet_ldm_to_diffusers(key[len(architecture.unet_prefix) :], table.per_level)
        if diffusers is None:
            continue
        target = table.by_key[key]
        kernel = tuple(info.shape[2:])
        if ".attentions." in diffusers and kernel in ((), (1, 1)):
            cap = request.rank
        elif request.conv_rank is not None and any(part in diffusers for part in _CONV_PARENTS):
            cap = request.rank if kernel in ((), (1, 1)) else request.conv_rank
        else:
            continue
        layers.append(LoraLayer(table.kohya_name(target), target, tuple(info.shape), cap))
    if request.text_encoders:
        for component, entries in table.entries.items():
            if component == "unet":
                continue
            names = [name for name in entries if _TE_LAYER.match(name)]
            if arch == "sd2" and names:
                # SD 2 conditions on the penultimate layer and uses no pooled output, so the last
                # layer of the file's OpenCLIP tower never acts (diffusers' text encoder and
                # sd-scripts', 23 layers, have no such layer); it gets no module.
                last = max(int(name.split("_")[2]) for name in names)
                names = [name for name in names if int(name.split("_")[2]) != last]
            for name in names:
                target = entries[name]
                shape = _layer_shape(header, target)
                layers.append(LoraLayer(f"lora_{component}_text_model_{name}", target, shape, request.rank))
    return layers


def _checked_pair(tuned: ModelEntry, base: ModelEntry, layers: list[LoraLayer]) -> None:
    for layer in layers:
        key = layer.target.key
        mine, theirs = tuned.header.tensors[key], base.header.tensors.get(key)
        if theirs is None or tuple(theirs.shape) != tuple(mine.shape):
            found = "has no such tensor" if theirs is None else f"has it as {list(theirs.shape)}"
            raise InvalidInput(
                "model-mismatch",
                "The models do not match",
                f"{tuned.name} has {key} as {list(mine.shape)}; {base.name} {found}",
                field="model_base",
            )


def plan_extract(
    request: ExtractRequest,
    library: ModelLibrary,
    *,
    pinned: ExtractInputs | None = None,
) -> tuple[ModelEntry, ModelEntry, list[LoraLayer]]:
    """(tuned, base, layers) of a request; `pinned` (a job's inputs) replaces resolving the names,
    and then the entries have local files."""
    entries = []
    for field, ref, pin in (
        ("model_tuned", request.model_tuned, pinned.tuned if pinned else None),
        ("model_base", request.model_base, pinned.base if pinned else None),
    ):
        if pin is None:
            _, entry = library.pin(ref, field=field)
        else:
            entry = library.entry(library.open_pinned(pin, field=field), field=field, name=pin.name)
        if entry.variant.arch == UNKNOWN:
            raise InvalidInput(
                "unknown-architecture",
                "Unknown architecture",
                f"{entry.name}: its keys match none of sd1, sd2, sdxl",
                field=field,
            )
        entries.append(entry)
    tuned, base = entries
    if tuned.variant.arch != base.variant.arch:
        raise InvalidInput(
            "architecture-mismatch",
            "The models do not match",
            f"{tuned.name} is {tuned.variant.arch}, {base.name} is {base.variant.arch}",
            field="model_base",
        )
    if tuned.sha256 == base.sha256:
        raise InvalidInput(
            "same-model",
            "Nothing to extract",
            f"{tuned.name} and {base.name} are the same file",
            field="model_base",
        )
    layers = extract_layers(tuned.variant.arch, tuned.header, request)
    if not layers:
        raise InvalidInput(
            "nothing-to-extract",
            "Nothing to extract",
            f"{tuned.name} has no layer a LoRA is made of with these settings",
            field="model_tuned",
        )
    _checked_pair(tuned, base, layers)
    return tuned, base, layers


def prepare_extract(request: ExtractRequest, library: ModelLibrary) -> ExtractInputs:
    tuned, base, layers = plan_extract(request, library)
    stem = f"{tuned.name.rsplit('.', 1)[0][:40]}_lora_r{request.rank}"
    return ExtractInputs(
        arch=tuned.variant.arch,
        tuned=PinnedModel(name=tuned.name, sha256=tuned.sha256),
        base=PinnedModel(name=base.name, sha256=base.sha256),
        output=lora_output_name(request.output.name, stem, library),
        layers=len(layers),
    )
