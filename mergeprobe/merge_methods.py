"""Merge methods: the one place to add one.

Each method is a function of fp32 tensors `(a, b, c, alpha, beta, rng)` → tensor (c is None for
two-model merges; the tensors are fresh copies the method may overwrite), registered
with what the API needs to validate a request (which models it reads, what β means) and the
formula shown in the API description. This module imports no torch at import time (the API
reads the registry); the functions import it when they run, in the worker.

α is model B's share everywhere, as in AUTOMATIC1111, kohya and SuperMerger. α and β arrive
per key, after block weights and elemental overrides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Tensor = Any  # torch.Tensor; not imported here so the API stays torch-free


@dataclass(frozen=True)
class MergeMethod:
    name: str
    models: str  # "ab" or "abc": the inputs it reads
    formula: str
    beta: str | None  # what β means for this method; None when it is unused
    beta_required: bool
    # True when the result at each element depends only on that element of the inputs,
    # so the engine may split large tensors into chunks (bounded memory).
    elementwise: bool
    fn: Callable[..., Tensor]

    @property
    def needs_c(self) -> bool:
        return "c" in self.models


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    models: str,
    formula: str,
    beta: str | None = None,
    beta_required: bool = False,
    elementwise: bool = True,
):
    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        MERGE_METHODS[name] = MergeMethod(name, models, formula, beta, beta_required, elementwise, fn)
        return fn

    return register


@merge_method("weighted_sum", models="ab", formula="(1 − α)·A + α·B")
def weighted_sum(a, b, c, alpha, beta, rng):
    return a.lerp_(b, alpha) if a.is_floating_point() else a


@merge_method("add_difference", models="abc", formula="A + α·(B − C)")
def add_difference(a, b, c, alpha, beta, rng):
    return a.add_(b.sub_(c), alpha=alpha)


@merge_method(
    "scaled_sum",
    models="ab",
    formula="β·A + α·B, β defaulting per block to 1 − α (then equal to weighted_sum). With α = 0 and β = 0.75 "
    "on one block and 1 elsewhere it weakens that block to 75 % (the layer-influence study).",
    beta="A's scale; defaults to 1 − α per block",
)
def scaled_sum(a, b, c, alpha, beta, rng):
    scale_a = 1.0 - alpha if beta is None else beta
    return a.mul_(scale_a).add_(b, alpha=alpha)


@merge_method(
    "triple_sum",
    models="abc",
    formula="(1 − α − β)·A + α·B + β·C",
    beta="C's share",
    beta_required=True,
)
def triple_sum(a, b, c, alpha, beta, rng):
    return a.mul_(1.0 - alpha - beta).add_(b, alpha=alpha).add_(c, alpha=beta)


@merge_method(
    "sum_twice",
    models="abc",
    formula="(1 − β)·((1 − α)·A + α·B) + β·C",
    beta="C's share of the second sum",
    beta_required=True,
)
def sum_twice(a, b, c, alpha, beta, rng):
    return a.lerp_(b, alpha).lerp_(c, beta)


@merge_method(
    "train_difference",
    models="abc",
    formula="SuperMerger's trainDifference: A + 1.8·α·(B − C)·|B − A| / (|B − C| + |B − A|) "
    "(0 where both distances are 0): the B − C difference, scaled per element by how far B is from A.",
)
def train_difference(a, b, c, alpha, beta, rng):
    import torch

    diff = b - c
    dist_ba = (b - a).abs_()
    total = diff.abs() + dist_ba
    scale = torch.where(
        total != 0, dist_ba / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total)
    )
    return a.add_(diff.mul_(scale), alpha=1.8 * alpha)


def _trim_to_density(delta, density: float):
    """Keep the top `density` share of a delta by magnitude, zero the rest (TIES' trim)."""
    import torch

    if density >= 1.0:
        return delta
    flat = delta.abs().flatten()
    keep = int(round(flat.numel() * max(density, 0.0)))
    if keep <= 0:
        return torch.zeros_like(delta)
    threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


@merge_method(
    "ties",
    models="ab",
    formula="TIES-merging with A as the base: τᵢ = Mᵢ − A for M = B (and C when given); trim each τᵢ to "
    "its top-β share by magnitude; elect the sign γ = sign(Σ τᵢ); disjoint mean τ = mean of the τᵢ "
    "whose sign is γ (zeros excluded); result A + α·τ.",
    beta="density: the share of each delta kept (0–1)",
    beta_required=True,
    elementwise=False,
)
def ties(a, b, c, alpha, beta, rng):
    import torch

    deltas = [_trim_to_density(m - a, beta) for m in (b, c) if m is not None]
    stacked = torch.stack(deltas)
    elected = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    count = agree.sum(dim=0).clamp_min(1)
    merged = (stacked * agree).sum(dim=0) / count
    return a.add_(merged, alpha=alpha)


@merge_method(
    "dare",
    models="ab",
    formula="DARE with A as the base: τᵢ = Mᵢ − A for M = B (and C when given); drop each element of "
    "τᵢ with probability β (seeded by `seed` and the key) and rescale the rest by 1/(1 − β); "
    "result A + α·Σ τᵢ.",
    beta="drop probability (0 ≤ β < 1)",
    beta_required=True,
)
def dare(a, b, c, alpha, beta, rng):
    import torch

    keep = 1.0 - beta
    deltas = [model.sub_(a) for model in (b, c) if model is not None]
    for delta in deltas:
        mask = torch.rand(delta.shape, generator=rng, device="cpu").to(delta.device) < keep
        a.add_(delta.mul_(mask).div_(keep), alpha=alpha)
    return a


@merge_method(
    "slerp",
    models="ab",
    formula="Spherical interpolation per tensor: Ω = arccos(⟨A/|A|, B/|B|⟩); "
    "sin((1 − α)Ω)/sin Ω · A + sin(αΩ)/sin Ω · B; (1 − α)·A + α·B when A and B are nearly "
    "parallel (|cos Ω| > 0.9995) or one is zero.",
    elementwise=False,
)
def slerp(a, b, c, alpha, beta, rng):
    import math

    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a == 0.0 or norm_b == 0.0:
        return a.lerp_(b, alpha)
    cos = max(-1.0, min(1.0, float((a * b).sum()) / (norm_a * norm_b)))
    if abs(cos) > 0.9995:
        return a.lerp_(b, alpha)
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return a.mul_(math.sin((1.0 - alpha) * omega) / sin_omega).add_(
        b, alpha=math.sin(alpha * omega) / sin_omega
    )
