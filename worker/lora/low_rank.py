"""A layer's update ΔW reduced to LoRA factors up · down of low rank, and the error of doing so.

Both LoRA-writing jobs use it: lora_extract on tuned − base, lora_merge's `svd` mode on the sum of
its inputs' updates. ΔW is handled as the matrix (out, in·kh·kw); up = U·S and down = Vᵀ, as
sd-scripts' extract_lora_from_models.py and svd_merge_lora.py split them, so alpha = rank (scale 1).

The randomised SVD is Halko, Martinsson & Tropp's (2011) range finder with `POWER_ITERATIONS`
power iterations and `OVERSAMPLE` extra columns, with a QR after each product for stability; it is
seeded per layer, so a job gives the same file on every run on one device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

OVERSAMPLE = 8
POWER_ITERATIONS = 2


@dataclass
class LowRankFactors:
    up: torch.Tensor  # (out, rank), float32
    down: torch.Tensor  # (rank, in·kh·kw), float32
    singular_values: torch.Tensor  # the ones computed, descending

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def layer_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """The random draws of one layer's randomised SVD: from the job's seed and the layer's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def chosen_rank(singular_values: torch.Tensor, total_energy: float, cap: int, energy: float | None) -> int:
    """The cap, or with `energy` the smallest rank whose singular values hold that share of the
    squared Frobenius norm `total_energy` (at most the cap, at least 1)."""
    available = min(cap, singular_values.numel())
    if energy is None or total_energy <= 0:
        return max(1, available)
    kept = torch.cumsum(singular_values[:available].double() ** 2, 0)
    reached = torch.nonzero(kept >= energy * total_energy)
    return max(1, int(reached[0]) + 1 if reached.numel() else available)


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix, mode="reduced").Q


def _svd(matrix: torch.Tensor, columns: int, generator: torch.Generator | None):
    """(U, S, Vh) of the `columns` leading singular triplets: exact, or randomised with a generator."""
    rows, cols = matrix.shape
    if generator is None or columns >= min(rows, cols):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :columns], s[:columns], vh[:columns]
    probe = torch.randn(cols, columns, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = _orthonormal(matrix @ probe)
    for _ in range(POWER_ITERATIONS):
        basis = _orthonormal(matrix @ _orthonormal(matrix.T @ basis))
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u_small, s, vh


def low_rank(
    delta: torch.Tensor, cap: int, *, energy: float | None = None, generator: torch.Generator | None = None
) -> LowRankFactors:
    """Factors of the 2-D float32 `delta` at the rank `chosen_rank` picks; randomised when a
    `generator` is given (and the rank is below the matrix's), else the exact SVD."""
    columns = min(cap + (OVERSAMPLE if generator is not None else 0), *delta.shape)
    u, s, vh = _svd(delta, columns, generator)
    rank = chosen_rank(s, squared_norm(delta), cap, energy)
    return LowRankFactors(u[:, :rank] * s[:rank], vh[:rank].contiguous(), s)


def low_rank_of_product(
    up: torch.Tensor, down: torch.Tensor, cap: int, *, energy: float | None = None
) -> LowRankFactors:
    """Factors of up · down (up: out × R, down: R × in) at rank ≤ cap without forming the product:
    with up = Q₁R₁ and downᵀ = Q₂R₂, the SVD of the R × R matrix R₁R₂ᵀ gives the exact singular
    triplets (sd-scripts' svd_merge_lora.py forms the out × in matrix instead)."""
    q_up, r_up = torch.linalg.qr(up, mode="reduced")
    q_down, r_down = torch.linalg.qr(down.T, mode="reduced")
    u_small, s, vh_small = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    total = float(s.double().square().sum())
    rank = chosen_rank(s, total, cap, energy)
    u = q_up @ u_small[:, :rank]
    vh = (q_down @ vh_small[:rank].T).T
    return LowRankFactors(u * s[:rank], vh.contiguous(), s)


def clamp_to_quantile(factors: LowRankFactors, quantile: float) -> None:
    """sd-scripts' extractor's clamp: both factors to ± the `quantile` of all their (signed) values,
    interpolated linearly as torch.quantile does (which refuses more than 16 M values)."""
    values = torch.cat([factors.up.flatten(), factors.down.flatten()])
    position = torch.tensor(quantile, dtype=values.dtype) * (
        values.numel() - 1
    )  # in the values' dtype, as torch
    below = int(position.floor())
    low = values.kthvalue(below + 1).values
    high = values.kthvalue(min(below + 2, values.numel())).values
    limit = float(torch.lerp(low, high, position - below))
    factors.up.clamp_(-limit, limit)
    factors.down.clamp_(-limit, limit)


def squared_norm(matrix: torch.Tensor) -> float:
    """‖matrix‖² (Frobenius); torch's norm kernel sums in a numerically safe order, without copies."""
    return float(torch.linalg.vector_norm(matrix)) ** 2


def relative_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[float, float]:
    """(‖delta − up·down‖², ‖delta‖²) of the stored factors (any dtype), in float32 arithmetic."""
    residual = torch.addmm(delta, up.to(delta.dtype), down.to(delta.dtype), alpha=-1)
    return squared_norm(residual), squared_norm(delta)
