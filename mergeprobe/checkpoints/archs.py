"""Architectures, read from their data files: which blocks a model has, which block each key
belongs to, where its components' keys live, and how to recognise its checkpoints.

One file per architecture, `mergeprobe/configs/archs/<name>.json`, holds what is known of it:
the key prefixes of its U-Net, VAE and text encoder(s), the U-Net's depth and conv_in, the
blocks without cross-attention, the key → block rules and the markers that identify its files
(its element table is `configs/elements/<name>.json`). Adding an architecture is adding a file
here, plus whatever is truly new for it (a pipeline, a converter).

The block convention is the block-merge one (kohya's "merge by U-Net depth", Merge Block
Weighted, SuperMerger): every `input_blocks.N` is INnn, the middle block is M00, every
`output_blocks.N` is OUTnn, the time (and SDXL label) embedding counts as IN00, the final `out.*`
layers as the last OUT block, and everything outside the U-Net (text encoders, VAE) is BASE.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

BASE = "BASE"
MIDDLE = "M00"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class BlockRule:
    """Keys of the U-Net (without its prefix) that match `pattern` belong to `block`; their element
    is the rest of the key after the match, or the whole key."""

    pattern: re.Pattern[str]
    block: str  # a template: {index} is the matched number, {last_out} the last OUT block
    element_is_rest: bool


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    unet_prefix: str
    vae_prefix: str
    text_encoder_prefixes: tuple[str, ...]
    input_blocks: int
    output_blocks: int
    conv_in: str  # the full key of the U-Net's first convolution (9 channels in inpainting models)
    # Blocks with no cross-attention: a per-block prompt sent only to these changes nothing.
    textless_blocks: frozenset[str]
    block_rules: tuple[BlockRule, ...]
    markers: tuple[str, ...]  # key prefixes that only this architecture's checkpoints have
    unet_only_proj_in_ndim: int | None  # a bare U-Net's proj_in weight rank, where that tells

    @property
    def unet_blocks(self) -> tuple[str, ...]:
        """U-Net blocks in U-Net order: IN00 … INnn, M00, OUT00 … OUTnn."""
        return (
            tuple(f"IN{i:02d}" for i in range(self.input_blocks))
            + (MIDDLE,)
            + tuple(f"OUT{i:02d}" for i in range(self.output_blocks))
        )

    @property
    def blocks(self) -> tuple[str, ...]:
        """BASE followed by the U-Net blocks: the order of a 26-value (sd1) weight list."""
        return (BASE,) + self.unet_blocks

    @property
    def last_out_block(self) -> str:
        return f"OUT{self.output_blocks - 1:02d}"

    @property
    def model_prefixes(self) -> tuple[str, ...]:
        """Prefixes of every key a pipeline needs (U-Net, VAE, text encoders): a pruned file keeps these."""
        return (self.unet_prefix, self.vae_prefix, *self.text_encoder_prefixes)

    def split_key(self, key: str) -> tuple[str, str]:
        """(block, element) of a key; the element is the key relative to its block."""
        if not key.startswith(self.unet_prefix):
            return BASE, key
        rest = key[len(self.unet_prefix) :]
        for rule in self.block_rules:
            match = rule.pattern.match(rest)
            if match is None:
                continue
            index = int(match.group(1)) if match.groups() and match.group(1).isdigit() else None
            block = rule.block.format(index=index, last_out=self.last_out_block)
            if block not in self.unet_blocks:
                raise ValueError(f"{key}: {block} does not exist in {self.name}")
            return block, rest[match.end() :] if rule.element_is_rest else rest
        raise ValueError(f"{key}: not a U-Net key the {self.name} block table knows")


def architecture_data(name: str) -> dict[str, Any]:
    """The data file of a shipped architecture, as JSON."""
    path = resources.files("mergeprobe").joinpath("configs", "archs", f"{name}.json")
    return json.loads(path.read_text(encoding="utf-8"))


def architecture_from_data(data: dict[str, Any]) -> Architecture:
    prefixes, unet, detect = data["prefixes"], data["unet"], data["detect"]
    return Architecture(
        name=data["name"],
        title=data["title"],
        unet_prefix=prefixes["unet"],
        vae_prefix=prefixes["vae"],
        text_encoder_prefixes=tuple(prefixes["text_encoders"]),
        input_blocks=unet["input_blocks"],
        output_blocks=unet["output_blocks"],
        conv_in=prefixes["unet"] + unet["conv_in"],
        textless_blocks=frozenset(unet["textless_blocks"]),
        block_rules=tuple(
            BlockRule(re.compile(rule["pattern"]), rule["block"], rule["element"] == "rest")
            for rule in data["block_rules"]
        ),
        markers=tuple(detect["markers"]),
        unet_only_proj_in_ndim=detect["unet_only_proj_in_ndim"],
    )


ARCHITECTURES: dict[str, Architecture] = {
    name: architecture_from_data(architecture_data(name)) for name in ("sd1", "sd2", "sdxl")
}
SD1, SD2, SDXL = ARCHITECTURES["sd1"], ARCHITECTURES["sd2"], ARCHITECTURES["sdxl"]
# Every architecture so far keeps its U-Net and VAE under the same prefixes; code that must find
# them before it knows the architecture (detection, the LDM converters) uses these.
UNET_PREFIX, VAE_PREFIX = SD1.unet_prefix, SD1.vae_prefix
assert all((a.unet_prefix, a.vae_prefix) == (UNET_PREFIX, VAE_PREFIX) for a in ARCHITECTURES.values())


def get_arch(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def block_of_key(arch: Architecture, key: str) -> str:
    return arch.split_key(key)[0]


def element_of_key(arch: Architecture, key: str) -> str:
    return arch.split_key(key)[1]


class _HasShape(Protocol):
    shape: tuple[int, ...]


_INPUT_BLOCK = re.compile(r"input_blocks\.(\d+)\.")


def detect_arch(tensors: Mapping[str, _HasShape]) -> str:
    """The architecture's name, or unknown, from key names and shapes alone (no tensor data): the
    U-Net's depth, then the marker keys of each architecture's files; a bare U-Net by the rank of
    its transformers' proj_in weight."""
    unet_inputs = {
        int(m.group(1))
        for key in tensors
        if key.startswith(UNET_PREFIX) and (m := _INPUT_BLOCK.match(key, len(UNET_PREFIX)))
    }
    if not unet_inputs:
        return UNKNOWN
    candidates = [a for a in ARCHITECTURES.values() if a.input_blocks == max(unet_inputs) + 1]
    for arch in candidates:
        if any(key.startswith(arch.markers) for key in tensors):
            return arch.name
    if any(
        key.startswith((UNET_PREFIX + "label_emb.", "conditioner.", "cond_stage_model.")) for key in tensors
    ):
        # Not a bare U-Net (it has text encoders or a class embedding) yet no marker matched: an
        # SDXL refiner (12 input blocks like sd1/sd2), an unCLIP model ... none of ours.
        return UNKNOWN
    proj_in = next(
        (t for k, t in tensors.items() if k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight")), None
    )
    for arch in candidates:
        if proj_in is not None and len(proj_in.shape) == arch.unet_only_proj_in_ndim:
            return arch.name
    return UNKNOWN
