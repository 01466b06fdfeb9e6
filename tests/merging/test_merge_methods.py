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
    "ties_sd_mecha",
    "dare",
    "dare_sd_mecha",
    "slerp",
    "slerp_sd_mecha",
}
SD_MECHA_VARIANTS = {"ties": "ties_sd_mecha", "dare": "dare_sd_mecha", "slerp": "slerp_sd_mecha"}

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
    optional_c = {name for name, m in MERGE_METHODS.items() if m.accepts("c") and not m.needs_c}
    assert optional_c == {"ties", "dare", "ties_sd_mecha", "dare_sd_mecha"}
    beta_required = {name for name, m in MERGE_METHODS.items() if m.beta is not None and m.beta.required}
    assert beta_required == {"triple_sum", "sum_twice", "ties", "dare", "ties_sd_mecha", "dare_sd_mecha"}
    uses_beta = {name for name, m in MERGE_METHODS.items() if m.beta is not None}
    assert uses_beta == beta_required | {"scaled_sum"}
    not_elementwise = {name for name, m in MERGE_METHODS.items() if not m.elementwise}
    assert not_elementwise == {"ties", "slerp", "ties_sd_mecha", "slerp_sd_mecha"}
    assert {name for name, m in MERGE_METHODS.items() if m.lerp} == {"weighted_sum"}


def test_methods_state_their_ranges():
    dare, ties, weighted = MERGE_METHODS["dare"], MERGE_METHODS["ties"], MERGE_METHODS["weighted_sum"]
    assert dare.ratio_problems(0.5, 0.0) == [] and dare.ratio_problems(0.5, 0.999) == []
    assert [param for param, _ in dare.ratio_problems(0.5, 1.0)] == ["beta"]
    assert "[0, 1)" in dare.ratio_problems(0.5, 1.0)[0][1]
    assert ties.ratio_problems(1.0, 1.0) == [] and ties.ratio_problems(1.0, -0.1) != []
    assert weighted.ratio_problems(1e308, None)[0][0] == "alpha"
    assert weighted.ratio_problems(-2.0, None) == []  # extrapolation is a merge users make
    # sd-mecha's dropout takes probability 1 (nothing kept, no rescale); its k is a share like ties'
    dare_sd_mecha, ties_sd_mecha = MERGE_METHODS["dare_sd_mecha"], MERGE_METHODS["ties_sd_mecha"]
    assert dare_sd_mecha.ratio_problems(0.5, 1.0) == [] and dare_sd_mecha.ratio_problems(0.5, 1.01) != []
    assert ties_sd_mecha.ratio_problems(1.0, 1.0) == [] and ties_sd_mecha.ratio_problems(1.0, -0.1) != []


def test_shortcuts_are_the_methods_own():
    shortcuts = {
        name: (m.shortcut(0.0, None), m.shortcut(1.0, None), m.shortcut(0.0, 1.0))
        for name, m in MERGE_METHODS.items()
    }
    assert shortcuts["weighted_sum"] == ("copy_a", "copy_b", "copy_a")
    assert shortcuts["add_difference"] == shortcuts["train_difference"] == ("copy_a", None, "copy_a")
    assert shortcuts["scaled_sum"] == (None, None, "copy_a")
    assert shortcuts["dare"] == shortcuts["slerp"] == (None, None, None)
    # sd-mecha's add_difference returns A as it is when α is 0; its slerp has no shortcut
    assert shortcuts["ties_sd_mecha"] == shortcuts["dare_sd_mecha"] == ("copy_a", None, "copy_a")
    assert shortcuts["slerp_sd_mecha"] == (None, None, None)
    # β = 1 drops every element of every delta: exactly A
    assert MERGE_METHODS["dare_sd_mecha"].shortcut(0.7, 1.0) == "copy_a"
    assert MERGE_METHODS["dare_sd_mecha"].shortcut(0.7, 0.99) is None


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


# ----------------------------------------------------------------------------- sd-mecha conventions
# Each case is one where sd-mecha's convention (sd_mecha/extensions/builtin/merge_methods/ in
# github.com/ljleb/sd-mecha, 1.1.5) and the paper's give different results: the expected values
# are sd-mecha's definitions worked out by hand, and the paper method's result is asserted too.


