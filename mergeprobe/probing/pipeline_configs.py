"""Which diffusers config folder builds a pipeline for a checkpoint, offline (pure Python: the API
asks it at submission, the worker when it loads the pipeline).

Configs come from MERGEPROBE_PIPELINE_CONFIGS_DIR/<arch> (an override) or those shipped with the
project (the tiny test models' configs and the published sd1/sd2/sdxl ones). A tokenizer folder
without its vocabulary gets CLIP's, derived from the shipped merges. Nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

import mergeprobe
from mergeprobe.checkpoints.archs import get_arch
from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader
from mergeprobe.checkpoints.elements import check_unet_complete
from mergeprobe.checkpoints.library import ModelLibrary
from mergeprobe.checkpoints.variants import CheckpointVariant
from mergeprobe.probing.clip_tokenizer import write_vocabulary_files
from mergeprobe.service.errors import InvalidInput, Unprocessable
from mergeprobe.service.settings import Settings

SHIPPED_CONFIGS = Path(mergeprobe.__file__).resolve().parent / "configs"
_REQUIRED = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)
_TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json")
_VOCABULARY = ("vocab.json", "merges.txt")


def _fits(config_dir: Path, header: CheckpointHeader, arch: str) -> bool:
    """Does this config describe the checkpoint's U-Net (channels and context width)?"""
    try:
        unet = json.loads((config_dir / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    conv_in = header.tensors.get(get_arch(arch).conv_in)
    to_k = next((t for k, t in header.tensors.items() if k.endswith("attn2.to_k.weight")), None)
    if conv_in is None or conv_in.shape[0] != unet["block_out_channels"][0]:
        return False
    return to_k is None or to_k.shape[1] == unet["cross_attention_dim"]


def _tokenizer_slots(config_dir: Path) -> list[str]:
    """The pipeline's tokenizer folders: `tokenizer`, and sdxl's `tokenizer_2`."""
    index = json.loads((config_dir / "model_index.json").read_text())
    return sorted(k for k, v in index.items() if k.startswith("tokenizer") and isinstance(v, list) and v[0])


def _tree_digest(config_dir: Path) -> str:
    digest = hashlib.sha256(str(config_dir).encode())
    for path in sorted(p for p in config_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(config_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def completed_config_dir(config_dir: Path, arch: str, settings: Settings) -> Path:
    """`config_dir` when its tokenizer folders hold their vocabulary; otherwise a copy of it in the
    cache (MERGEPROBE_DATA_DIR/cache/pipeline-configs, written once per config version) with CLIP's
    BPE vocabulary, derived from the shipped merges, added to each tokenizer folder. A folder without
    its settings gets those of the shipped full-size config (sd2 and sdxl's second tokenizer pad
    with `!`, the others with `<|endoftext|>`)."""
    slots = _tokenizer_slots(config_dir)
    if all((config_dir / slot / name).is_file() for slot in slots for name in _VOCABULARY):
        return config_dir
    final = settings.cache_path / "pipeline-configs" / f"{arch}-{_tree_digest(config_dir)}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        shutil.copytree(config_dir, building, dirs_exist_ok=True)
        for slot in slots:
            folder = building / slot
            folder.mkdir(exist_ok=True)
            for name in _TOKENIZER_SETTINGS:
                if not (folder / name).is_file():
                    shutil.copyfile(SHIPPED_CONFIGS / "full" / arch / slot / name, folder / name)
            if not all((folder / name).is_file() for name in _VOCABULARY):
                write_vocabulary_files(folder)
        try:
            building.rename(final)
        except OSError:
            if not final.is_dir():  # not another worker's identical copy: a real failure
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def fitting_config_dir(
    arch: str, header: CheckpointHeader, settings: Settings, *, field: str = "model"
) -> Path:
    """The diffusers config folder for this checkpoint: MERGEPROBE_PIPELINE_CONFIGS_DIR/<arch> when set
    and it fits, else the shipped tiny or full-size one that fits. Reads only; writes nothing."""
    candidates = []
    if settings.pipeline_configs_dir is not None:
        candidates.append(Path(settings.pipeline_configs_dir) / arch)
    candidates += [SHIPPED_CONFIGS / "tiny" / arch, SHIPPED_CONFIGS / "full" / arch]
    for candidate in candidates:
        if _fits(candidate, header, arch) and all((candidate / r).is_file() for r in _REQUIRED):
            return candidate
    where = settings.pipeline_configs_dir or "<MERGEPROBE_PIPELINE_CONFIGS_DIR>"
    raise Unprocessable(
        "missing-pipeline-config",
        "Missing pipeline config",
        f"no diffusers config fits this {arch} checkpoint (its U-Net's width or cross-attention width differ "
        f"from the published sd1/sd2/sdxl ones shipped with mergeprobe): fill {where}/{arch} with "
        "model_index.json, unet/, vae/, text_encoder/ (and text_encoder_2/ for sdxl) and scheduler/ (the "
        "model's diffusers config folders, without weights); nothing is downloaded",
        field=field,
    )


def find_config_dir(arch: str, header: CheckpointHeader, settings: Settings) -> Path:
    """`fitting_config_dir`, its tokenizers completed (the worker's call: it may write the cache)."""
    return completed_config_dir(fitting_config_dir(arch, header, settings), arch, settings)


PREDICTION_TYPE_DOC = (
    "What the model's U-Net predicts, overriding detection (the `v_pred` key, modelspec metadata, and for "
    "sd2 ComfyUI's weight statistic; see the model's `variant`). Omit to use the detected one."
)
PredictionType = Literal["epsilon", "v_prediction"]


class PipelineVariant(BaseModel):
    """How the worker builds the pipeline of a probed model, decided at submission."""

    prediction_type: PredictionType = Field(
        description="What the U-Net predicts; sets the scheduler's `prediction_type`."
    )
    zero_terminal_snr: bool = Field(
        description="Trained with zero terminal SNR (the `ztsnr` marker): the scheduler rescales its betas "
        "and spaces timesteps from the end (`trailing`)."
    )
    source: str = Field(description="Where the prediction type came from: the request or detection.")


def check_probeable(
    name: str,
    header: CheckpointHeader,
    variant: CheckpointVariant,
    prediction_type: str | None,
    settings: Settings,
    *,
    field: str = "model",
) -> PipelineVariant:
    """Refuse, at submission, a model no pipeline can be built from (400 naming `field` and the
    reason); otherwise say how to build it. `prediction_type` is the request's override or None."""
    why = variant.unsupported_for_generation
    if why is not None:
        raise InvalidInput("unsupported-variant", "Unsupported model", f"{name}: {why}", field=field)
    check_unet_complete(header.tensors, variant.arch, name=name, field=field)
    fitting_config_dir(variant.arch, header, settings, field=field)
    if prediction_type is not None:
        source = f"the request (detected: {variant.prediction_type}, from {variant.prediction_source})"
        return PipelineVariant(
            prediction_type=prediction_type, zero_terminal_snr=variant.zero_terminal_snr, source=source
        )
    return PipelineVariant(
        prediction_type=variant.prediction_type,
        zero_terminal_snr=variant.zero_terminal_snr,
        source=variant.prediction_source,
    )


def library_pipeline_variant(library: ModelLibrary, path: Path) -> PipelineVariant:
    """`check_probeable` for a library file with no request override (benchmarks warm the worker's
    pipeline cache with it, under the key the engines use)."""
    header = library.header(path)
    return check_probeable(path.name, header, library.variant(path), None, library.settings)
