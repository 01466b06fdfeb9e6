"""Single-file checkpoints as diffusers pipelines, offline, cached between jobs.

Configs come from MERGEPROBE_PIPELINE_CONFIGS_DIR/<arch> or those shipped with the
project (the tiny test models' complete configs; the full-size ones lack the tokenizer,
which is too large to ship); nothing is ever fetched from a hub.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import torch

import mergeprobe
from mergeprobe.checkpoints.archs import get_arch
from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader
from mergeprobe.service.errors import Unprocessable
from mergeprobe.service.settings import Settings

SHIPPED_CONFIGS = Path(mergeprobe.__file__).resolve().parent / "configs"
_REQUIRED = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
)


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


def find_config_dir(arch: str, header: CheckpointHeader, settings: Settings) -> Path:
    candidates = []
    if settings.pipeline_configs_dir is not None:
        candidates.append(Path(settings.pipeline_configs_dir) / arch)
    candidates += [SHIPPED_CONFIGS / "tiny" / arch, SHIPPED_CONFIGS / "full" / arch]
    for candidate in candidates:
        if not _fits(candidate, header, arch):
            continue
        missing = [r for r in _REQUIRED if not (candidate / r).is_file()]
        tokenizers = ["tokenizer"] + (["tokenizer_2"] if arch == "sdxl" else [])
        missing += [f"{t}/" for t in tokenizers if not (candidate / t).is_dir()]
        if not missing:
            return candidate
    where = settings.pipeline_configs_dir or "<MERGEPROBE_PIPELINE_CONFIGS_DIR>"
    raise Unprocessable(
        "missing-pipeline-config",
        "Missing pipeline config",
        f"no complete diffusers config for this {arch} checkpoint: fill {where}/{arch} with model_index.json, "
        "unet/, vae/, text_encoder/, tokenizer/ (and text_encoder_2/, tokenizer_2/ for sdxl) and scheduler/ "
        "(the model's diffusers config folders, without weights); nothing is downloaded",
    )


def pick_device(generation_dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Device and precision for generation; `generation_dtype` is the setting of that name.

    `auto` is float16 on CUDA and float32 on a CPU. bfloat16 runs a CPU with native bfloat16
    (AVX512-BF16, AMX) about 2.5x faster, but it rounds away 3 of the 10 mantissa bits of an
    fp16 checkpoint's weights, so it is a choice the operator makes, not a default.
    """
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if generation_dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, generation_dtype)


def load_pipeline(path: Path, arch: str, config_dir: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_bytes(pipe) -> int:
    total = 0
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


class PipelineCache:
    """Loaded pipelines by model sha256, least recently used first out, bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha256: str, load):
        with self._lock:
            if sha256 in self._entries:
                self._entries.move_to_end(sha256)
                return self._entries[sha256][0], True
        pipe = load()
        size = pipeline_bytes(pipe)
        with self._lock:
            self._entries[sha256] = (pipe, size)
            while len(self._entries) > 1 and sum(s for _, s in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        return pipe, False

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._entries
