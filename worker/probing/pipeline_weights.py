"""A loaded pipeline's parameters by LDM key, set in place from a merge plan and put back bit for bit.

Sweeps merge their baseline into model A's cached pipeline and add their LoRAs to it; dumps add
their LoRAs to the model's cached pipeline. Both compute every planned key with the
``PlanExecutor`` that writes merges (``worker.merging.merge_executor``), so what the pipeline holds
is bit for bit what a merge or bake job would write in fp32, and both keep the values they
overwrite (`PipelineWeights.saved`) to restore them when the job ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from mergeprobe.merging.merge_plan import MergePlan
from worker.checkpoints.checkpoint_io import TORCH_DTYPES, MappedCheckpoint
from worker.checkpoints.param_map import ldm_groups_of
from worker.merging.merge_executor import PlanExecutor

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# LDM tensors stored as the transpose of their diffusers parameter (OpenCLIP's orientation; see
# worker/ldm_convert.open_clip_to_ldm). Every other single-parameter key differs at most in shape.
_TRANSPOSED_IN_LDM = ("text_projection",)
_EXACT_IN_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32)


class PipelineWeights:
    """The pipeline's parameters by LDM key, set from a plan's keys (`worker.merging.merge_executor`)."""

    def __init__(self, pipe: Any, arch: str, sources: dict[str, MappedCheckpoint]) -> None:
        self.sources = sources
        self.device = pipe.unet.device  # where merged tensors are computed
        self.params: dict[tuple[str, str], torch.nn.Parameter] = {}
        for component in COMPONENTS:
            module = getattr(pipe, component, None)
            if module is not None:
                self.params.update({(component, n): p for n, p in module.named_parameters()})
        self.groups = ldm_groups_of(pipe, arch)
        self.a_values: dict[tuple[str, str], torch.Tensor] = {}  # model_a's values of params we changed

    def _a_held_exactly(self, key: str) -> torch.Tensor | None:
        """model_a's tensor as the pipeline holds it, flat, where that is exactly the file's value
        (a float32 pipeline, or the file's own dtype): no page faults, and already on the device."""
        group = self.groups[key]
        if len(group) != 1 or key.endswith(_TRANSPOSED_IN_LDM):
            return None
        value = self.a_values.get(group[0], self.params[group[0]].detach())
        stored = TORCH_DTYPES.get(self.sources["a"].header.tensors[key].dtype)
        if value.dtype != stored and not (value.dtype == torch.float32 and stored in _EXACT_IN_FLOAT32):
            return None
        return value.reshape(-1)

    def to_params(self, key: str, tensor: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """An LDM tensor cut into the pipeline parameters it feeds (q/k/v of a fused in_proj)."""
        group = self.groups[key]
        if len(group) == 1:
            if key.endswith(_TRANSPOSED_IN_LDM):
                tensor = tensor.t()
            return {group[0]: tensor.reshape(self.params[group[0]].shape)}
        rows = [self.params[param_id].shape[0] for param_id in group]
        return {
            param_id: part.reshape(self.params[param_id].shape)
            for param_id, part in zip(group, tensor.split(rows), strict=True)
        }

    def planned(self, plan: MergePlan, seed: int) -> Iterator[dict[tuple[str, str], torch.Tensor]]:
        """For each key of `plan` the pipeline holds, its value cut into parameters: copied keys as
        stored in their input, merged keys in fp32 exactly as a written merge computes them, and
        keys LoRA modules modify (`plan.loras`) as a merge with those LoRAs writes them in fp32."""
        executor = PlanExecutor(plan, self.sources, self.device, seed)
        for kp in plan.keys:
            if kp.key not in self.groups:
                continue
            held = self._a_held_exactly(kp.key)
            held_a = {"a": held} if held is not None else None
            if kp.key in plan.loras:
                yield self.to_params(kp.key, executor.with_loras(kp, held=held_a))
                continue
            copied = plan.copied_from(kp)
            if copied is not None:
                slot, key = copied
                yield self.to_params(kp.key, self.sources[slot].get(key))
                continue
            yield self.to_params(kp.key, executor.merged(kp, held=held_a))

    def assign(self, param_id, value: torch.Tensor) -> None:
        param = self.params[param_id]
        with torch.no_grad():
            param.copy_(value.to(param.dtype))

    def restore_a(self) -> None:
        """Every parameter `apply_plan` changed back to the value it had before, bit for bit."""
        with torch.no_grad():
            for param_id, value in self.a_values.items():
                self.params[param_id].copy_(value)
        self.a_values.clear()


def apply_plan(weights: PipelineWeights, plan: MergePlan, seed: int) -> None:
    """Put a plan's values into the pipeline: its merged keys and the keys its LoRAs modify (model
    A's own keys, copied from A without a LoRA, stay as loaded). Each parameter's previous value is
    kept first, so `restore_a` undoes what was done, also halfway."""
    keys = replace(
        plan, keys=[k for k in plan.keys if k.action not in ("copy_a", "keep_a") or k.key in plan.loras]
    )
    for values in weights.planned(keys, seed):
        for param_id, value in values.items():
            if param_id not in weights.a_values:
                weights.a_values[param_id] = weights.params[param_id].detach().clone()
            weights.assign(param_id, value)
