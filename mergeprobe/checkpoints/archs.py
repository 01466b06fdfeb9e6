"""Architecture tables: which blocks a model has and which block each key belongs to.

The block convention is the block-merge one (kohya's "merge by U-Net depth",
Merge Block Weighted, SuperMerger): every `input_blocks.N` is INnn, the middle
block is M00, every `output_blocks.N` is OUTnn, the time (and SDXL label)
embedding counts as IN00, the final `out.*` layers as the last OUT block, and
everything outside the U-Net (text encoders, VAE) is BASE.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

UNET_PREFIX = "model.diffusion_model."
BASE = "BASE"
MIDDLE = "M00"


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    input_blocks: int
    output_blocks: int
    # Blocks with no cross-attention: a per-block prompt sent only to these changes nothing.
    textless_blocks: frozenset[str]

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


def _names(prefix: str, indices: Sequence[int]) -> frozenset[str]:
    return frozenset(f"{prefix}{i:02d}" for i in indices)


SD1 = Architecture(
    name="sd1",
    title="Stable Diffusion 1.x",
    input_blocks=12,
    output_blocks=12,
    textless_blocks=_names("IN", [0, 3, 6, 9, 10, 11]) | _names("OUT", [0, 1, 2]),
)
SD2 = Architecture(
    name="sd2",
    title="Stable Diffusion 2.x",
    input_blocks=12,
    output_blocks=12,
    textless_blocks=SD1.textless_blocks,
)
SDXL = Architecture(
    name="sdxl",
    title="Stable Diffusion XL",
    input_blocks=9,
    output_blocks=9,
    textless_blocks=_names("IN", [0, 1, 2, 3, 6]) | _names("OUT", [6, 7, 8]),
)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (SD1, SD2, SDXL)}
UNKNOWN = "unknown"


def get_arch(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


_UNET_KEY = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(.*)")


def _split_key(arch: Architecture, key: str) -> tuple[str, str]:
    """(block, element) of a key; the element is the key relative to its block."""
    if not key.startswith(UNET_PREFIX):
        return BASE, key
    rest = key[len(UNET_PREFIX) :]
    match = _UNET_KEY.match(rest)
    if match:
        kind, index, element = match.groups()
        limit = arch.input_blocks if kind == "input_blocks" else arch.output_blocks
        if int(index) >= limit:
            raise ValueError(f"{key}: {kind}.{index} does not exist in {arch.name}")
        return f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(index):02d}", element
    if rest.startswith("middle_block."):
        return MIDDLE, rest[len("middle_block.") :]
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00", rest
    if rest.startswith("out."):
        return arch.last_out_block, rest
    raise ValueError(f"{key}: not a U-Net key the {arch.name} block table knows")


def block_of_key(arch: Architecture, key: str) -> str:
    return _split_key(arch, key)[0]


def element_of_key(arch: Architecture, key: str) -> str:
    return _split_key(arch, key)[1]


class _HasShape(Protocol):
    shape: tuple[int, ...]


def detect_arch(tensors: Mapping[str, _HasShape]) -> str:
    """sd1, sd2, sdxl or unknown, from key names and shapes alone (no tensor data)."""
    unet_inputs = {
        int(m.group(2))
        for key in tensors
        if key.startswith(UNET_PREFIX)
        and (m := _UNET_KEY.match(key[len(UNET_PREFIX) :]))
        and m.group(1) == "input_blocks"
    }
    if not unet_inputs:
        return UNKNOWN
    depth = max(unet_inputs) + 1
    if depth == SDXL.input_blocks and (
        f"{UNET_PREFIX}label_emb.0.0.weight" in tensors
        or any(k.startswith("conditioner.embedders.") for k in tensors)
    ):
        return SDXL.name
    if depth != SD1.input_blocks:
        return UNKNOWN
    if any(k.startswith("cond_stage_model.model.") for k in tensors):
        return SD2.name
    if any(k.startswith("cond_stage_model.transformer.") for k in tensors):
        return SD1.name
    # U-Net only: SD2 replaced the transformers' 1x1 conv proj_in with a linear layer.
    proj_in = next(
        (t for k, t in tensors.items() if k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight")), None
    )
    if proj_in is None:
        return UNKNOWN
    return SD2.name if len(proj_in.shape) == 2 else SD1.name
