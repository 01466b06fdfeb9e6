"""The weight difference ΔW that one LoRA-family module contributes, as a pure function of its tensors.

``lora_delta(algorithm, tensors, target_shape, alpha=..., base=...)`` returns ΔW in float32 with
``shape == target_shape``, so that a caller always merges ``W + strength * ΔW`` (for DoRA the returned
ΔW is ``W' - W``; see below). ``tensors`` holds one module's tensors by their role (the key suffix
after the module name); PEFT's ``lora_A``/``lora_B`` are ``lora_down.weight``/``lora_up.weight``
(the caller maps the names).

Formulas and where they come from (LyCORIS = KohakuBlueleaf/LyCORIS at f49d30d, 2025-10-04;
ComfyUI = comfyanonymous/ComfyUI ``comfy/weight_adapter/*.py``; kohya = kohya-ss/sd-scripts
``networks/lora.py``):

``lora`` / ``locon`` (roles ``lora_down.weight`` (r, in[, kh, kw]), ``lora_up.weight`` (out, r[, 1, 1]),
optional ``lora_mid.weight`` (r, r, kh, kw)); scale = alpha / r with r = ``lora_down.shape[0]``:

* no mid: ``ΔW = (up.flatten(1) @ down.flatten(1)).reshape(out, in, *k)``
  (LyCORIS ``functional/locon.py`` ``lora_diff_weight``, ``modules/locon.py`` ``make_weight``;
  ComfyUI ``lora.py`` ``calculate_weight``; kohya merges the same product as a 1x1 conv).
* mid (CP/Tucker LoCon; down and up are 1x1): ``ΔW[p, q] = Σ_ij up[p, i] mid[i, j] down[j, q]``,
  i.e. ``einsum("i j ..., p i, j q -> p q ...")`` (LyCORIS ``modules/locon.py`` ``make_weight`` via
  ``functional/general.py`` ``rebuild_tucker``; ComfyUI ``base.py`` ``tucker_weight_from_conv``).

``loha`` (roles ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, optional ``hada_t1`` and
``hada_t2`` together); scale = alpha / r with r = ``hada_w1_b.shape[0]`` (ComfyUI ``loha.py``):

* plain: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` with w*_a (out, r), w*_b (r, in·kh·kw)
  (LyCORIS ``functional/loha.py`` ``HadaWeight``; ComfyUI ``loha.py``).
* Tucker: w*_a (r, out), w*_b (r, in), t* (r, r, kh, kw),
  ``W_n = einsum("i j k l, j r, i p -> p r k l", t_n, w_n_b, w_n_a)``, ``ΔW = W_1 ⊙ W_2``
  (LyCORIS ``HadaWeightTucker``; ComfyUI ``loha.py``).

``lokr`` (roles ``lokr_w1`` or ``lokr_w1_a``+``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a``+``lokr_w2_b``
with optional ``lokr_t2``):

* ``w1 = lokr_w1`` or ``w1_a @ w1_b``; ``w2 = lokr_w2`` or ``w2_a @ w2_b`` or, with ``t2``,
  ``einsum("i j k l, j r, i p -> p r k l", t2, w2_b, w2_a)``; ``ΔW = kron(w1, w2)`` with ``w1`` given
  trailing singleton dims when ``w2`` is a conv kernel (LyCORIS ``functional/lokr.py`` ``make_kron``,
  ``diff_weight``; ComfyUI ``lokr.py``). A 2-D result is reshaped to (out, in, kh, kw).
* scale: alpha / r where r is the low-rank dim of a factored part (``lokr_w2_b.shape[0]`` when w2 is
  factored, else ``lokr_w1_b.shape[0]``, ComfyUI's precedence; LyCORIS trains both with the same
  ``lora_dim`` so they agree); **when neither w1 nor w2 is factored the scale is 1 whatever alpha
  says** (LyCORIS ``modules/lokr.py``: ``if self.use_w2 and self.use_w1: alpha = lora_dim``;
  ComfyUI: ``dim is None -> alpha = 1.0``).

alpha: ``None`` or ``0`` means alpha = rank, scale 1 (kohya and LyCORIS: ``alpha = lora_dim if alpha
is None or alpha == 0``). ComfyUI differs for an explicit 0: it computes ``0 / rank`` (ΔW = 0).
A file's stored alpha already folds in rs-LoRA (LyCORIS stores ``alpha * rank / sqrt(rank)``), so
alpha / rank is right for those too.

DoRA (role ``dora_scale`` with any algorithm above; needs ``base`` = the original weight W):
``V = W + scale·ΔW``; ``W' = dora_scale · V / (‖V‖ + eps)``; returned ``W' − W``. The norm axis
follows the shape of ``dora_scale`` (as ComfyUI decides it, ``dora_scale.shape[0] == out``):

* ``(out, 1[, 1, 1])`` -- LyCORIS ``wd_on_out=True`` (the LyCORIS default since Dec 2024, commit
  61b7ed5 "Add correct DoRA implementation"): one norm per output channel, over all other dims.
* ``(1, in[, 1, 1])`` -- older LyCORIS and ComfyUI's historic only case: one norm per input
  channel, over the output and kernel dims (``V.transpose(0, 1).reshape(in, -1).norm(dim=1)``).
* ``(out,)`` -- PEFT's ``lora_magnitude_vector``: per output row (conv: over in, kh, kw), the same
  as ``wd_on_out``. On a conv PEFT stores it ``(1, out, 1, 1)``, which would read as per input
  channel: callers flatten a PEFT magnitude to ``(out,)`` first (``merge_executor`` does). PEFT
  adds no eps; LyCORIS adds ``torch.finfo(float32).eps`` to the norm, which we follow (a relative
  difference ~1e-7 at most for realistic norms).

The DoRA result is at strength 1. Other strengths are not ``strength * (W' - W)`` in LyCORIS
(``scale = m * (dora_scale / ‖V‖ - 1) + 1``, with V built at strength 1) but they are in ComfyUI;
callers that need a strength other than 1 for a DoRA module must choose between those.

Note on LyCORIS itself: ``LokrModule.get_diff_weight`` and ``LohaModule.get_diff_weight`` multiply by
``self.scale`` on top of ``get_weight``, which already applied it (scale squared when alpha != rank),
unlike ``LoConModule``, ``functional.*.diff_weight`` and ComfyUI, which apply it once. We apply it
once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

_LORA_ROLES = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"})
_LOHA_ROLES = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
_LOKR_ROLES = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
_ROLES = {"lora": _LORA_ROLES, "locon": _LORA_ROLES, "loha": _LOHA_ROLES, "lokr": _LOKR_ROLES}
ALGORITHMS = frozenset(_ROLES)
DORA_SCALE = "dora_scale"


def lora_delta(
    algorithm: str,
    tensors: Mapping[str, torch.Tensor],
    target_shape: tuple[int, ...],
    *,
    alpha: float | None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW (float32, ``shape == target_shape``) that one module of ``algorithm`` adds to its target weight.

    ``tensors``: the module's tensors by role name (see the module docstring). ``alpha``: the module's
    alpha (``None`` or 0: alpha = rank). ``base``: the original weight, required when ``tensors`` has
    ``dora_scale``; the result is then ``W' - base``. Raises ``ValueError`` for an unknown algorithm or
    role, missing or inconsistent factors, and a ΔW whose shape does not fit ``target_shape``.
    """
    algo = algorithm.lower()
    if algo not in _ROLES:
        raise ValueError(f"unknown LoRA algorithm {algorithm!r}; expected one of {sorted(ALGORITHMS)}")
    allowed = _ROLES[algo] | {DORA_SCALE}
    unknown = sorted(set(tensors) - allowed)
    if unknown:
        raise ValueError(f"{algo}: unknown tensor role(s) {unknown}; expected some of {sorted(allowed)}")
    target = tuple(int(d) for d in target_shape)
    t = {role: value.to(torch.float32) for role, value in tensors.items()}

    if algo in ("lora", "locon"):
        delta, rank = _lora(t)
    elif algo == "loha":
        delta, rank = _loha(t)
    else:
        delta, rank = _lokr(t)

    delta = _fit(delta, target, algo)
    scale = _scale(alpha, rank)
    if scale != 1.0:
        delta = delta * scale

    dora_scale = t.get(DORA_SCALE)
    if dora_scale is None:
        return delta
    if base is None:
        raise ValueError(f"{algo}: the module has dora_scale (DoRA); the original weight `base` is required")
    if tuple(base.shape) != target:
        raise ValueError(f"{algo}: base weight has shape {tuple(base.shape)}, expected {target}")
    return _dora(base.to(torch.float32), delta, dora_scale, algo)


