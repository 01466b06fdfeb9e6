"""Element names of the real full-size models, per U-Net block (pure Python, no torch).

The tables in ``mergeprobe/configs/elements/<arch>.json`` list, for every U-Net block of an
architecture, the sorted element names (``mergeprobe.checkpoints.archs.element_of_key``) of the keys a real
single-file checkpoint has in that block. They are generated from the full-size model layouts by
``python -m worker.checkpoints.full_layouts --write-element-tables``; a test fails when they go stale.
BASE has no table (its element is the full key).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from mergeprobe.checkpoints.archs import get_arch

__all__ = [
    "check_unet_complete",
    "element_names",
    "element_table_document",
    "missing_unet_tensors",
    "published_weight_shapes",
]


@functools.cache
def _document(arch_name: str) -> dict[str, Any]:
    get_arch(arch_name)  # KeyError for an unknown architecture
    resource = resources.files("mergeprobe").joinpath("configs", "elements", f"{arch_name}.json")
    return json.loads(resource.read_text(encoding="utf-8"))


def element_table_document(arch_name: str) -> dict[str, Any]:
    """The table file without its weight shapes: ``arch``, ``base`` (a note and the BASE key
    prefixes) and ``blocks``."""
    document = json.loads(json.dumps(_document(arch_name)))
    document.pop("weights_note", None)
    document.pop("weights", None)
    return document


def element_names(arch_name: str) -> dict[str, list[str]]:
    """U-Net block (IN00 … OUTnn, in U-Net order) → sorted element names of a real checkpoint."""
    return {block: list(names) for block, names in _document(arch_name)["blocks"].items()}


def published_weight_shapes(arch_name: str) -> dict[str, tuple[int, ...]]:
    """key → shape of every U-Net and text encoder weight (2-D and up) of a published checkpoint."""
    return {
        key: tuple(int(d) for d in shape.split("x")) for key, shape in _document(arch_name)["weights"].items()
    }


# The published models' U-Net starts with this many channels; smaller U-Nets (the tiny test
# models, custom trainings) have no element table to check against.
PUBLISHED_MODEL_CHANNELS = 320


def missing_unet_tensors(tensors: Mapping[str, Any], arch_name: str, limit: int = 5) -> list[str]:
    """U-Net tensors the architecture needs that `tensors` (a header's table) lacks, as
    `BLOCK element` (the first `limit`), or every block without any key.

    A U-Net of the published size is checked element by element against the table; any other
    size block by block (each block must have keys)."""
    arch = get_arch(arch_name)
    present: dict[str, set[str]] = {block: set() for block in arch.unet_blocks}
    for key in tensors:
        if key.startswith(arch.unet_prefix):
            try:
                block, element = arch.split_key(key)
            except ValueError:
                continue  # a key of no block (checked elsewhere, e.g. at merge planning)
            present[block].add(element)
    conv_in = tensors.get(arch.conv_in)
    shape = getattr(conv_in, "shape", ())
    if shape and shape[0] == PUBLISHED_MODEL_CHANNELS:
        missing = [
            f"{block} {element}"
            for block, names in _document(arch_name)["blocks"].items()
            for element in names
            if element not in present[block]
        ]
    else:
        missing = [f"{block} (no keys)" for block, found in present.items() if not found]
    return missing[:limit] + ([f"… {len(missing) - limit} more"] if len(missing) > limit else [])


def check_unet_complete(tensors: Mapping[str, Any], arch_name: str, *, name: str, field: str) -> None:
    """400 `missing-tensors` naming `field` when the U-Net lacks tensors its architecture needs."""
    from mergeprobe.service.errors import InvalidInput

    missing = missing_unet_tensors(tensors, arch_name)
    if missing:
        raise InvalidInput(
            "missing-tensors",
            "Missing tensors",
            f"{name}: its U-Net lacks tensors the {arch_name} architecture needs: {', '.join(missing)}",
            field=field,
        )
