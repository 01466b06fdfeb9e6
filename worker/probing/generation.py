"""What dump and sweep jobs share: the worker's pipeline cache, samplers, prompt encoding."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader
from mergeprobe.probing.pipeline_configs import PipelineVariant, find_config_dir
from mergeprobe.service.settings import Settings
from worker.probing.pipelines import PipelineCache, load_pipeline, pick_device

_cache_lock = threading.Lock()
_cache: PipelineCache | None = None


def pipeline_cache(settings: Settings) -> PipelineCache:
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = PipelineCache(settings.pipeline_cache_bytes)
        return _cache


def make_scheduler(name: str, base_config):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(base_config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config)
    if name in ("dpmpp_2m", "dpmpp_2m_karras"):
        return DPMSolverMultistepScheduler.from_config(
            base_config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_karras_sigmas=name.endswith("karras"),
        )
    if name == "ddim":
        return DDIMScheduler.from_config(base_config)
    raise ValueError(f"unknown sampler {name}")


@dataclass
class PromptEncoder:
    """Each distinct prompt encoded once per job."""

    pipe: Any
    sdxl: bool
    device: torch.device
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def __call__(self, text: str, negative: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = ("-" if negative else "+") + text
        if key not in self.cache:
            with torch.no_grad():
                if self.sdxl:
                    embeds, _, pooled, _ = self.pipe.encode_prompt(
                        prompt=text,
                        device=self.device,
                        num_images_per_prompt=1,
                        do_classifier_free_guidance=False,
                    )
                    if negative and text == "" and self.pipe.config.force_zeros_for_empty_prompt:
                        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
                else:
                    embeds, _ = self.pipe.encode_prompt(
                        prompt=text,
                        device=self.device,
                        num_images_per_prompt=1,
                        do_classifier_free_guidance=False,
                    )
                    pooled = None
            self.cache[key] = (embeds, pooled)
        return self.cache[key]


def get_pipeline(
    settings: Settings, path: Path, header: CheckpointHeader, arch: str, sha256: str, variant: PipelineVariant
):
    """(pipeline, was it cached, device): loaded once per model version, scheduler variant and worker."""
    device, dtype = pick_device(settings.generation_dtype)
    config_dir = find_config_dir(arch, header, settings)
    key = f"{sha256}:{variant.prediction_type}:{'ztsnr' if variant.zero_terminal_snr else 'snr'}"
    pipe, cached = pipeline_cache(settings).get(
        key, lambda: load_pipeline(path, arch, config_dir, device, dtype, variant)
    )
    return pipe, cached, device
