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
from importlib import resources
from typing import Any

from mergeprobe.checkpoints.archs import get_arch

__all__ = ["element_names", "element_table_document"]


@functools.cache
def _document(arch_name: str) -> dict[str, Any]:
    get_arch(arch_name)  # KeyError for an unknown architecture
    resource = resources.files("mergeprobe").joinpath("configs", "elements", f"{arch_name}.json")
    return json.loads(resource.read_text(encoding="utf-8"))


def element_table_document(arch_name: str) -> dict[str, Any]:
    """The whole table file: ``arch``, ``base`` (a note and the BASE key prefixes) and ``blocks``."""
    return json.loads(json.dumps(_document(arch_name)))


def element_names(arch_name: str) -> dict[str, list[str]]:
    """U-Net block (IN00 … OUTnn, in U-Net order) → sorted element names of a real checkpoint."""
    return {block: list(names) for block, names in _document(arch_name)["blocks"].items()}
