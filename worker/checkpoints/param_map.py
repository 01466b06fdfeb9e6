"""Which single-file (LDM) key each parameter of a loaded diffusers pipeline comes from.

Found by running our own diffusers → LDM converters (worker/checkpoints/ldm_convert.py) on a state dict
whose every entry is a one-element tensor holding its own index: renames, reshapes,
transposes and q/k/v concatenations all carry the index along, so each LDM tensor names
the parameters it was built from. No weights are touched or copied.
"""

from __future__ import annotations

from typing import Any

import torch

from worker.checkpoints import ldm_convert as lc

Component = str  # "unet", "vae", "text_encoder", "text_encoder_2"


def _tagged(module: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    names = [name for name, _ in module.named_parameters()]
    return names, {name: torch.tensor([float(i)], dtype=torch.float64) for i, name in enumerate(names)}


def ldm_groups_of(pipe: Any, arch: str) -> dict[str, list[tuple[Component, str]]]:
    """LDM key → the parameters its tensor is built from, in the order it stacks them along dim 0
    (OpenCLIP's fused in_proj holds q, k, v); most keys have exactly one."""
    groups: dict[str, list[tuple[Component, str]]] = {}
    converters: list[tuple[Component, Any]] = [("unet", lc.unet_to_ldm), ("vae", lc.vae_to_ldm)]
    if arch == "sd1":
        converters.append(("text_encoder", lambda sd: lc.clip_l_to_ldm(sd, lc.SD1_CLIP_PREFIX)))
    elif arch == "sd2":
        converters.append(("text_encoder", lambda sd: lc.open_clip_to_ldm(sd, lc.SD2_OPENCLIP_PREFIX)))
    else:
        converters.append(("text_encoder", lambda sd: lc.clip_l_to_ldm(sd, lc.SDXL_CLIP_L_PREFIX)))
        converters.append(("text_encoder_2", lambda sd: lc.open_clip_to_ldm(sd, lc.SDXL_OPENCLIP_PREFIX)))
    for component, convert in converters:
        names, tagged = _tagged(getattr(pipe, component))
        for ldm_key, tensor in convert(tagged).items():
            if not tensor.is_floating_point() or tensor.dtype != torch.float64:
                continue  # generated buffers (position_ids, logit_scale) come from no parameter
            groups[ldm_key] = [(component, names[int(value)]) for value in tensor.reshape(-1).tolist()]
    return groups


def ldm_keys_of(pipe: Any, arch: str) -> dict[tuple[Component, str], str]:
    """(component, parameter name) → the LDM key it corresponds to."""
    return {param: key for key, params in ldm_groups_of(pipe, arch).items() for param in params}