def test_each_convention_names_the_other():
    for paper, variant in SD_MECHA_VARIANTS.items():
        assert "paper" in MERGE_METHODS[paper].formula
        assert f"`{variant}`" in MERGE_METHODS[paper].formula  # where to go for an sd-mecha recipe
        assert "sd-mecha" in MERGE_METHODS[variant].formula
    # the sd-mecha function each reproduces, and its parameter names for α and β
    ties_text, dare_text = MERGE_METHODS["ties_sd_mecha"].formula, MERGE_METHODS["dare_sd_mecha"].formula
    assert "add_difference_ties" in ties_text and "`k`" in ties_text and "vote_sgn=False" in ties_text
    assert "dropout" in dare_text and "`probability`" in dare_text and "rescale=1" in dare_text
    assert "linear.py slerp" in MERGE_METHODS["slerp_sd_mecha"].formula


def test_the_api_description_states_the_conventions():
    from mergeprobe.service.kinds import KINDS

    text = KINDS["merge"].description
    assert "the plain modes follow the papers" in text
    for name in [*SD_MECHA_VARIANTS, *SD_MECHA_VARIANTS.values()]:
        method = MERGE_METHODS[name]
        assert f"- `{name}` (A, B{', C optional' if method.accepts('c') else ''}): {method.formula}" in text
    assert "β: sd-mecha's k: the share of each delta kept, in [0, 1], required." in text
    assert "Ratio(" not in text


def test_ties_sd_mecha_votes_by_count():
    # No trim (k = β = 1). τ_B = [3, 1, −2, 0.5], τ_C = [−1, 1, 1, −0.5].
    # sd-mecha: γ = sign(sign τ_B + sign τ_C) = [0, +, 0, 0]: where B and C disagree in sign the
    # vote is a tie and nothing is added, however much larger one is; e1: mean(1, 1) = 1.
    a = [1.0, 1.0, 1.0, 1.0]
    b, c = [4.0, 2.0, -1.0, 1.5], [0.0, 2.0, 2.0, 0.5]
    assert_values(run("ties_sd_mecha", a, b, c, alpha=1.0, beta=1.0), [1.0, 2.0, 1.0, 1.0])
    # The paper: γ = sign(τ_B + τ_C) = [+, +, −, 0]: B's 3 and −2 win → A + [3, 1, −2, 0]
    assert_values(run("ties", a, b, c, alpha=1.0, beta=1.0), [4.0, 2.0, -1.0, 1.0])


def test_ties_sd_mecha_trims_like_filter_top_k():
    # One delta, τ_B = [4, −1, 2, −3], n = 4. sd-mecha keeps |τ| ≥ the j-th smallest magnitude,
    # j = max(int((1 − k)·4), 1):
    a, b = [0.0] * 4, [4.0, -1.0, 2.0, -3.0]
    # k = 0.5: j = 2 → threshold 2 → 3 elements kept; the paper keeps round(0.5·4) = 2
    assert_values(run("ties_sd_mecha", a, b, alpha=1.0, beta=0.5), [4.0, 0.0, 2.0, -3.0])
    assert_values(run("ties", a, b, alpha=1.0, beta=0.5), [4.0, 0.0, 0.0, -3.0])
    # k = 0: j = 4 → threshold 4 → the largest stays; the paper keeps nothing
    assert_values(run("ties_sd_mecha", a, b, alpha=1.0, beta=0.0), [4.0, 0.0, 0.0, 0.0])
    assert_values(run("ties", a, b, alpha=1.0, beta=0.0), a)
    # k = 1: j = max(0, 1) = 1 → everything
    assert_values(run("ties_sd_mecha", a, b, alpha=0.5, beta=1.0), [2.0, -0.5, 1.0, -1.5])


def test_ties_sd_mecha_truncates_in_float64_as_sd_mecha_does():
    # n = 10, |τ| = 1…10. (1 − 0.8)·10 is 1.9999999999999996 in float64, truncated to 1: the
    # threshold is the smallest magnitude and all 10 are kept (exactly: j = 2, 9 kept).
    assert int((1 - 0.8) * 10) == 1 and int((1 - 0.7) * 10) == 3
    a = [0.0] * 10
    b = [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0]
    assert_values(run("ties_sd_mecha", a, b, alpha=1.0, beta=0.8), b)
    assert_values(run("ties", a, b, alpha=1.0, beta=0.8), [0.0, 0.0, *b[2:]])  # round(8) kept
    # k = 0.7: (1 − 0.7)·10 = 3.0000000000000004 → j = 3 → |τ| ≥ 3: 8 kept (the paper: 7)
    assert_values(run("ties_sd_mecha", a, b, alpha=1.0, beta=0.7), [0.0, 0.0, *b[2:]])
    assert_values(run("ties", a, b, alpha=1.0, beta=0.7), [0.0, 0.0, 0.0, *b[3:]])