def _require(t: Mapping[str, torch.Tensor], algo: str, *roles: str) -> list[torch.Tensor]:
    missing = [role for role in roles if role not in t]
    if missing:
        raise ValueError(f"{algo}: missing tensor role(s) {missing}")
    return [t[role] for role in roles]


def _scale(alpha: float | None, rank: int | None) -> float:
    if rank is None or alpha is None:
        return 1.0
    alpha = float(alpha)
    if alpha == 0.0:  # kohya / LyCORIS: alpha 0 means alpha = rank (ComfyUI would give scale 0)
        return 1.0
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha / rank


def _lora(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    down, up = _require(t, "lora", "lora_down.weight", "lora_up.weight")
    mid = t.get("lora_mid.weight")
    rank = down.shape[0]
    out = up.shape[0]
    if up.dim() < 2 or any(d != 1 for d in up.shape[2:]):
        raise ValueError(f"lora: lora_up.weight must be (out, rank[, 1, 1]), got {tuple(up.shape)}")
    if mid is None:
        if up.shape[1] != rank:
            raise ValueError(
                f"lora: lora_up.weight {tuple(up.shape)} and lora_down.weight {tuple(down.shape)} "
                f"disagree on the rank"
            )
        delta = up.reshape(out, rank) @ down.reshape(rank, -1)
        return delta.reshape(out, *down.shape[1:]), rank
    # CP/Tucker LoCon: down is a 1x1 conv (rank, in), mid the k x k core (rank_up, rank_down, *k).
    if down.dim() < 2 or any(d != 1 for d in down.shape[2:]):
        raise ValueError(f"lora: with lora_mid, lora_down.weight must be 1x1, got {tuple(down.shape)}")
    if mid.dim() < 3 or mid.shape[0] != up.shape[1] or mid.shape[1] != rank:
        raise ValueError(
            f"lora: lora_mid.weight {tuple(mid.shape)} does not fit lora_up.weight {tuple(up.shape)} "
            f"and lora_down.weight {tuple(down.shape)}"
        )
    up2 = up.reshape(out, up.shape[1])
    down2 = down.reshape(rank, down.shape[1])
    return torch.einsum("i j ..., p i, j q -> p q ...", mid, up2, down2), rank


def _loha(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    w1a, w1b, w2a, w2b = _require(t, "loha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    t1, t2 = t.get("hada_t1"), t.get("hada_t2")
    if (t1 is None) != (t2 is None):
        raise ValueError("loha: hada_t1 and hada_t2 come together (Tucker) or not at all")
    rank = w1b.shape[0]
    if t1 is not None:
        # Tucker: w_a (r, out), w_b (r, in), t (r, r, *k) -> (out, in, *k)
        for name, core, wa, wb in (("1", t1, w1a, w1b), ("2", t2, w2a, w2b)):
            if wa.dim() != 2 or wb.dim() != 2 or core.shape[0] != wa.shape[0] or core.shape[1] != wb.shape[0]:
                raise ValueError(
                    f"loha: hada_t{name} {tuple(core.shape)}, hada_w{name}_a {tuple(wa.shape)} and "
                    f"hada_w{name}_b {tuple(wb.shape)} do not fit a Tucker decomposition"
                )
        m1 = torch.einsum("i j ..., j r, i p -> p r ...", t1, w1b, w1a)
        m2 = torch.einsum("i j ..., j r, i p -> p r ...", t2, w2b, w2a)
    else:
        parts = []
        for name, wa, wb in (("1", w1a, w1b), ("2", w2a, w2b)):
            if wa.dim() < 2 or wa.shape[1] != wb.shape[0]:
                raise ValueError(
                    f"loha: hada_w{name}_a {tuple(wa.shape)} and hada_w{name}_b {tuple(wb.shape)} "
                    f"disagree on the rank"
                )
            product = wa.reshape(wa.shape[0], wa.shape[1]) @ wb.reshape(wb.shape[0], -1)
            parts.append(product.reshape(wa.shape[0], *wb.shape[1:]))
        m1, m2 = parts
    if m1.shape != m2.shape:
        raise ValueError(
            f"loha: the two Hadamard factors have shapes {tuple(m1.shape)} and {tuple(m2.shape)}"
        )
    return m1 * m2, rank


def _lokr(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int | None]:
    rank: int | None = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1a, w1b = _require(t, "lokr", "lokr_w1_a", "lokr_w1_b")
        if w1a.shape[1] != w1b.shape[0]:
            raise ValueError(f"lokr: lokr_w1_a {tuple(w1a.shape)} and lokr_w1_b {tuple(w1b.shape)} disagree")
        w1 = w1a @ w1b
        rank = w1b.shape[0]
    if "lokr_w2" in t:
        if "lokr_t2" in t:
            raise ValueError("lokr: lokr_t2 needs lokr_w2_a and lokr_w2_b, not lokr_w2")
        w2 = t["lokr_w2"]
    else:
        w2a, w2b = _require(t, "lokr", "lokr_w2_a", "lokr_w2_b")
        t2 = t.get("lokr_t2")
        if t2 is not None:
            # Tucker: w2_a (r, b), w2_b (r, d), t2 (r, r, *k) -> (b, d, *k)
            if t2.shape[0] != w2a.shape[0] or t2.shape[1] != w2b.shape[0]:
                raise ValueError(
                    f"lokr: lokr_t2 {tuple(t2.shape)}, lokr_w2_a {tuple(w2a.shape)} and "
                    f"lokr_w2_b {tuple(w2b.shape)} do not fit a Tucker decomposition"
                )
            w2 = torch.einsum("i j ..., j r, i p -> p r ...", t2, w2b, w2a)
        else:
            # w2_a (b, r), w2_b (r, d[·kh·kw]) -- LyCORIS stores a conv w2_b flattened, its functional
            # API may hand it as (r, d, kh, kw)
            if w2a.shape[1] != w2b.shape[0]:
                raise ValueError(
                    f"lokr: lokr_w2_a {tuple(w2a.shape)} and lokr_w2_b {tuple(w2b.shape)} disagree"
                )
            w2 = (w2a @ w2b.reshape(w2b.shape[0], -1)).reshape(w2a.shape[0], *w2b.shape[1:])
        rank = w2b.shape[0]  # ComfyUI's precedence: w2's rank when both are factored
    if w1.dim() != 2:
        raise ValueError(f"lokr: w1 must be 2-D, got {tuple(w1.shape)}")
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous()), rank


def _strip_trailing_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _fit(delta: torch.Tensor, target: tuple[int, ...], algo: str) -> torch.Tensor:
    """``delta`` reshaped to ``target``: equal shapes; linear <-> 1x1 conv (trailing singleton dims);
    or a 2-D (out, in·kh·kw) product for a conv target. Anything else is a mismatch."""
    shape = tuple(delta.shape)
    if shape == target:
        return delta
    if len(target) >= 2 and (
        _strip_trailing_ones(shape) == _strip_trailing_ones(target)
        or (len(shape) == 2 and shape == (target[0], math.prod(target[1:])))
    ):
        return delta.reshape(target)
    raise ValueError(f"{algo}: ΔW has shape {shape}, which does not fit the target shape {target}")


def _dora(base: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, algo: str) -> torch.Tensor:
    out, inp = base.shape[0], base.shape[1] if base.dim() > 1 else 1
    ones = [1] * (base.dim() - 1)
    ds_shape = tuple(dora_scale.shape)
    merged = base + delta
    eps = torch.finfo(torch.float32).eps
    if dora_scale.dim() >= 1 and ds_shape[0] == out and dora_scale.numel() == out:
        # per output channel: LyCORIS wd_on_out=True (out, 1, ...) and PEFT's magnitude vector (out,)
        norm = merged.reshape(out, -1).norm(dim=1).reshape(out, *ones)
        magnitude = dora_scale.reshape(out, *ones)
    elif dora_scale.dim() >= 2 and ds_shape[0] == 1 and ds_shape[1] == inp and dora_scale.numel() == inp:
        # per input channel: LyCORIS wd_on_out=False (1, in, ...), ComfyUI's historic convention
        norm = merged.transpose(0, 1).reshape(inp, -1).norm(dim=1).reshape(1, inp, *ones[1:])
        magnitude = dora_scale.reshape(1, inp, *ones[1:])
    else:
        raise ValueError(
            f"{algo}: dora_scale has shape {ds_shape}, which is neither per output channel ({out}, 1, ...) "
            f"nor per input channel (1, {inp}, ...) for a weight of shape {tuple(base.shape)}"
        )
    return merged * (magnitude / (norm + eps)) - base
