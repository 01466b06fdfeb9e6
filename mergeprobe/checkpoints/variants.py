"""What a checkpoint is beyond its architecture, from its header (and, for sd2, one small tensor).

Users bring SD1.5 fine-tunes, SD2.x at 512 px (ε-prediction) and 768 px (v-prediction), SDXL
and its descendants (many of them v-prediction, some with zero terminal SNR), inpainting
models, SDXL refiners, EMA and pruned files. `detect_variant` says which, and where each
answer came from, so that a dump loads the right scheduler and a merge writes the right
modelspec. The rules are the ones other loaders use:

* **v-prediction**: the `v_pred` marker key trainers write (ComfyUI's rule, also read by Forge);
  `ztsnr` beside it means zero terminal SNR. Otherwise a `modelspec.prediction_type`
  declaration in the safetensors metadata. Otherwise, for sd2 only, ComfyUI's statistic:
  the population standard deviation of `output_blocks.11.1.transformer_blocks.0.norm1.bias`
  is above 0.09 in the 768-v models and below it in the 512 ε ones (inpainting models are ε).
  Otherwise ε. A request may override it with `prediction_type`.
* **inpainting**: the U-Net's conv_in reads 9 channels (4 latent + 4 masked image + 1 mask);
  8 channels is instruct-pix2pix.
* **refiner**: SDXL's refiner U-Net (4 levels, 12 input blocks, 384 channels, a 2560-wide
  `label_emb`, only the OpenCLIP bigG text encoder). It has no block table here.
* **EDM**: `edm_mean`/`edm_std` (Playground 2.5) and `edm_vpred.sigma_max` keys.
* **EMA**: `model_ema.*` weight copies beside the model's (a training checkpoint; loaders use
  the non-EMA weights), or only EMA copies. A released "-emaonly" file has its EMA weights
  under the model's own names and cannot be told from any other pruned file.

Pure Python (no torch): the API calls it on uploads.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Literal

from mergeprobe.checkpoints.archs import UNET_PREFIX, UNKNOWN, detect_arch, get_arch
from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader, read_float_values

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")

# ComfyUI (comfy/supported_models.py, SD20.model_type): an sd2 U-Net whose last transformer's
# first norm has a bias this spread out was trained for v-prediction.
SD2_V_STATISTIC_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STATISTIC_THRESHOLD = 0.09

V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"
EDM_MARKERS = ("edm_mean", "edm_std", "edm_vpred.sigma_max")
REFINER_LABEL_WIDTH = 2560  # SDXL refiner's adm_in_channels (base: 2816)
EMA_PREFIX = "model_ema."
EMA_BUFFERS = frozenset({"model_ema.decay", "model_ema.num_updates"})
_MODELSPEC_PREDICTION = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
}


@dataclass(frozen=True)
class CheckpointVariant:
    arch: str  # sd1 / sd2 / sdxl (its block layout), or unknown (a refiner, or no known layout)
    name: str  # e.g. sd1, sd2-v, sdxl-v, sd1-inpainting, sdxl-refiner
    title: str
    prediction_type: str | None  # epsilon / v_prediction; edm for EDM models; None without a U-Net
    prediction_source: str  # where prediction_type came from, in words
    zero_terminal_snr: bool
    in_channels: int | None  # of the U-Net's conv_in: 4, 9 (inpainting), 8 (instruct-pix2pix)
    inpainting: bool
    refiner: bool
    ema: Literal["none", "separate", "only"]
    has_unet: bool
    has_vae: bool
    has_text_encoders: bool
    resolution: int | None  # the native side in pixels: 512, 768 (sd2 v), 1024 (sdxl)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def unsupported_for_generation(self) -> str | None:
        """Why a pipeline cannot be built from this checkpoint, or None when it can."""
        if self.refiner:
            return (
                "it is an SDXL refiner (it only refines the latents of a base model and has no block "
                "table here); probe the base model instead"
            )
        if self.prediction_type == "edm":
            return "it is an EDM model (Playground 2.5 style); only ε- and v-prediction schedulers are built"
        if self.arch == UNKNOWN:
            return "its keys match none of sd1, sd2, sdxl"
        if not self.has_unet:
            return "it has no U-Net"
        if self.inpainting:
            return (
                "it is an inpainting model (its U-Net reads 9 channels: latents, masked image, mask); dumps "
                "and sweeps run text-to-image and build no inpainting pipeline: probe its base model"
            )
        if self.in_channels != 4:
            return f"its U-Net reads {self.in_channels} input channels; text-to-image pipelines read 4"
        if not (self.has_vae and self.has_text_encoders):
            missing = [
                name
                for name, has in (("VAE", self.has_vae), ("text encoders", self.has_text_encoders))
                if not has
            ]
            return f"it has no {' and no '.join(missing)} (a pipeline needs the whole model)"
        return None


def _has_prefix(header: CheckpointHeader, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in header.tensors)


def _is_refiner(header: CheckpointHeader) -> bool:
    label = header.tensors.get(UNET_PREFIX + "label_emb.0.0.weight")
    return label is not None and len(label.shape) == 2 and label.shape[1] == REFINER_LABEL_WIDTH


def _ema_kind(header: CheckpointHeader) -> Literal["none", "separate", "only"]:
    ema_weights = any(k.startswith(EMA_PREFIX) and k not in EMA_BUFFERS for k in header.tensors)
    if not ema_weights:
        return "none"
    return "separate" if _has_prefix(header, UNET_PREFIX) else "only"


def _sd2_statistic(
    path: str | os.PathLike[str] | None, fileobj: BinaryIO | None, header: CheckpointHeader
) -> float | None:
    if (path is None and fileobj is None) or SD2_V_STATISTIC_KEY not in header.tensors:
        return None
    values = read_float_values(path, header, SD2_V_STATISTIC_KEY, fileobj=fileobj)
    if not values:
        return None
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def _prediction(
    path: str | os.PathLike[str] | None,
    fileobj: BinaryIO | None,
    header: CheckpointHeader,
    arch: str,
    in_channels: int | None,
) -> tuple[str | None, str]:
    keys = header.tensors
    if not _has_prefix(header, UNET_PREFIX):
        return None, "no U-Net"
    if "edm_vpred.sigma_max" in keys:
        return "edm", "the edm_vpred.sigma_max key (EDM v-prediction)"
    if "edm_mean" in keys or "edm_std" in keys:
        return "edm", "the edm_mean / edm_std keys (EDM, Playground 2.5)"
    if V_PRED_MARKER in keys:
        return "v_prediction", "the v_pred marker key"
    declared = _MODELSPEC_PREDICTION.get(header.metadata.get("modelspec.prediction_type", "").strip().lower())
    if declared is not None:
        return declared, "the file's modelspec.prediction_type metadata"
    if arch == "sd2" and in_channels == 4:
        statistic = _sd2_statistic(path, fileobj, header)
        if statistic is not None:
            found = "v_prediction" if statistic > SD2_V_STATISTIC_THRESHOLD else "epsilon"
            side = ">" if found == "v_prediction" else "≤"
            return found, (
                f"ComfyUI's sd2 rule: std of output_blocks.11.1.transformer_blocks.0.norm1.bias is "
                f"{statistic:.4f} {side} {SD2_V_STATISTIC_THRESHOLD}"
            )
        return "epsilon", "sd2 default (the tensor ComfyUI's rule reads could not be read)"
    return "epsilon", "no v-prediction marker (ε, the default)"


def _title(
    arch: str, prediction: str | None, inpainting: bool, refiner: bool, in_channels: int | None
) -> tuple[str, str]:
    if refiner:
        return "sdxl-refiner", "SDXL refiner"
    if arch == UNKNOWN:
        return UNKNOWN, "unknown architecture"
    title = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}[arch]
    name = arch
    if prediction == "edm":  # the sdxl layout, but a scheduler no pipeline here builds
        return f"{arch}-edm", f"{title}, EDM"
    if prediction == "v_prediction":
        name, title = f"{arch}-v", f"{title}, v-prediction"
    elif arch == "sd2":
        name, title = "sd2-epsilon", f"{title}, ε-prediction"
    if inpainting:
        name, title = f"{name}-inpainting", f"{title}, inpainting"
    elif in_channels not in (None, 4):
        name, title = f"{name}-{in_channels}ch", f"{title}, {in_channels}-channel U-Net input"
    return name, title


def detect_variant(
    header: CheckpointHeader, path: str | os.PathLike[str] | None = None, *, fileobj: BinaryIO | None = None
) -> CheckpointVariant:
    """The variant of the checkpoint with this header; `path` or `fileobj` (read, never closed) lets
    the sd2 rule read its one tensor."""
    refiner = _is_refiner(header)
    arch = UNKNOWN if refiner else detect_arch(header.tensors)
    conv_in = header.tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    in_channels = conv_in.shape[1] if conv_in is not None and len(conv_in.shape) == 4 else None
    prediction, source = _prediction(path, fileobj, header, arch, in_channels)
    inpainting = in_channels == 9
    known = get_arch(arch) if arch != UNKNOWN else None
    resolution = None
    if known is not None:
        resolution = {"sd1": 512, "sd2": 768 if prediction == "v_prediction" else 512, "sdxl": 1024}[arch]
    elif refiner:
        resolution = 1024
    name, title = _title(arch, prediction, inpainting, refiner, in_channels)
    text_prefixes = (
        known.text_encoder_prefixes if known is not None else ("conditioner.", "cond_stage_model.")
    )
    return CheckpointVariant(
        arch=arch,
        name=name,
        title=title,
        prediction_type=prediction,
        prediction_source=source,
        zero_terminal_snr=ZTSNR_MARKER in header.tensors,
        in_channels=in_channels,
        inpainting=inpainting,
        refiner=refiner,
        ema=_ema_kind(header),
        has_unet=_has_prefix(header, UNET_PREFIX),
        has_vae=_has_prefix(header, "first_stage_model."),
        has_text_encoders=any(_has_prefix(header, p) for p in text_prefixes),
        resolution=resolution,
    )