def test_ties_sd_mecha_reproduces_sd_mechas_own_test():
    # The deltas and expected result of sd-mecha's tests/merge_methods/test_ties.py::test_ties
    # (ties_sum, k = 0.5): with A = 0 and α = 1 the merge is the merged delta itself.
    tau_b = [[-1.0, 2.0, 3.0, 4.0], [4.0, -3.0, 2.0, 1.0], [3.0, 4.0, 1.0, -2.0], [2.0, 1.0, -4.0, 3.0]]
    tau_c = [[3.0, 4.0, 1.0, -2.0], [2.0, 1.0, -4.0, 3.0], [-1.0, 2.0, 3.0, 4.0], [4.0, -3.0, 2.0, 1.0]]
    expected = [[3.0, 3.0, 3.0, 0.0], [3.0, -3.0, 0.0, 3.0], [3.0, 3.0, 3.0, 0.0], [3.0, -3.0, 0.0, 3.0]]
    zeros = [[0.0] * 4 for _ in range(4)]
    assert_values(run("ties_sd_mecha", zeros, tau_b, tau_c, alpha=1.0, beta=0.5), expected)
    assert not torch.equal(run("ties", zeros, tau_b, tau_c, alpha=1.0, beta=0.5), t(expected))


def test_dare_sd_mecha_averages_the_kept_deltas():
    # β = 0 keeps everything and rescales by 1: per element the mean of τ_B = [1, 0] and
    # τ_C = [−1, 2] (a kept 0 counts: e1 is mean(0, 2) = 1) → A + 0.5·[0, 1]
    a, b, c = [1.0, 2.0], [2.0, 2.0], [0.0, 4.0]
    assert_values(run("dare_sd_mecha", a, b, c, alpha=0.5, beta=0.0, rng=rng(0)), [1.0, 2.5])
    assert_values(run("dare", a, b, c, alpha=0.5, beta=0.0, rng=rng(0)), [1.0, 3.0])  # the sum


def test_dare_sd_mecha_with_drops():
    # A = 0, τ_B = 1, τ_C = 2 everywhere, β = 0.5, α = 1. Per element, sd-mecha's dropout gives
    # both kept: (1 + 2)/2/0.5 = 3; only B: 1/0.5 = 2; only C: 2/0.5 = 4; neither: 0.
    # The same generator keeps the same elements as `dare`, whose sum shows which were kept:
    # 6 both, 2 only B, 4 only C, 0 neither.
    n = 10_000
    inputs = (torch.zeros(n), torch.ones(n), torch.full((n,), 2.0))
    summed = MERGE_METHODS["dare"].fn(*(x.clone() for x in inputs), 1.0, 0.5, rng(3))
    averaged = MERGE_METHODS["dare_sd_mecha"].fn(*(x.clone() for x in inputs), 1.0, 0.5, rng(3))
    expected = torch.where(summed == 6.0, 3.0, summed)
    assert torch.equal(averaged, expected)
    assert set(torch.unique(averaged).tolist()) == {0.0, 2.0, 3.0, 4.0}
    assert abs((averaged == 3.0).float().mean().item() - 0.25) < 0.02  # both kept: (1 − β)²


def test_dare_sd_mecha_with_b_alone_is_dare():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    paper = MERGE_METHODS["dare"].fn(a.clone(), b.clone(), None, 0.7, 0.4, rng(9))
    sd_mecha = MERGE_METHODS["dare_sd_mecha"].fn(a.clone(), b.clone(), None, 0.7, 0.4, rng(9))
    torch.testing.assert_close(sd_mecha, paper, rtol=1e-6, atol=1e-6)
    assert not torch.equal(sd_mecha, a)


def test_dare_sd_mecha_drops_everything_at_probability_1():
    # sd-mecha: probability 1 keeps nothing and leaves the delta unscaled (no 0/0): A
    assert_values(run("dare_sd_mecha", A, B, C, alpha=0.7, beta=1.0, rng=rng(0)), A)


