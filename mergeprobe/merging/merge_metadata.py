"""The `__metadata__` of a merged checkpoint: the recipe, recursive lineage and modelspec keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from mergeprobe.merging.merge_plan import MergePlan

# modelspec.hash_sha256 is the sha256 of the tensor data, known only once it is written:
# the header carries this placeholder of the same length and is rewritten at the end.
HASH_PLACEHOLDER = "0x" + "0" * 64

_MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
}
_MODELSPEC_IMPL = {
    "sd1": "https://github.com/Stability-AI/stablediffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}


def _parent_lineage(metadata: dict[str, str]) -> dict[str, Any]:
    try:
        parents = json.loads(metadata.get("sd_merge_models", "{}"))
    except ValueError:
        return {}
    return parents if isinstance(parents, dict) else {}


def merge_metadata(
    plan: MergePlan, request: dict[str, Any], hashes: dict[str, tuple[str, str]], extra: dict[str, str]
) -> dict[str, str]:
    """hashes: slot → (sha256, legacy hash) of each input file."""
    models = {slot: {"name": plan.paths[slot].name, "sha256": hashes[slot][0]} for slot in plan.paths}
    recipe = {"type": "mergeprobe", "request": request, "models": models, "arch": plan.arch.name}
    lineage = {
        hashes[slot][0]: {
            "name": plan.paths[slot].name,
            "legacy_hash": hashes[slot][1],
            "sd_merge_models": _parent_lineage(plan.headers[slot].metadata),
        }
        for slot in plan.paths
    }
    title = plan.output_name.rsplit(".", 1)[0]
    ours = {
        "format": "pt",
        "sd_merge_recipe": json.dumps(recipe, sort_keys=True, separators=(",", ":")),
        "sd_merge_models": json.dumps(lineage, sort_keys=True, separators=(",", ":")),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _MODELSPEC_ARCH[plan.arch.name],
        "modelspec.implementation": _MODELSPEC_IMPL[plan.arch.name],
        "modelspec.title": title,
        "modelspec.date": datetime.now(UTC).date().isoformat(),
        "modelspec.merged_from": ", ".join(plan.paths[s].name for s in ("a", "b", "c") if s in plan.paths),
        "modelspec.hash_sha256": HASH_PLACEHOLDER,
    }
    return {**extra, **ours}
