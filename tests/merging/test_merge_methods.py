"""Every merge method's formula, pinned on tiny hand-made tensors.

Expected values are computed by hand (in the comments) from chosen inputs, mostly values that
are exact in binary floating point, so most comparisons are exact; none of them re-implements a
method. Each call gets fresh fp32 tensors, as the engine gives them (methods may overwrite them).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from mergeprobe.merging.merge_methods import MERGE_METHODS

ALL_METHODS = {
    "weighted_sum",
    "add_difference",
    "scaled_sum",
    "triple_sum",
    "sum_twice",
    "train_difference",
    "ties",
    "dare",
    "slerp",
}

A = [1.0, 2.0, -3.0, 0.5]
B = [3.0, 0.0, 1.0, 0.5]
C = [1.0, 1.0, 1.0, 1.0]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def run(name: str, a, b, c=None, alpha: float = 0.5, beta: float | None = None, rng=None) -> torch.Tensor:
    """The method on fresh fp32 copies of the inputs (it may overwrite them)."""
    return MERGE_METHODS[name].fn(t(a), t(b), None if c is None else t(c), alpha, beta, rng)


def assert_values(actual: torch.Tensor, expected, *, exact: bool = True) -> None:
    expected_t = t(expected)
    assert actual.dtype == torch.float32
    assert actual.shape == expected_t.shape
    if exact:
        assert torch.equal(actual, expected_t), f"{actual.tolist()} != {expected}"
    else:
        torch.testing.assert_close(actual, expected_t, rtol=1e-6, atol=1e-6)


def rng(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


# ------------------------------------------------------------------------------------ registry


def test_registry_names():
    assert set(MERGE_METHODS) == ALL_METHODS
    for name, method in MERGE_METHODS.items():
        assert method.name == name
        assert method.formula.strip()
        assert callable(method.fn)


def test_registry_metadata():
    needs_c = {name for name, m in MERGE_METHODS.items() if m.needs_c}
    assert needs_c == {"add_difference", "triple_sum", "sum_twice", "train_difference"}
    assert {name for name, m in MERGE_METHODS.items() if m.inputs == ("a", "b")} == ALL_METHODS - needs_c
    assert {name for name, m in MERGE_METHODS.items() if m.accepts("c") and not m.needs_c} == {"ties", "dare"}
    beta_required = {name for name, m in MERGE_METHODS.items() if m.beta is not None and m.beta.required}
    assert beta_required == {"triple_sum", "sum_twice", "ties", "dare"}
    uses_beta = {name for name, m in MERGE_METHODS.items() if m.beta is not None}
    assert uses_beta == beta_required | {"scaled_sum"}
    not_elementwise = {name for name, m in MERGE_METHODS.items() if not m.elementwise}
    assert not_elementwise == {"ties", "slerp"}
    assert {name for name, m in MERGE_METHODS.items() if m.lerp} == {"weighted_sum"}


def test_methods_state_their_ranges():
    dare, ties, weighted = MERGE_METHODS["dare"], MERGE_METHODS["ties"], MERGE_METHODS["weighted_sum"]
    assert dare.ratio_problems(0.5, 0.0) == [] and dare.ratio_problems(0.5, 0.999) == []
    assert [param for param, _ in dare.ratio_problems(0.5, 1.0)] == ["beta"]
    assert "[0, 1)" in dare.ratio_problems(0.5, 1.0)[0][1]
    assert ties.ratio_problems(1.0, 1.0) == [] and ties.ratio_problems(1.0, -0.1) != []
    assert weighted.ratio_problems(1e308, None)[0][0] == "alpha"
    assert weighted.ratio_problems(-2.0, None) == []  # extrapolation is a merge users make


def test_shortcuts_are_the_methods_own():
    shortcuts = {
        name: (m.shortcut(0.0, None), m.shortcut(1.0, None), m.shortcut(0.0, 1.0))
        for name, m in MERGE_METHODS.items()
    }
    assert shortcuts["weighted_sum"] == ("copy_a", "copy_b", "copy_a")
    assert shortcuts["add_difference"] == shortcuts["train_difference"] == ("copy_a", None, "copy_a")
    assert shortcuts["scaled_sum"] == (None, None, "copy_a")
    assert shortcuts["dare"] == shortcuts["slerp"] == (None, None, None)


def test_import_does_not_import_torch():
    code = "import sys, mergeprobe.merging.merge_methods as m; assert m.MERGE_METHODS; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------- weighted sums


def test_weighted_sum():
    # (1 − 0.25)·A + 0.25·B = 0.75·[1, 2, −3, 0.5] + 0.25·[3, 0, 1, 0.5]
    assert_values(run("weighted_sum", A, B, alpha=0.25), [1.5, 1.5, -2.0, 0.5])
    assert_values(run("weighted_sum", A, B, alpha=0.75), [2.5, 0.5, 0.0, 0.5])
    assert_values(run("weighted_sum", A, B, alpha=0.0), A)
    assert_values(run("weighted_sum", A, B, alpha=1.0), B)
    # α outside [0, 1] extrapolates: 1.5·B − 0.5·A
    assert_values(run("weighted_sum", A, B, alpha=1.5), [4.0, -1.0, 3.0, 0.5])


def test_add_difference():
    # B − C = [2, −1, 0, −0.5]; A + 0.5·(B − C)
    assert_values(run("add_difference", A, B, C, alpha=0.5), [2.0, 1.5, -3.0, 0.25])
    assert_values(run("add_difference", A, B, C, alpha=1.0), [3.0, 1.0, -3.0, 0.0])
    assert_values(run("add_difference", A, B, C, alpha=0.0), A)


def test_scaled_sum():
    # β·A + α·B with β = 2, α = 0.5
    assert_values(run("scaled_sum", A, B, alpha=0.5, beta=2.0), [3.5, 4.0, -5.5, 1.25])
    # α = 0, β = 0.75: A weakened to 75 %
    assert_values(run("scaled_sum", A, B, alpha=0.0, beta=0.75), [0.75, 1.5, -2.25, 0.375])


def test_scaled_sum_without_beta_is_weighted_sum():
    # β = None → 1 − α: the weighted_sum numbers above
    assert_values(run("scaled_sum", A, B, alpha=0.25, beta=None), [1.5, 1.5, -2.0, 0.5])
    assert_values(run("scaled_sum", A, B, alpha=0.75, beta=None), [2.5, 0.5, 0.0, 0.5])


def test_triple_sum():
    # (1 − 0.25 − 0.5)·A + 0.25·B + 0.5·C = [0.25, 0.5, −0.75, 0.125] + [0.75, 0, 0.25, 0.125] + 0.5
    assert_values(run("triple_sum", A, B, C, alpha=0.25, beta=0.5), [1.5, 1.0, 0.0, 0.75])
    assert_values(run("triple_sum", A, B, C, alpha=0.0, beta=0.0), A)
    assert_values(run("triple_sum", A, B, C, alpha=0.0, beta=1.0), C)


def test_sum_twice():
    # inner = 0.75·A + 0.25·B = [1.5, 1.5, −2, 0.5]; 0.5·inner + 0.5·C
    assert_values(run("sum_twice", A, B, C, alpha=0.25, beta=0.5), [1.25, 1.25, -0.5, 0.75])
    assert_values(run("sum_twice", A, B, C, alpha=0.25, beta=0.0), [1.5, 1.5, -2.0, 0.5])
    assert_values(run("sum_twice", A, B, C, alpha=0.25, beta=1.0), C)


def test_train_difference():
    a = [0.0, 1.0, 2.0, 5.0, 10.0]
    b = [1.0, 1.0, 4.0, 5.0, 0.0]
    c = [3.0, 1.0, 2.0, 2.0, 0.0]
    # e0: B − C = −2, |B − A| = 1, |B − C| = 2 → scale 1/3 → 0 + 1.8·0.5·(−2/3) = −0.6
    # e1: both distances 0 → no change: 1
    # e2: B − C = 2, |B − A| = 2, |B − C| = 2 → scale 1/2 → 2 + 0.9·1 = 2.9
    # e3: B = A → scale 0 → 5 (although B − C = 3)
    # e4: B = C → no difference to add → 10 (although B is far from A)
    assert_values(run("train_difference", a, b, c, alpha=0.5), [-0.6, 1.0, 2.9, 5.0, 10.0], exact=False)
    # α = 1: e0 → −1.2, e2 → 2 + 1.8 = 3.8
    assert_values(run("train_difference", a, b, c, alpha=1.0), [-1.2, 1.0, 3.8, 5.0, 10.0], exact=False)
    assert_values(run("train_difference", a, b, c, alpha=0.0), a)


def test_train_difference_all_equal_is_a_and_finite():
    same = [0.0, 0.0, 3.0]
    out = run("train_difference", same, same, same, alpha=1.0)
    assert_values(out, same)


# -------------------------------------------------------------------------------------------- ties

ONES6 = [1.0] * 6
TAU_B = [0.5, -3.0, 2.0, -2.0, 0.1, 0.0]
TAU_C = [-1.0, -1.0, 4.0, 3.0, 0.0, 0.2]


def plus(base, delta):
    return [x + d for x, d in zip(base, delta, strict=True)]


def test_ties_two_models_with_tie_at_threshold():
    # τ_B = B − A = [0.5, −3, 2, −2, 0.1, 0]; β = 1/3 → keep round(6/3) = 2 by magnitude:
    # 3 and then 2 — but |2| and |−2| tie at the threshold, and both are kept: [0, −3, 2, −2, 0, 0].
    # One model: every kept element agrees with its own sign, τ = trimmed τ_B; A + 0.5·τ.
    out = run("ties", ONES6, plus(ONES6, TAU_B), alpha=0.5, beta=1 / 3)
    assert_values(out, [1.0, -0.5, 2.0, 0.0, 1.0, 1.0])


def test_ties_two_models_density_one_and_zero():
    out = run("ties", ONES6, plus(ONES6, TAU_B), alpha=1.0, beta=1.0)  # nothing trimmed: B
    assert_values(out, plus(ONES6, TAU_B))
    out = run("ties", ONES6, plus(ONES6, TAU_B), alpha=1.0, beta=0.0)  # everything trimmed: A
    assert_values(out, ONES6)


def test_ties_three_models():
    # β = 0.5 → keep round(3) = 3 per delta.
    # τ_B: magnitudes [0.5, 3, 2, 2, 0.1, 0] → threshold 2 → [0, −3, 2, −2, 0, 0]
    # τ_C: magnitudes [1, 1, 4, 3, 0, 0.2] → threshold 1 (a tie: 4 kept) → [−1, −1, 4, 3, 0, 0]
    # Σ = [−1, −4, 6, 1, 0, 0] → elected sign [−, −, +, +, 0, 0]
    # e0: only C (−1) → −1; e1: both agree → mean(−3, −1) = −2; e2: mean(2, 4) = 3;
    # e3: B says −2, C says +3, elected + → only C: 3; e4, e5: nothing kept → 0.
    # τ = [−1, −2, 3, 3, 0, 0]; A + 0.5·τ
    out = run("ties", ONES6, plus(ONES6, TAU_B), plus(ONES6, TAU_C), alpha=0.5, beta=0.5)
    assert_values(out, [0.5, 0.0, 2.5, 2.5, 1.0, 1.0])
    out = run("ties", ONES6, plus(ONES6, TAU_B), plus(ONES6, TAU_C), alpha=1.0, beta=0.5)
    assert_values(out, [0.0, -1.0, 4.0, 4.0, 1.0, 1.0])


def test_ties_equal_and_opposite_deltas_cancel():
    # β = 1 (no trim): τ_B = [2, 1, −1], τ_C = [−2, 1, 3] → Σ = [0, 2, 2]: no sign for e0 → 0;
    # e1: mean(1, 1) = 1; e2: elected + → only C's 3.
    a = [0.0, 0.0, 0.0]
    out = run("ties", a, [2.0, 1.0, -1.0], [-2.0, 1.0, 3.0], alpha=1.0, beta=1.0)
    assert_values(out, [0.0, 1.0, 3.0])


def test_ties_works_on_matrices():
    # Trim is over the whole tensor, not per row: keep 2 of 4 → |4| and |−3| only.
    a = [[0.0, 0.0], [0.0, 0.0]]
    out = run("ties", a, [[1.0, 4.0], [-3.0, 2.0]], alpha=1.0, beta=0.5)
    assert_values(out, [[0.0, 4.0], [-3.0, 0.0]])


# -------------------------------------------------------------------------------------------- dare


def test_dare_beta_zero_is_exact_weighted_difference():
    # keep = 1: nothing dropped, nothing rescaled; A + 0.25·(B − A) = the weighted_sum numbers
    out = run("dare", A, B, alpha=0.25, beta=0.0, rng=rng(5))
    assert_values(out, [1.5, 1.5, -2.0, 0.5])
    out = run("dare", A, B, alpha=1.0, beta=0.0, rng=rng(5))
    assert_values(out, B)


def test_dare_is_seeded():
    a = torch.linspace(-1, 1, 1000).tolist()
    b = torch.linspace(2, -3, 1000).tolist()
    first = run("dare", a, b, alpha=0.7, beta=0.4, rng=rng(123))
    again = run("dare", a, b, alpha=0.7, beta=0.4, rng=rng(123))
    other = run("dare", a, b, alpha=0.7, beta=0.4, rng=rng(124))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dare_keeps_about_one_minus_beta_and_rescales():
    n = 200_000
    a = torch.zeros(n)
    b = torch.ones(n)
    out = MERGE_METHODS["dare"].fn(a.clone(), b.clone(), None, 1.0, 0.3, rng(7))
    kept = out != 0
    # every kept delta is 1/(1 − 0.3), every other exactly 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    # the mean delta is preserved in expectation
    assert abs(out.mean().item() - 1.0) < 0.02


def test_dare_alpha_half_beta_half_gives_a_or_b():
    # kept: A + 0.5·(B − A)/(1 − 0.5) = B; dropped: A. Every element is one of them, exactly.
    a = torch.arange(1000, dtype=torch.float32)
    b = a * 2 + 1
    out = MERGE_METHODS["dare"].fn(a.clone(), b.clone(), None, 0.5, 0.5, rng(1))
    is_b = out == b
    assert torch.equal(out[~is_b], a[~is_b])
    assert 400 < int(is_b.sum()) < 600


def test_dare_three_models_sums_both_deltas():
    # τ_B = 1, τ_C = 2 everywhere, β = 0.5 → each kept τ doubled: result ∈ {0, 2, 4, 6}, all four seen
    n = 10_000
    out = MERGE_METHODS["dare"].fn(torch.zeros(n), torch.ones(n), torch.full((n,), 2.0), 1.0, 0.5, rng(3))
    values = set(torch.unique(out).tolist())
    assert values == {0.0, 2.0, 4.0, 6.0}
    # β = 0: A + α·(τ_B + τ_C) exactly
    out = run("dare", [1.0, 2.0], [2.0, 2.0], [0.0, 4.0], alpha=0.5, beta=0.0, rng=rng(0))
    assert_values(out, [1.0, 3.0])


# ------------------------------------------------------------------------------------------- slerp


def test_slerp_endpoints():
    a = [0.3, -1.2, 2.0, 0.7]
    b = [1.5, 0.4, -0.6, 2.2]
    assert_values(run("slerp", a, b, alpha=0.0), a, exact=False)
    assert_values(run("slerp", a, b, alpha=1.0), b, exact=False)


def test_slerp_orthogonal_unit_vectors():
    # Ω = π/2: both coefficients sin(π/4)/sin(π/2) = 0.70710678…
    out = run("slerp", [1.0, 0.0], [0.0, 1.0], alpha=0.5)
    assert_values(out, [0.70710678, 0.70710678], exact=False)
    # Not normalised: the same coefficients apply to the vectors as they are
    out = run("slerp", [2.0, 0.0], [0.0, 3.0], alpha=0.5)
    assert_values(out, [2 * 0.70710678, 3 * 0.70710678], exact=False)


def test_slerp_sixty_degrees():
    # Ω = π/3, α = 0.5: coefficients sin(π/6)/sin(π/3) = 0.5/0.8660254 = 0.57735027 each;
    # 0.57735027·([1, 0] + [0.5, 0.8660254]) = [0.8660254, 0.5]: the unit vector at 30°.
    out = run("slerp", [1.0, 0.0], [0.5, math.sqrt(3) / 2], alpha=0.5)
    assert_values(out, [0.8660254, 0.5], exact=False)
    # α = 0.25: sin(π/4)/sin(π/3)·A + sin(π/12)/sin(π/3)·B = the unit vector at 15°
    out = run("slerp", [1.0, 0.0], [0.5, math.sqrt(3) / 2], alpha=0.25)
    assert_values(out, [0.96592583, 0.25881905], exact=False)


def test_slerp_nearly_parallel_is_lerp():
    # cos Ω = 1/√1.0001 ≈ 0.99995 > 0.9995 → (1 − α)·A + α·B
    out = run("slerp", [1.0, 0.0], [1.0, 0.01], alpha=0.5)
    assert_values(out, [1.0, 0.005], exact=False)
    # anti-parallel too (|cos Ω| = 1)
    out = run("slerp", [1.0, 2.0], [-2.0, -4.0], alpha=0.25)
    assert_values(out, [0.25, 0.5], exact=False)


def test_slerp_zero_vector_is_lerp():
    out = run("slerp", [0.0, 0.0], [2.0, -4.0], alpha=0.25)
    assert_values(out, [0.5, -1.0])


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_methods_keep_shape_and_dtype(name):
    method = MERGE_METHODS[name]
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 4, generator=g) for _ in range(3))
    beta = 0.5 if method.beta is not None and method.beta.required else None
    out = method.fn(a.clone(), b.clone(), c.clone() if method.needs_c else None, 0.3, beta, rng(0))
    assert out.shape == (3, 4)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
