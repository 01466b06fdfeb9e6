"""Several sweep variants in one U-Net call, without touching the pipeline's parameters.

The batch holds `rows_per_variant` rows per variant, variant after variant; with classifier-free
guidance diffusers stacks two such halves (unconditional, conditional), so the variant of row r
is ``(r mod (variants × rows_per_variant)) // rows_per_variant`` either way. Every U-Net
parameter lives in a leaf module (Linear, Conv2d, GroupNorm, LayerNorm) that is called with
batch-first inputs. While a ``VariantBatch`` is entered, each leaf module some variant changes
computes the batch with its own (baseline) tensors and then each changing variant's rows again
with that variant's tensors; every other module computes the whole batch once.
So a variant's rows see exactly its own weights, and the pipeline's parameters never change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensors = dict[str, torch.Tensor]


def _linear(module: nn.Linear, x: torch.Tensor, weight, bias) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _conv2d(module: nn.Conv2d, x: torch.Tensor, weight, bias) -> torch.Tensor:
    return module._conv_forward(x, weight, bias)


def _group_norm(module: nn.GroupNorm, x: torch.Tensor, weight, bias) -> torch.Tensor:
    return F.group_norm(x, module.num_groups, weight, bias, module.eps)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor, weight, bias) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)


# Exact types: a subclass may compute something else in its forward.
_LEAF_FORWARDS: dict[type, Callable[..., torch.Tensor]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
}


class UnbatchableModule(ValueError):
    """A variant changes a parameter of a module whose forward is not a known leaf computation."""


def patches_by_module(patches: list[Tensors]) -> dict[str, dict[int, Tensors]]:
    """Per variant {U-Net parameter name: tensor} → {module name: {variant index: {"weight": …}}}."""
    by_module: dict[str, dict[int, Tensors]] = {}
    for index, patch in enumerate(patches):
        for name, tensor in patch.items():
            module_name, _, local = name.rpartition(".")
            by_module.setdefault(module_name, {}).setdefault(index, {})[local] = tensor
    return by_module


def check_batchable(unet: nn.Module, parameter_names) -> None:
    modules = dict(unet.named_modules())
    for name in parameter_names:
        module = modules[name.rpartition(".")[0]]
        if type(module) not in _LEAF_FORWARDS:
            raise UnbatchableModule(
                f"{name}: {type(module).__name__} is not a leaf module this batching knows"
            )


class VariantBatch:
    """Context manager: while entered, ``unet`` computes ``len(patches)`` variants side by side."""

    def __init__(self, unet: nn.Module, patches: list[Tensors], rows_per_variant: int) -> None:
        if not patches or rows_per_variant < 1:
            raise ValueError("a variant batch needs at least one variant and one row per variant")
        check_batchable(unet, [name for patch in patches for name in patch])
        self.unet = unet
        self.variants = len(patches)
        self.rows_per_variant = rows_per_variant
        self.by_module = patches_by_module(patches)
        self._wrapped: list[nn.Module] = []
        self._indices: dict[tuple, torch.Tensor] = {}

    def rows_of(self, rows: int, device: torch.device, variant: int) -> torch.Tensor:
        """Indices of the batch rows of one variant."""
        key = (rows, device, variant)
        if key not in self._indices:
            per_half = self.variants * self.rows_per_variant
            if rows % per_half:
                raise RuntimeError(
                    f"variant batching: a U-Net leaf got {rows} rows, not a multiple of "
                    f"{self.variants} variants × {self.rows_per_variant} rows"
                )
            first = torch.arange(0, rows, per_half) + variant * self.rows_per_variant
            own = first[:, None] + torch.arange(self.rows_per_variant)[None, :]
            self._indices[key] = own.flatten().to(device)
        return self._indices[key]

    def _forward_for(self, module: nn.Module, per_variant: dict[int, Tensors]):
        leaf = _LEAF_FORWARDS[type(module)]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.variants == 1:
                tensors = next(iter(per_variant.values()))  # the one variant changes this module
                return leaf(module, x, tensors.get("weight", module.weight), tensors.get("bias", module.bias))
            # Every row with the baseline's tensors, then the changing variants' rows again with
            # theirs: 1/variants more work per changing variant, but no copy of the other rows.
            out = leaf(module, x, module.weight, module.bias)
            for index, tensors in per_variant.items():
                own = self.rows_of(x.shape[0], x.device, index)
                weight, bias = tensors.get("weight", module.weight), tensors.get("bias", module.bias)
                out.index_copy_(0, own, leaf(module, x.index_select(0, own), weight, bias))
            return out

        return forward

    def __enter__(self) -> VariantBatch:
        modules = dict(self.unet.named_modules())
        try:
            for name, per_variant in self.by_module.items():
                module = modules[name]
                module.forward = self._forward_for(module, per_variant)  # shadows the class's forward
                self._wrapped.append(module)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for module in self._wrapped:
            del module.forward
        self._wrapped.clear()
