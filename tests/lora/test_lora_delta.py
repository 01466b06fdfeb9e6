"""``worker.lora.lora_delta``: each algorithm's ΔW against the formula written out literally (float64
loops / explicit sums), and the defining property where there is one (a LoCon conv chain equals one
conv with ΔW)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from worker.lora.lora_delta import lora_delta


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _f32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) for k, v in tensors.items()}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    assert tuple(actual.shape) == tuple(expected.shape)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=2e-5, atol=2e-6 * scale)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------- LoRA / LoCon


def test_linear_lora_with_alpha(gen):
    out, inp, r, alpha = 6, 5, 3, 2.0
    down, up = _rand(gen, r, inp), _rand(gen, out, r)
    expected = torch.zeros(out, inp, dtype=torch.float64)
    for o in range(out):
        for i in range(inp):
            expected[o, i] = sum(up[o, k] * down[k, i] for k in range(r)) * alpha / r
    got = lora_delta("lora", _f32({"lora_down.weight": down, "lora_up.weight": up}), (out, inp), alpha=alpha)
    _close(got, expected)


def test_locon_3x3_conv(gen):
    out, inp, r, alpha = 4, 3, 2, 1.0
    down, up = _rand(gen, r, inp, 3, 3), _rand(gen, out, r, 1, 1)
    expected = torch.zeros(out, inp, 3, 3, dtype=torch.float64)
    for o in range(out):
        for i in range(inp):
            for y in range(3):
                for x in range(3):
                    expected[o, i, y, x] = (
                        sum(up[o, k, 0, 0] * down[k, i, y, x] for k in range(r)) * alpha / r
                    )
    got = lora_delta(
        "locon", _f32({"lora_down.weight": down, "lora_up.weight": up}), (out, inp, 3, 3), alpha=alpha
    )
    _close(got, expected)
    # defining property: the adapter's own forward (down conv, then 1x1 up conv) equals one conv with ΔW
    x = _rand(gen, 1, inp, 7, 7)
    chain = F.conv2d(F.conv2d(x, down, padding=1), up) * alpha / r
    torch.testing.assert_close(F.conv2d(x, got.double(), padding=1), chain, rtol=1e-5, atol=1e-5)


def test_locon_with_mid_cp(gen):
    out, inp, r, alpha = 5, 4, 3, 1.5
    down, mid, up = _rand(gen, r, inp, 1, 1), _rand(gen, r, r, 3, 3), _rand(gen, out, r, 1, 1)
    expected = torch.zeros(out, inp, 3, 3, dtype=torch.float64)
    for o in range(out):
        for i in range(inp):
            for y in range(3):
                for x in range(3):
                    expected[o, i, y, x] = sum(
                        up[o, a, 0, 0] * mid[a, b, y, x] * down[b, i, 0, 0]
                        for a in range(r)
                        for b in range(r)
                    )
    expected *= alpha / r
    tensors = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}
    got = lora_delta("locon", _f32(tensors), (out, inp, 3, 3), alpha=alpha)
    _close(got, expected)
    x = _rand(gen, 1, inp, 6, 6)
    chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * alpha / r
    torch.testing.assert_close(F.conv2d(x, got.double(), padding=1), chain, rtol=1e-5, atol=1e-5)


def test_linear_lora_into_1x1_conv_target(gen):
    out, inp, r = 6, 4, 2
    down, up = _rand(gen, r, inp), _rand(gen, out, r)
    expected = torch.zeros(out, inp, 1, 1, dtype=torch.float64)
    for o in range(out):
        for i in range(inp):
            expected[o, i, 0, 0] = sum(up[o, k] * down[k, i] for k in range(r)) * 4.0 / r
    got = lora_delta(
        "lora", _f32({"lora_down.weight": down, "lora_up.weight": up}), (out, inp, 1, 1), alpha=4.0
    )
    _close(got, expected)
    # and a 1x1-conv LoRA into a linear target
    got2 = lora_delta(
        "lora",
        _f32({"lora_down.weight": down[:, :, None, None], "lora_up.weight": up[:, :, None, None]}),
        (out, inp),
        alpha=4.0,
    )
    _close(got2, expected[:, :, 0, 0])


def test_alpha_none_and_zero_mean_scale_one(gen):
    out, inp, r = 4, 5, 3
    down, up = _rand(gen, r, inp), _rand(gen, out, r)
    expected = torch.zeros(out, inp, dtype=torch.float64)
    for k in range(r):
        expected += torch.outer(up[:, k], down[k, :])
    tensors = _f32({"lora_down.weight": down, "lora_up.weight": up})
    _close(lora_delta("lora", tensors, (out, inp), alpha=None), expected)
    _close(lora_delta("lora", tensors, (out, inp), alpha=0.0), expected)  # kohya / LyCORIS rule
    _close(lora_delta("lora", tensors, (out, inp), alpha=float(r)), expected)


def test_fp16_inputs_upcast_to_fp32(gen):
    out, inp, r = 8, 6, 4
    down16 = _rand(gen, r, inp).to(torch.float16)
    up16 = _rand(gen, out, r).to(torch.float16)
    expected = torch.zeros(out, inp, dtype=torch.float64)
    d, u = down16.double(), up16.double()
    for o in range(out):
        for i in range(inp):
            expected[o, i] = sum(u[o, k] * d[k, i] for k in range(r)) * 2.0 / r
    got = lora_delta("lora", {"lora_down.weight": down16, "lora_up.weight": up16}, (out, inp), alpha=2.0)
    assert got.dtype == torch.float32
    _close(got, expected)
    bf = {"hada_w1_a": up16, "hada_w1_b": down16, "hada_w2_a": up16, "hada_w2_b": down16}
    assert lora_delta(
        "loha", {k: v.to(torch.bfloat16) for k, v in bf.items()}, (out, inp), alpha=1
    ).dtype == (torch.float32)


# ---------------------------------------------------------------------------------------------- LoHa


def test_loha_plain_linear(gen):
    out, inp, r, alpha = 5, 4, 3, 2.0
    w1a, w1b, w2a, w2b = _rand(gen, out, r), _rand(gen, r, inp), _rand(gen, out, r), _rand(gen, r, inp)
    expected = torch.zeros(out, inp, dtype=torch.float64)
    for o in range(out):
        for i in range(inp):
            m1 = sum(w1a[o, k] * w1b[k, i] for k in range(r))
            m2 = sum(w2a[o, k] * w2b[k, i] for k in range(r))
            expected[o, i] = m1 * m2 * alpha / r
    tensors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    _close(lora_delta("loha", _f32(tensors), (out, inp), alpha=alpha), expected)


def test_loha_plain_conv_flattened(gen):
    # LyCORIS stores a non-Tucker conv LoHa with w_b as (r, in*kh*kw)
    out, inp, r = 4, 3, 2
    w1a, w1b, w2a, w2b = (
        _rand(gen, out, r),
        _rand(gen, r, inp * 9),
        _rand(gen, out, r),
        _rand(gen, r, inp * 9),
    )
    expected = torch.zeros(out, inp, 3, 3, dtype=torch.float64)
    for o in range(out):
        for i in range(inp):
            for y in range(3):
                for x in range(3):
                    c = i * 9 + y * 3 + x
                    m1 = sum(w1a[o, k] * w1b[k, c] for k in range(r))
                    m2 = sum(w2a[o, k] * w2b[k, c] for k in range(r))
                    expected[o, i, y, x] = m1 * m2
    tensors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    _close(lora_delta("loha", _f32(tensors), (out, inp, 3, 3), alpha=None), expected)


def test_loha_tucker_conv(gen):
    out, inp, r, alpha = 4, 3, 2, 1.0
    t1, t2 = _rand(gen, r, r, 3, 3), _rand(gen, r, r, 3, 3)
    w1a, w1b, w2a, w2b = _rand(gen, r, out), _rand(gen, r, inp), _rand(gen, r, out), _rand(gen, r, inp)
    expected = torch.zeros(out, inp, 3, 3, dtype=torch.float64)
    for p in range(out):
        for q in range(inp):
            for y in range(3):
                for x in range(3):
                    m1 = sum(t1[i, j, y, x] * w1a[i, p] * w1b[j, q] for i in range(r) for j in range(r))
                    m2 = sum(t2[i, j, y, x] * w2a[i, p] * w2b[j, q] for i in range(r) for j in range(r))
                    expected[p, q, y, x] = m1 * m2 * alpha / r
    tensors = {
        "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "hada_t1": t1, "hada_t2": t2,
    }  # fmt: skip
    _close(lora_delta("loha", _f32(tensors), (out, inp, 3, 3), alpha=alpha), expected)


# ---------------------------------------------------------------------------------------------- LoKr


def _kron_literal(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(a, c) ⊗ (b, d[, k, k]) -> (a*b, c*d[, k, k]) by the definition: [i*b+p, j*d+q] = w1[i, j] * w2[p, q]."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    result = torch.zeros(a * b, c * d, *w2.shape[2:], dtype=torch.float64)
    for i in range(a):
        for j in range(c):
            for p in range(b):
                for q in range(d):
                    result[i * b + p, j * d + q] = w1[i, j] * w2[p, q]
    return result


def test_lokr_full_w1_factored_w2(gen):
    a, c, b, d, r, alpha = 2, 3, 4, 5, 2, 3.0
    w1, w2a, w2b = _rand(gen, a, c), _rand(gen, b, r), _rand(gen, r, d)
    w2 = torch.zeros(b, d, dtype=torch.float64)
    for k in range(r):
        w2 += torch.outer(w2a[:, k], w2b[k, :])
    expected = _kron_literal(w1, w2) * alpha / r
    tensors = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}
    _close(lora_delta("lokr", _f32(tensors), (a * b, c * d), alpha=alpha), expected)


def test_lokr_factored_both(gen):
    a, c, b, d, r, alpha = 3, 2, 4, 6, 2, 1.0
    w1a, w1b, w2a, w2b = _rand(gen, a, r), _rand(gen, r, c), _rand(gen, b, r), _rand(gen, r, d)
    w1 = sum(torch.outer(w1a[:, k], w1b[k, :]) for k in range(r))
    w2 = sum(torch.outer(w2a[:, k], w2b[k, :]) for k in range(r))
    expected = _kron_literal(w1, w2) * alpha / r
    tensors = {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b}
    _close(lora_delta("lokr", _f32(tensors), (a * b, c * d), alpha=alpha), expected)


def test_lokr_full_both_ignores_alpha(gen):
    # LyCORIS: use_w1 and use_w2 -> alpha = lora_dim (scale 1); ComfyUI: no factored part -> scale 1
    a, c, b, d = 2, 2, 3, 4
    w1, w2 = _rand(gen, a, c), _rand(gen, b, d)
    got = lora_delta("lokr", _f32({"lokr_w1": w1, "lokr_w2": w2}), (a * b, c * d), alpha=7.0)
    _close(got, _kron_literal(w1, w2))


def test_lokr_conv_target_full_w2(gen):
    a, c, b, d = 2, 3, 3, 2
    w1, w2 = _rand(gen, a, c), _rand(gen, b, d, 3, 3)
    got = lora_delta("lokr", _f32({"lokr_w1": w1, "lokr_w2": w2}), (a * b, c * d, 3, 3), alpha=4.0)
    _close(got, _kron_literal(w1, w2))


def test_lokr_conv_target_factored_w2_flat_and_tucker(gen):
    a, c, b, d, r, alpha = 2, 2, 3, 4, 2, 1.0
    w1 = _rand(gen, a, c)
    # non-Tucker: w2_b stored (r, d*3*3)
    w2a, w2b = _rand(gen, b, r), _rand(gen, r, d * 9)
    w2 = torch.zeros(b, d, 3, 3, dtype=torch.float64)
    for p in range(b):
        for q in range(d):
            for y in range(3):
                for x in range(3):
                    w2[p, q, y, x] = sum(w2a[p, k] * w2b[k, q * 9 + y * 3 + x] for k in range(r))
    got = lora_delta(
        "lokr", _f32({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}), (a * b, c * d, 3, 3), alpha=alpha
    )
    _close(got, _kron_literal(w1, w2) * alpha / r)
    # Tucker: t2 (r, r, 3, 3), w2_a (r, b), w2_b (r, d)
    t2, ta, tb = _rand(gen, r, r, 3, 3), _rand(gen, r, b), _rand(gen, r, d)
    w2t = torch.zeros(b, d, 3, 3, dtype=torch.float64)
    for p in range(b):
        for q in range(d):
            for y in range(3):
                for x in range(3):
                    w2t[p, q, y, x] = sum(
                        t2[i, j, y, x] * ta[i, p] * tb[j, q] for i in range(r) for j in range(r)
                    )
    tensors = {"lokr_w1": w1, "lokr_w2_a": ta, "lokr_w2_b": tb, "lokr_t2": t2}
    got_t = lora_delta("lokr", _f32(tensors), (a * b, c * d, 3, 3), alpha=alpha)
    _close(got_t, _kron_literal(w1, w2t) * alpha / r)


# ---------------------------------------------------------------------------------------------- DoRA


def _dora_literal_out(base: torch.Tensor, delta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    v = base + delta
    result = torch.empty_like(v)
    for o in range(v.shape[0]):
        norm = float(torch.sqrt((v[o] ** 2).sum()))
        result[o] = v[o] * float(m.reshape(-1)[o]) / norm
    return result - base


def _dora_literal_in(base: torch.Tensor, delta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    v = base + delta
    result = torch.empty_like(v)
    for i in range(v.shape[1]):
        norm = float(torch.sqrt((v[:, i] ** 2).sum()))
        result[:, i] = v[:, i] * float(m.reshape(-1)[i]) / norm
    return result - base


def test_dora_linear_output_axis_lycoris_and_peft(gen):
    out, inp, r, alpha = 6, 5, 2, 1.0
    down, up, base = _rand(gen, r, inp), _rand(gen, out, r), _rand(gen, out, inp)
    mag = _rand(gen, out, 1).abs() + 0.5
    delta = (up @ down) * alpha / r
    expected = _dora_literal_out(base, delta, mag)
    for dora_scale in (mag, mag.reshape(out)):  # LyCORIS wd_on_out (out, 1); PEFT magnitude vector (out,)
        tensors = {"lora_down.weight": down, "lora_up.weight": up, "dora_scale": dora_scale}
        got = lora_delta("lora", _f32(tensors), (out, inp), alpha=alpha, base=base.float())
        _close(got, expected)
        merged = base + got.double()
        torch.testing.assert_close(merged.norm(dim=1), mag.reshape(out), rtol=1e-5, atol=1e-6)


def test_dora_linear_input_axis_legacy(gen):
    out, inp, r = 5, 7, 3
    down, up, base = _rand(gen, r, inp), _rand(gen, out, r), _rand(gen, out, inp)
    mag = _rand(gen, 1, inp).abs() + 0.5
    tensors = {"lora_down.weight": down, "lora_up.weight": up, "dora_scale": mag}
    got = lora_delta("lora", _f32(tensors), (out, inp), alpha=None, base=base.float())
    _close(got, _dora_literal_in(base, up @ down, mag))
    torch.testing.assert_close((base + got.double()).norm(dim=0), mag.reshape(inp), rtol=1e-5, atol=1e-6)


def test_dora_conv_both_axes(gen):
    out, inp, r, alpha = 4, 3, 2, 2.0
    down, up, base = _rand(gen, r, inp, 3, 3), _rand(gen, out, r, 1, 1), _rand(gen, out, inp, 3, 3)
    delta = torch.einsum("ok,kiyx->oiyx", up[:, :, 0, 0], down) * alpha / r
    mag_out = _rand(gen, out, 1, 1, 1).abs() + 0.5
    got = lora_delta(
        "locon",
        _f32({"lora_down.weight": down, "lora_up.weight": up, "dora_scale": mag_out}),
        (out, inp, 3, 3),
        alpha=alpha,
        base=base.float(),
    )
    _close(got, _dora_literal_out(base, delta, mag_out))
    norms = (base + got.double()).reshape(out, -1).norm(dim=1)
    torch.testing.assert_close(norms, mag_out.reshape(out), rtol=1e-5, atol=1e-6)

    mag_in = _rand(gen, 1, inp, 1, 1).abs() + 0.5
    got_in = lora_delta(
        "locon",
        _f32({"lora_down.weight": down, "lora_up.weight": up, "dora_scale": mag_in}),
        (out, inp, 3, 3),
        alpha=alpha,
        base=base.float(),
    )
    _close(got_in, _dora_literal_in(base, delta, mag_in))
    norms_in = (base + got_in.double()).transpose(0, 1).reshape(inp, -1).norm(dim=1)
    torch.testing.assert_close(norms_in, mag_in.reshape(inp), rtol=1e-5, atol=1e-6)


def test_dora_lokr_and_errors(gen):
    a, c, b, d = 2, 2, 3, 3
    w1, w2 = _rand(gen, a, c), _rand(gen, b, d)
    base = _rand(gen, a * b, c * d)
    mag = _rand(gen, a * b, 1).abs() + 0.5
    tensors = {"lokr_w1": w1, "lokr_w2": w2, "dora_scale": mag}
    got = lora_delta("lokr", _f32(tensors), (a * b, c * d), alpha=None, base=base.float())
    _close(got, _dora_literal_out(base, _kron_literal(w1, w2), mag))
    with pytest.raises(ValueError, match="base"):
        lora_delta("lokr", _f32(tensors), (a * b, c * d), alpha=None)
    with pytest.raises(ValueError, match="dora_scale"):
        bad = dict(tensors, dora_scale=_rand(gen, 2, 2))
        lora_delta("lokr", _f32(bad), (a * b, c * d), alpha=None, base=base.float())


# -------------------------------------------------------------------------------------------- errors


def test_shape_mismatch_names_both_shapes(gen):
    down, up = _rand(gen, 2, 5).float(), _rand(gen, 6, 2).float()
    tensors = {"lora_down.weight": down, "lora_up.weight": up}
    with pytest.raises(ValueError, match=re.escape("(6, 5)")) as info:
        lora_delta("lora", tensors, (6, 4), alpha=1.0)
    assert "(6, 4)" in str(info.value)
    # a 3x3 conv ΔW never fits a linear target of the same element count
    conv = {
        "lora_down.weight": _rand(gen, 2, 3, 3, 3).float(),
        "lora_up.weight": _rand(gen, 4, 2, 1, 1).float(),
    }
    with pytest.raises(ValueError, match=re.escape("(4, 27)")):
        lora_delta("lora", conv, (4, 27), alpha=1.0)


def test_unknown_algorithm_and_role(gen):
    tensors = {"lora_down.weight": _rand(gen, 2, 3).float(), "lora_up.weight": _rand(gen, 3, 2).float()}
    with pytest.raises(ValueError, match="unknown LoRA algorithm"):
        lora_delta("oft", tensors, (3, 3), alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        lora_delta("lora", dict(tensors, alpha=torch.tensor(1.0)), (3, 3), alpha=1.0)
    with pytest.raises(ValueError, match="missing"):
        lora_delta("loha", {"hada_w1_a": tensors["lora_up.weight"]}, (3, 3), alpha=1.0)