def test_sd_mecha_alpha_0_is_a_even_with_infinite_deltas():
    # sd-mecha's add_difference returns A itself at α = 0, where A + 0·τ would be NaN for τ = ∞
    b = [math.inf, 2.0, -3.0, 0.5]
    assert_values(run("ties_sd_mecha", A, b, C, alpha=0.0, beta=1.0), A)
    assert_values(run("dare_sd_mecha", A, b, C, alpha=0.0, beta=0.5, rng=rng(0)), A)
    assert torch.isnan(run("ties", A, b, C, alpha=0.0, beta=1.0)).any()


def test_slerp_sd_mecha_rescales_to_the_interpolated_norm():
    # Ω = π/2, α = 0.5: the unit vector at 45°, scaled to (|A| + |B|)/2 = 2.5 → 2.5/√2 each
    out = run("slerp_sd_mecha", [2.0, 0.0], [0.0, 3.0], alpha=0.5)
    assert_values(out, [2.5 / math.sqrt(2), 2.5 / math.sqrt(2)], exact=False)
    # the paper's slerp applies the coefficients to A and B as they are: [2, 3]/√2
    assert_values(
        run("slerp", [2.0, 0.0], [0.0, 3.0], alpha=0.5), [math.sqrt(2), 1.5 * math.sqrt(2)], exact=False
    )


def test_slerp_sd_mecha_rotates_by_alpha_omega():
    # A = 2 at 0°, B = 4 at 60°, α = 0.25: norm 0.75·2 + 0.25·4 = 2.5 at 0.25·60° = 15°
    a, b = [2.0, 0.0], [2.0, 2.0 * math.sqrt(3)]
    angle = math.radians(15)
    out = run("slerp_sd_mecha", a, b, alpha=0.25)
    assert_values(out, [2.5 * math.cos(angle), 2.5 * math.sin(angle)], exact=False)
    paper = run("slerp", a, b, alpha=0.25)
    assert (paper - out).abs().max() > 0.1


def test_slerp_sd_mecha_has_no_near_parallel_threshold():
    # cos Ω ≈ 0.99995: `slerp` takes the lerp [1, 0.005]; sd-mecha interpolates on the arc:
    # norm (1 + √1.0001)/2 at angle atan(0.01)/2
    out = run("slerp_sd_mecha", [1.0, 0.0], [1.0, 0.01], alpha=0.5)
    norm, angle = (1 + math.sqrt(1.0001)) / 2, math.atan(0.01) / 2
    assert_values(out, [norm * math.cos(angle), norm * math.sin(angle)], exact=False)
    assert out[0] - 1.0 > 1e-5  # not the lerp's 1
    assert_values(run("slerp", [1.0, 0.0], [1.0, 0.01], alpha=0.5), [1.0, 0.005], exact=False)
    # Anti-parallel, α = 0.5: Ω = π, (sin(π/2)·[1, 0] + sin(π/2)·[−1, 0])/sin π = 0 (sin π is
    # −8.7e−8 in float32, not 0: no NaN, no fallback); `slerp` takes the lerp [1, 0]
    assert_values(run("slerp_sd_mecha", [3.0, 0.0], [-1.0, 0.0], alpha=0.5), [0.0, 0.0])
    assert_values(run("slerp", [3.0, 0.0], [-1.0, 0.0], alpha=0.5), [1.0, 0.0])


def test_slerp_sd_mecha_norm_on_random_tensors():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, generator=g), 5 * torch.randn(3, 4, generator=g)
    for alpha in (0.2, 0.5, 0.9):
        out = MERGE_METHODS["slerp_sd_mecha"].fn(a.clone(), b.clone(), None, alpha, None, None)
        expected_norm = (1 - alpha) * a.norm() + alpha * b.norm()
        torch.testing.assert_close(out.norm(), expected_norm, rtol=1e-5, atol=0)
    # the paper's slerp of vectors this different in norm is not on that norm
    paper = MERGE_METHODS["slerp"].fn(a.clone(), b.clone(), None, 0.5, None, None)
    assert abs(paper.norm() - (a.norm() + b.norm()) / 2) > 0.1


def test_slerp_sd_mecha_zero_vector_is_lerp():
    # A/|A| is NaN: sd-mecha falls back to (1 − α)·A + α·B
    out = run("slerp_sd_mecha", [0.0, 0.0], [2.0, -4.0], alpha=0.25)
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
