"""Merge methods: the one place to add one.

Each method is a function of fp32 tensors `(a, b, c, alpha, beta, rng)` → tensor (c is None for
two-model merges; the tensors are fresh copies the method may overwrite), registered with the
rules everything else asks it about: which models it reads, its α and β (meaning, range,
defaults), its shortcuts, whether it is a lerp or element-wise, and the formula shown in the
API description. No other module compares method names. This module imports no torch at import time (the API
reads the registry); the functions import it when they run, in the worker.

α is model B's share everywhere, as in AUTOMATIC1111, kohya and SuperMerger. α and β arrive
per key, after block weights and elemental overrides.

TIES, DARE and slerp come in two conventions, each a method of its own: the papers' (`ties`,
`dare`, `slerp`, the defaults) and sd-mecha's (`ties_sd_mecha`, `dare_sd_mecha`,
`slerp_sd_mecha`), so that a recipe written for sd-mecha reproduces; each formula says how.
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

    @property
    def description(self) -> str:
        """What it means, its range and whether a request must give it (the API description)."""
        return f"{self.meaning}, in {self.range_text}{', required' if self.required else ''}"

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


# --------------------------------------------------------------------- TIES, DARE and slerp
#
# Each in two conventions: the papers' (`ties`, `dare`, `slerp`, the defaults) and sd-mecha's
# (github.com/ljleb/sd-mecha, sd_mecha/extensions/builtin/merge_methods/; `*_sd_mecha`), a merging
# library many recipes are written in, whose defaults differ in ways that change the result. The
# sd-mecha variants follow its source at version 1.1.5 (2026-03); the comments name the function each
# step reproduces.


def _keep_largest(delta, keep: int):
    """Zero all but the `keep` largest elements of a delta by magnitude. Elements tied with the
    smallest kept magnitude are kept too: both conventions keep `|τ| ≥ threshold`."""
    import torch

    numel = delta.numel()
    if keep >= numel:
        return delta
    if keep <= 0:
        return torch.zeros_like(delta)
    magnitudes = delta.abs()
    threshold = torch.kthvalue(magnitudes.flatten(), numel - keep + 1).values
    return torch.where(magnitudes >= threshold, delta, torch.zeros_like(delta))


def _trim_to_density(delta, density: float):
    """TIES' trim as in the paper: keep the top `density` share of a delta by magnitude (the
    count rounded to nearest; density 0 keeps nothing)."""
    return _keep_largest(delta, round(delta.numel() * max(density, 0.0)))


def _trim_like_sd_mecha(delta, k: float):
    """sd-mecha's trim (ties.py `filter_top_k`): the threshold is the j-th smallest magnitude,
    j = max(int((1 − k)·n), 1), computed in float64 and truncated as there. It keeps n − j + 1
    elements: one more than k·n when that is whole (k = 0.5 of 4 keeps 3), at least the largest
    (k = 0), and more again where rounding puts (1 − k)·n just below a whole number
    ((1 − 0.8)·10 = 1.9999999999999996, so k = 0.8 of 10 elements keeps all 10)."""
    numel = delta.numel()
    threshold_rank = max(int((1.0 - k) * numel), 1)
    return _keep_largest(delta, numel - threshold_rank + 1)


def _disjoint_mean(deltas, elected):
    """TIES' disjoint merge of stacked deltas: per element, the mean of the deltas whose sign is
    the elected one; 0 where the elected sign is 0 or no delta has it."""
    import torch

    agree = (torch.sign(deltas) == elected) & (deltas != 0)
    return (deltas * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)


def _add_scaled_like_sd_mecha(a, delta, alpha: float):
    """A + α·τ as sd-mecha's add_difference computes it (linear.py: A as it is when α is 0, else
    `a.addcmul(delta, alpha)` with α a float32 tensor, as its merging.py `cast_node_value` makes
    it), so the rounding is the same."""
    import torch

    if alpha == 0.0:
        return a
    return a.addcmul_(delta, torch.tensor(alpha, dtype=a.dtype, device=a.device))


@merge_method(
    "ties",
    optional_inputs="c",
    formula="TIES-merging as in the paper (Yadav et al. 2023), A as the base: τᵢ = Mᵢ − A for M = B "
    "(and C when given); trim each τᵢ to its top-β share by magnitude (round(β·n) elements); elect "
    "the sign γ = sign(Σ τᵢ), a vote weighted by size; disjoint mean τ = mean of the τᵢ whose sign "
    "is γ (zeros excluded); result A + α·τ. sd-mecha's add_difference_ties votes by count and "
    "trims differently: use `ties_sd_mecha` to reproduce an sd-mecha recipe",
    beta=Ratio("density: the share of each delta kept", low=0.0, high=1.0, required=True),
    elementwise=False,
)
def ties(a, b, c, alpha, beta, rng):
    import torch

    deltas = torch.stack([_trim_to_density(m - a, beta) for m in (b, c) if m is not None])
    elected = torch.sign(deltas.sum(dim=0))  # the paper's vote: the sign of the summed deltas
    return a.add_(_disjoint_mean(deltas, elected), alpha=alpha)


@merge_method(
    "ties_sd_mecha",
    optional_inputs="c",
    formula="TIES-merging as sd-mecha's add_difference_ties computes it (ties.py ties_sum, "
    "vote_sgn=False), so an sd-mecha recipe reproduces: τᵢ = Mᵢ − A for M = B (and C when given); "
    "trim each τᵢ of n elements to those at least as large in magnitude as its j-th smallest, j = "
    "max(int((1 − β)·n), 1) (sd-mecha's filter_top_k: one more than β·n, at least the largest, "
    "all of them when β = 1); elect the sign by count, γ = sign(Σ sign τᵢ), one vote per model, "
    "so where B and C disagree in sign γ = 0 and τ = 0 whatever their sizes; τ = mean of the τᵢ "
    "whose sign is γ (0 where none); result A + α·τ (A as it is when α = 0). α is sd-mecha's "
    "`alpha` (default 1.0 there), β its `k` (default 1.0 there, required here). Fixed at "
    "sd-mecha's default: vote_sgn=False. Not add_difference_ties_extended (k 0.2 and a "
    "model-stock factor by default)",
    beta=Ratio("sd-mecha's k: the share of each delta kept", low=0.0, high=1.0, required=True),
    elementwise=False,
    shortcut=_copy_a_when_alpha_0,  # sd-mecha's add_difference returns A as it is when α is 0
)
def ties_sd_mecha(a, b, c, alpha, beta, rng):
    import torch

    deltas = torch.stack([_trim_like_sd_mecha(m - a, beta) for m in (b, c) if m is not None])
    # ties.py ties_sum_deltas with vote_sgn=False: the sign of the summed signs, one vote per model
    elected = torch.sign(torch.sign(deltas).sum(dim=0))
    return _add_scaled_like_sd_mecha(a, _disjoint_mean(deltas, elected), alpha)


def _dare_keep_masks(deltas, keep: float, rng):
    """One mask per delta (B's, then C's), each element kept with probability `keep`. Both DAREs
    draw them so: with the same generator they keep the same elements."""
    import torch

    return [torch.rand(delta.shape, generator=rng, device="cpu").to(delta.device) < keep for delta in deltas]


@merge_method(
    "dare",
    optional_inputs="c",
    formula="DARE as in the paper (Yu et al. 2023), A as the base: τᵢ = Mᵢ − A for M = B (and C when "
    "given); drop each element of τᵢ with probability β (seeded by `seed` and the key) and rescale "
    "the rest by 1/(1 − β); result A + α·Σ τᵢ, the kept deltas of B and C summed. sd-mecha's "
    "dropout averages them instead: use `dare_sd_mecha` to reproduce an sd-mecha recipe",
    beta=Ratio("drop probability", low=0.0, high=1.0, high_open=True, required=True),
)
def dare(a, b, c, alpha, beta, rng):
    keep = 1.0 - beta
    deltas = [model.sub_(a) for model in (b, c) if model is not None]
    for delta, mask in zip(deltas, _dare_keep_masks(deltas, keep, rng), strict=True):
        a.add_(delta.mul_(mask).div_(keep), alpha=alpha)
    return a


def _copy_a_when_alpha_0_or_all_dropped(alpha: float | None, beta: float | None) -> Shortcut | None:
    return "copy_a" if alpha == 0.0 or beta == 1.0 else None


@merge_method(
    "dare_sd_mecha",
    optional_inputs="c",
    formula="DARE as sd-mecha's dropout computes it (wrappers.py dropout → ties.py dropout, "
    "“n-supermario”), so an sd-mecha recipe reproduces: τᵢ = Mᵢ − A for M = B (and C when given); "
    "keep each element of each τᵢ with probability 1 − β, independently (seeded by `seed` and the "
    "key: the same distribution as sd-mecha's numpy draws, not the same elements); per element, "
    "the mean of the kept τᵢ (0 where none is kept), divided by 1 − β (β = 1 drops everything: "
    "A); result A + α·τ (A as it is when α = 0). With B alone this is `dare`; with C, where both "
    "are kept, it averages where `dare` sums. α is sd-mecha's `alpha` (default 0.5 there), β its "
    "`probability` (default 0.9 there, required here). Fixed at sd-mecha's defaults: rescale=1 "
    "(divide by (1 − β)¹), overlap=1 (independent masks), overlap_emphasis=0. Not "
    "add_ties_with_dare",
    beta=Ratio("sd-mecha's probability: the drop probability", low=0.0, high=1.0, required=True),
    shortcut=_copy_a_when_alpha_0_or_all_dropped,
)
def dare_sd_mecha(a, b, c, alpha, beta, rng):
    # ties.py dropout: probability 1 keeps nothing and does not rescale (no 0/0); α = 0: see
    # _add_scaled_like_sd_mecha. No draws are needed for either.
    if beta == 1.0 or alpha == 0.0:
        return a
    keep = 1.0 - beta
    deltas = [model.sub_(a) for model in (b, c) if model is not None]
    masks = _dare_keep_masks(deltas, keep, rng)
    kept_sum = deltas[0].mul_(masks[0])
    for delta, mask in zip(deltas[1:], masks[1:], strict=True):
        kept_sum.add_(delta.mul_(mask))
    kept_count = sum(masks[1:], masks[0].long()).clamp_min(1)
    # ties.py dropout: the kept sum over the kept count, then over (1 − probability)**rescale
    return _add_scaled_like_sd_mecha(a, kept_sum.div_(kept_count).div_(keep), alpha)


@merge_method(
    "slerp",
    formula="Spherical interpolation as in the paper (Shoemake 1985), of the tensors as they are (not "
    "normalised): Ω = arccos(⟨A/|A|, B/|B|⟩); sin((1 − α)Ω)/sin Ω · A + sin(αΩ)/sin Ω · B; (1 − "
    "α)·A + α·B when A and B are nearly parallel (|cos Ω| > 0.9995) or one is zero. sd-mecha's "
    "slerp interpolates the unit vectors and rescales to the interpolated norm: use "
    "`slerp_sd_mecha` to reproduce it",
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


@merge_method(
    "slerp_sd_mecha",
    formula="Spherical interpolation as sd-mecha's slerp computes it (linear.py slerp), so an sd-mecha "
    "recipe reproduces: Â = A/|A|, B̂ = B/|B|, Ω = arccos(clamp(⟨Â, B̂⟩, −1, 1)); (sin((1 − "
    "α)Ω)·Â + sin(αΩ)·B̂)/sin Ω, rescaled to the interpolated norm (1 − α)·|A| + α·|B|; (1 − α)·A "
    "+ α·B wherever that gives NaN (A or B zero, or ⟨Â, B̂⟩ rounding to exactly 1). No threshold "
    "otherwise: nearly parallel tensors follow the arc, and anti-parallel ones get sd-mecha's "
    "ill-conditioned result (sin Ω ≈ 0 in float32, not 0; at α = 0.5 a zero tensor), not a lerp. "
    "Computed in float32 like sd-mecha's default merge_dtype. α is sd-mecha's `alpha` (default "
    "0.5 there); it has no other parameter",
    elementwise=False,
)
def slerp_sd_mecha(a, b, c, alpha, beta, rng):
    import torch

    # sd-mecha passes α as a float32 tensor (merging.py cast_node_value): (1 − α) rounds as there
    weight = torch.tensor(alpha, dtype=a.dtype, device=a.device)
    norm_a, norm_b = a.norm(), b.norm()
    unit_a, unit_b = a / norm_a, b / norm_b
    omega = torch.arccos((unit_a * unit_b).sum().clamp(-1, 1))
    result = (unit_a * torch.sin((1 - weight) * omega) + unit_b * torch.sin(weight * omega)) / torch.sin(
        omega
    )
    result *= torch.lerp(norm_a, norm_b, weight)  # the step that differs from `slerp`
    if result.isnan().any():  # sd-mecha's only fallback: zero norms and sin Ω = 0 give NaN
        return a.lerp_(b, weight)
    return result
