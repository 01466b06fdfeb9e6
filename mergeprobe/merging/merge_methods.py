"""Merge methods: the one place to add one.

Each method is a function of fp32 tensors `(a, b, c, alpha, beta, rng)` → tensor (c is None for
two-model merges; the tensors are fresh copies the method may overwrite), registered with the
rules everything else asks it about: which models it reads, its α and β (meaning, range,
defaults), its shortcuts, whether it is a lerp or element-wise, and the formula shown in the
API description. No other module compares method names. This module imports no torch at import time (the API
reads the registry); the functions import it when they run, in the worker.

α is model B's share everywhere, as in AUTOMATIC1111, kohya and SuperMerger. α and β arrive
per key, after block weights and elemental overrides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Tensor = Any  # torch.Tensor; not imported here so the API stays torch-free
Shortcut = Literal["copy_a", "copy_b"]

# |α| and |β| above this are refused: no merge means them, and fp32 arithmetic overflows long
# before float64's range (an α of 1e308 used to fail in the worker, not at submission).
RATIO_LIMIT = 1000.0


@dataclass(frozen=True)
class Ratio:
    """A per-key number a method reads (α or β): what it means, its range, and its defaults."""

    meaning: str
    low: float = -RATIO_LIMIT
    high: float = RATIO_LIMIT
    high_open: bool = False  # the range excludes `high` (dare's drop probability may not be 1)
    required: bool = False  # a request must give it
    # BASE's value when the request gives per-block values and no BASE value; None leaves the
    # method's own per-key default (scaled_sum's 1 − α).
    base_default: float | None = 0.0

    @property
    def range_text(self) -> str:
        return f"[{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def problem(self, value: float | None) -> str | None:
        """Why `value` is not allowed, or None when it is (None is the method's default)."""
        if value is None:
            return None
        if not (self.low <= value <= self.high) or (self.high_open and value == self.high):
            return f"must be in {self.range_text} ({self.meaning}); got {value:g}"
        return None


ALPHA = Ratio("model B's share")


@dataclass(frozen=True)
class MergeMethod:
    """A merge method and the rules the planner, the engine and the sweep ask it about."""

    name: str
    formula: str
    fn: Callable[..., Tensor]
    inputs: tuple[str, ...]  # the models it always reads: ("a", "b") or ("a", "b", "c")
    optional_inputs: tuple[str, ...]  # models it reads when the request gives them (ties, dare: C)
    alpha: Ratio
    beta: Ratio | None  # None: the method reads no β
    # True when the result at each element depends only on that element of the inputs,
    # so the engine may split large tensors into chunks (bounded memory).
    elementwise: bool
    # True when the result is torch.lerp(A, B, α): the engine may then compute it straight from
    # the stored half-precision views (same bytes, half the time; see worker/stream_merge).
    lerp: bool
    # (α, β) → an input the result equals exactly, so it is copied byte for byte; or None.
    shortcut: Callable[[float | None, float | None], Shortcut | None]

    @property
    def needs_c(self) -> bool:
        return "c" in self.inputs

    def accepts(self, slot: str) -> bool:
        return slot in self.inputs or slot in self.optional_inputs

    def ratio_problems(self, alpha: float | None, beta: float | None) -> list[tuple[str, str]]:
        """(`alpha` or `beta`, why) for each value this method does not accept."""
        problems = []
        if (why := self.alpha.problem(alpha)) is not None:
            problems.append(("alpha", f"{self.name}'s α {why}"))
        if self.beta is not None and (why := self.beta.problem(beta)) is not None:
            problems.append(("beta", f"{self.name}'s β {why}"))
        return problems


MERGE_METHODS: dict[str, MergeMethod] = {}


def _never(alpha: float | None, beta: float | None) -> Shortcut | None:
    return None


def merge_method(
    name: str,
    *,
    formula: str,
    inputs: str = "ab",
    optional_inputs: str = "",
    alpha: Ratio = ALPHA,
    beta: Ratio | None = None,
    elementwise: bool = True,
    lerp: bool = False,
    shortcut: Callable[[float | None, float | None], Shortcut | None] = _never,
):
    """Register a method: `fn(a, b, c, alpha, beta, rng)` on fp32 tensors, and its rules."""

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        MERGE_METHODS[name] = MergeMethod(
            name=name,
            formula=formula,
            fn=fn,
            inputs=tuple(inputs),
            optional_inputs=tuple(optional_inputs),
            alpha=alpha,
            beta=beta,
            elementwise=elementwise,
            lerp=lerp,
            shortcut=shortcut,
        )
        return fn

    return register


def _copy_a_when_alpha_0(alpha: float | None, beta: float | None) -> Shortcut | None:
    return "copy_a" if alpha == 0.0 else None


def _lerp_ends(alpha: float | None, beta: float | None) -> Shortcut | None:
    return {0.0: "copy_a", 1.0: "copy_b"}.get(alpha)  # type: ignore[return-value]


def _scaled_identity(alpha: float | None, beta: float | None) -> Shortcut | None:
    return "copy_a" if alpha == 0.0 and beta == 1.0 else None


@merge_method("weighted_sum", formula="(1 − α)·A + α·B", lerp=True, shortcut=_lerp_ends)
def weighted_sum(a, b, c, alpha, beta, rng):
    return a.lerp_(b, alpha) if a.is_floating_point() else a


@merge_method("add_difference", inputs="abc", formula="A + α·(B − C)", shortcut=_copy_a_when_alpha_0)
def add_difference(a, b, c, alpha, beta, rng):
    return a.add_(b.sub_(c), alpha=alpha)


@merge_method(
    "scaled_sum",
    formula="β·A + α·B, β defaulting per block to 1 − α (then equal to weighted_sum). With α = 0 and β = 0.75 "
    "on one block and 1 elsewhere it weakens that block to 75 % (the layer-influence study).",
    beta=Ratio("A's scale; defaults to 1 − α per block", base_default=None),
    shortcut=_scaled_identity,
)
def scaled_sum(a, b, c, alpha, beta, rng):
    scale_a = 1.0 - alpha if beta is None else beta
    return a.mul_(scale_a).add_(b, alpha=alpha)


@merge_method(
    "triple_sum",
    inputs="abc",
    formula="(1 − α − β)·A + α·B + β·C",
    beta=Ratio("C's share", required=True),
)
def triple_sum(a, b, c, alpha, beta, rng):
    return a.mul_(1.0 - alpha - beta).add_(b, alpha=alpha).add_(c, alpha=beta)


@merge_method(
    "sum_twice",
    inputs="abc",
    formula="(1 − β)·((1 − α)·A + α·B) + β·C",
    beta=Ratio("C's share of the second sum", required=True),
)
def sum_twice(a, b, c, alpha, beta, rng):
    return a.lerp_(b, alpha).lerp_(c, beta)


@merge_method(
    "train_difference",
    inputs="abc",
    formula="SuperMerger's trainDifference: A + 1.8·α·(B − C)·|B − A| / (|B − C| + |B − A|) "
    "(0 where both distances are 0): the B − C difference, scaled per element by how far B is from A.",
    shortcut=_copy_a_when_alpha_0,
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
    optional_inputs="c",
    formula="TIES-merging with A as the base: τᵢ = Mᵢ − A for M = B (and C when given); trim each τᵢ to "
    "its top-β share by magnitude; elect the sign γ = sign(Σ τᵢ); disjoint mean τ = mean of the τᵢ "
    "whose sign is γ (zeros excluded); result A + α·τ.",
    beta=Ratio("density: the share of each delta kept", low=0.0, high=1.0, required=True),
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
    optional_inputs="c",
    formula="DARE with A as the base: τᵢ = Mᵢ − A for M = B (and C when given); drop each element of "
    "τᵢ with probability β (seeded by `seed` and the key) and rescale the rest by 1/(1 − β); "
    "result A + α·Σ τᵢ.",
    beta=Ratio("drop probability", low=0.0, high=1.0, high_open=True, required=True),
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
