"""Single-file checkpoints as diffusers pipelines, offline, cached between jobs.

Configs come from MERGEPROBE_PIPELINE_CONFIGS_DIR/<arch> (an override) or those shipped with the
project (the tiny test models' configs and the published sd1/sd2/sdxl ones); a tokenizer folder
without its vocabulary gets CLIP's, derived from the shipped merges. Nothing is fetched from a hub.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from mergeprobe.probing.pipeline_configs import PipelineVariant


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


def load_pipeline(
    path: Path,
    arch: str,
    config_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    variant: PipelineVariant | None = None,
):
    """The checkpoint as a diffusers pipeline. `variant` (decided at submission) sets the scheduler's
    prediction type and zero-terminal-SNR schedule; None keeps the config's scheduler as it is."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype)
    if variant is not None:
        # The shipped sd2 config is 2.1-768's (v-prediction), the others ε: the checkpoint decides.
        schedule: dict[str, object] = {"prediction_type": variant.prediction_type}
        if variant.zero_terminal_snr:
            schedule.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **schedule)
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
    """Loaded pipelines by key (model sha256 and scheduler variant), least recently used first out,
    bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0], True
        pipe = load()
        size = pipeline_bytes(pipe)
        with self._lock:
            self._entries[key] = (pipe, size)
            while len(self._entries) > 1 and sum(s for _, s in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        return pipe, False

    def __contains__(self, key: str) -> bool:
        return key in self._entries
