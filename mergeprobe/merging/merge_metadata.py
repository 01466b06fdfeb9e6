"""The `__metadata__` of a merged checkpoint: the recipe, the lineage and the modelspec keys.

Lineage (`sd_merge_models`): each input's sha256 → its name, legacy hash and that input's own
`sd_merge_models`, nested. Nesting every parent's lineage grows it exponentially along chains of
merges of merges (21 `add_difference` merges of the three previous outputs made a 173 MB header,
which no safetensors reader opens), so it is capped: entries are kept LINEAGE_GENERATIONS deep,
and each entry of the last kept generation says, in `sd_merge_models_dropped`, how many ancestor
entries and generations were cut below it; fewer generations are kept where the text would pass
LINEAGE_MAX_BYTES.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from mergeprobe.checkpoints.variants import CheckpointVariant
from mergeprobe.merging.merge_plan import MergePlan

# modelspec.hash_sha256 is the sha256 of the tensor data, known only once it is written:
# the header carries this placeholder of the same length and is rewritten at the end.
HASH_PLACEHOLDER = "0x" + "0" * 64

LINEAGE_GENERATIONS = 4  # the inputs, their parents, grandparents, great-grandparents
LINEAGE_MAX_BYTES = 64 * 1024
DROPPED = "sd_merge_models_dropped"  # {"models": entries cut below an entry, "generations": how deep}

# The SAI model spec's architecture ids, as kohya's sd-scripts writes them. sd-scripts has a
# v-prediction id for sd2 only; an sdxl v-prediction model keeps the base id and says "v" in
# modelspec.prediction_type.
_MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
}
_MODELSPEC_ARCH_V = {"sd2": "stable-diffusion-v2-768-v"}
_MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}  # EDM has no modelspec value
_MODELSPEC_IMPL = {
    "sd1": "https://github.com/Stability-AI/stablediffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _parent_lineage(metadata: dict[str, str]) -> dict[str, Any]:
    try:
        return _as_dict(json.loads(metadata.get("sd_merge_models", "{}")))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the decoder goes
        return {}


def _extent(lineage: dict[str, Any]) -> tuple[int, int]:
    """(entries, generations) of a lineage, counting what earlier caps dropped. Iterative: a
    lineage read from a file may be nested as deep as the JSON decoder allows."""
    models = generations = 0
    stack = [(lineage, 0)]
    while stack:
        level, depth = stack.pop()
        for entry in level.values():
            if not isinstance(entry, dict):
                continue
            dropped = _as_dict(entry.get(DROPPED))
            models += 1 + _count(dropped.get("models"))
            generations = max(generations, depth + 1 + _count(dropped.get("generations")))
            stack.append((_as_dict(entry.get("sd_merge_models")), depth + 1))
    return models, generations


def _capped(lineage: dict[str, Any], generations: int) -> dict[str, Any]:
    """`lineage` with `generations` generations of entries; each entry of the last one has its
    parents replaced by the count of what was cut."""
    capped = {}
    for sha256, entry in lineage.items():
        if not isinstance(entry, dict):
            continue
        kept = {k: v for k, v in entry.items() if k not in ("sd_merge_models", DROPPED)}
        parents = _as_dict(entry.get("sd_merge_models"))
        if generations > 1:
            kept["sd_merge_models"] = _capped(parents, generations - 1)
            if DROPPED in entry:
                kept[DROPPED] = entry[DROPPED]
        else:
            kept["sd_merge_models"] = {}
            own = _as_dict(entry.get(DROPPED))
            models, depth = _extent(parents)
            models += _count(own.get("models"))
            depth = max(depth, _count(own.get("generations")))
            if models:
                kept[DROPPED] = {"models": models, "generations": depth}
        capped[sha256] = kept
    return capped


def capped_lineage(lineage: dict[str, Any]) -> str:
    """The `sd_merge_models` text of a lineage: LINEAGE_GENERATIONS deep, or fewer generations
    where it would pass LINEAGE_MAX_BYTES (one generation, the inputs themselves, always fits)."""
    for generations in range(LINEAGE_GENERATIONS, 1, -1):
        text = json.dumps(_capped(lineage, generations), sort_keys=True, separators=(",", ":"))
        if len(text.encode()) <= LINEAGE_MAX_BYTES:
            return text
    return json.dumps(_capped(lineage, 1), sort_keys=True, separators=(",", ":"))


def _modelspec_variant(arch: str, variant: CheckpointVariant | None) -> dict[str, str]:
    """modelspec.architecture, prediction_type and resolution, from model A's variant."""
    v_prediction = variant is not None and variant.prediction_type == "v_prediction"
    spec = {
        "modelspec.architecture": _MODELSPEC_ARCH_V.get(arch, _MODELSPEC_ARCH[arch])
        if v_prediction
        else _MODELSPEC_ARCH[arch]
    }
    if variant is not None and variant.prediction_type in _MODELSPEC_PREDICTION:
        spec["modelspec.prediction_type"] = _MODELSPEC_PREDICTION[variant.prediction_type]
    if variant is not None and variant.resolution:
        spec["modelspec.resolution"] = f"{variant.resolution}x{variant.resolution}"
    return spec


def _name(plan: MergePlan, slot: str) -> str:
    """An input's library name (its local file may be a cache copy named by its sha256)."""
    return plan.pins[slot].name if slot in plan.pins else plan.paths[slot].name


def merge_metadata(
    plan: MergePlan, request: dict[str, Any], hashes: dict[str, tuple[str, str]], extra: dict[str, str]
) -> dict[str, str]:
    """hashes: slot → (sha256, legacy hash) of each input file."""
    models = {slot: {"name": _name(plan, slot), "sha256": hashes[slot][0]} for slot in plan.paths}
    recipe = {"type": "mergeprobe", "request": request, "models": models, "arch": plan.arch.name}
    lineage = {
        hashes[slot][0]: {
            "name": _name(plan, slot),
            "legacy_hash": hashes[slot][1],
            "sd_merge_models": _parent_lineage(plan.headers[slot].metadata),
        }
        for slot in plan.paths
    }
    title = plan.output_name.rsplit(".", 1)[0]
    ours = {
        "format": "pt",
        "sd_merge_recipe": json.dumps(recipe, sort_keys=True, separators=(",", ":")),
        "sd_merge_models": capped_lineage(lineage),
        "modelspec.sai_model_spec": "1.0.0",
        **_modelspec_variant(plan.arch.name, plan.variant),
        "modelspec.implementation": _MODELSPEC_IMPL[plan.arch.name],
        "modelspec.title": title,
        "modelspec.date": datetime.now(UTC).date().isoformat(),
        "modelspec.merged_from": ", ".join(_name(plan, s) for s in ("a", "b", "c") if s in plan.paths),
        "modelspec.hash_sha256": HASH_PLACEHOLDER,
    }
    return {**extra, **ours}
