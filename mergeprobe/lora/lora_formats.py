"""What a LoRA file holds, from its tensor table alone: pure Python, never imports torch.

:func:`describe_lora` takes a :class:`~mergeprobe.checkpoints.checkpoint_headers.CheckpointHeader`
(``read_checkpoint_header``) and returns a :class:`LoraFile`, or None when the file is not a LoRA
at all (a checkpoint, an embedding ...). A file that looks like a LoRA but whose tensors do not fit
together raises :class:`LoraFormatError`, naming the module.

A module is the key prefix before a per-module suffix. The suffixes and the rank / alpha
conventions follow the writers and readers of these files:

* kohya sd-scripts ``networks/lora.py`` (LoRA, LoCon): ``<m>.lora_down.weight`` (rank × in[× kh × kw]),
  ``<m>.lora_up.weight`` (out × rank[× 1 × 1]), scalar ``<m>.alpha``; rank = lora_down.shape[0];
  scale = alpha / rank, alpha absent or 0 meaning alpha = rank. LyCORIS ``locon.py`` adds
  ``<m>.lora_mid.weight`` (rank × rank × kh × kw, CP/Tucker), then lora_down and lora_up are 1×1.
* LyCORIS ``loha.py``: ``hada_w1_a`` (out × r), ``hada_w1_b`` (r × in·kh·kw), ``hada_w2_a``,
  ``hada_w2_b``; rank = hada_w1_b.shape[0] (ComfyUI ``weight_adapter/loha.py`` too). With Tucker
  (``hada_t1``, ``hada_t2``: r × r × kh × kw) the ``_a`` factors are stored r × out.
* LyCORIS ``lokr.py``: ``lokr_w1`` or ``lokr_w1_a`` @ ``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a`` @
  ``lokr_w2_b`` (Tucker: ``lokr_t2`` r × r × kh × kw, ``lokr_w2_a`` r × out2); ΔW = kron(w1, w2).
  Rank: the ``_b`` factor's first dimension, w2's when w2 is factored (ComfyUI), else w1's; "full"
  when neither is factored (then the scale is 1 whatever alpha says: both LyCORIS and ComfyUI).
* ``dora_scale`` beside any of them (LyCORIS weight decomposition): 1 × in[× 1 × 1], one norm per
  input channel, or out × 1[× 1 × 1] (LyCORIS ``wd_on_out``), one per output channel. PEFT's
  ``lora_magnitude_vector`` is one per output channel: shape out, or 1 × out × 1 × 1 on a conv.
* LyCORIS ``full.py`` (``diff``, ``diff_b``) and ``ia3.py`` (``weight`` + ``on_input``).
* diffusers / PEFT: ``<m>.lora_A.weight`` (down), ``<m>.lora_B.weight`` (up); older diffusers
  ``<m>.lora.down.weight`` / ``<m>.lora.up.weight``, ``<m>_lora.down.weight`` (attention
  processors), ``<m>.lora_linear_layer.down.weight``. No alpha tensor: PEFT's ``lora_alpha`` comes
  from the ``lora_adapter_metadata`` JSON in the safetensors metadata, else alpha = rank; with
  ``use_rslora`` there the scale is alpha / sqrt(rank), carried as alpha · sqrt(rank) (see
  :func:`_peft_rslora`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader, TensorInfo, read_float_values

__all__ = [
    "ALGORITHMS",
    "BAKEABLE_ALGORITHMS",
    "TRAINING_METADATA_KEYS",
    "LoraFile",
    "LoraFormatError",
    "LoraModule",
    "describe_lora",
]

ALGORITHMS = ("lora", "locon", "loha", "lokr", "full", "ia3")
# Those whose ΔW is a function of the LoRA's own tensors (IA3 scales the base weight; "full" is a
# plain difference the merge engines may take as is, listed apart so that callers decide).
BAKEABLE_ALGORITHMS = frozenset({"lora", "locon", "loha", "lokr"})

# Training metadata passed through (kohya sd-scripts ss_*, the Stability modelspec.*). Others
# (ss_tag_frequency, ss_dataset_dirs, modelspec.thumbnail ...) can be megabytes and are left out.
TRAINING_METADATA_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_sd_model_hash",
    "ss_new_sd_model_hash",
    "ss_v2",
    "ss_v_parameterization",
    "ss_output_name",
    "ss_training_comment",
    "ss_resolution",
    "ss_clip_skip",
    "ss_num_train_images",
    "ss_epoch",
    "ss_steps",
    "ss_max_train_steps",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_mixed_precision",
    "ss_training_started_at",
    "ss_training_finished_at",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.title",
    "modelspec.resolution",
)
_MAX_METADATA_VALUE = 1000

_PEFT_METADATA_KEY = "lora_adapter_metadata"


class LoraFormatError(ValueError):
    """The file is a LoRA whose tensors do not fit together. The message names the module."""


@dataclass(frozen=True)
class LoraModule:
    name: str  # the key prefix, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in" or "unet.xxx.to_q"
    algorithm: str  # one of ALGORITHMS
    key_style: str  # "kohya" | "lycoris" | "peft" | "diffusers"
    component: str  # "unet" | "te" | "te1" | "te2" | "unknown"
    keys: dict[str, str]  # role -> tensor key; roles: down up mid alpha dora_scale magnitude hada_w1_a ...
    rank: int | str | None  # int; "full" for LoKr with no factored side; None for full / ia3
    # read from the file (path given) or the PEFT metadata (with use_rslora: × sqrt(rank)); else None
    alpha: float | None
    alpha_source: str  # "tensor" | "metadata" | "default" (none stored: alpha = rank) | "none" (full/ia3)
    is_conv: bool | None  # None: 2-D factors that may hold a flattened conv kernel (LoHa/LoKr w/o Tucker)
    dora: bool
    tucker: bool  # lora_mid / hada_t1,t2 / lokr_t2
    delta_shape: tuple[int, ...] | None  # the ΔW the factors produce: (out, in[, kh, kw]); None for ia3

    @property
    def scale(self) -> float | None:
        """alpha / rank, what ΔW is multiplied by before the user's strength; None when unknown."""
        if self.algorithm in ("full", "ia3") or self.rank == "full":
            return 1.0
        if self.alpha_source == "default":
            return 1.0
        if self.alpha is None or not isinstance(self.rank, int):
            return None
        if self.alpha == 0:  # kohya: alpha 0 means alpha = rank
            return 1.0
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoraFile:
    path: str | None
    formats: tuple[str, ...]  # "<key_style>-<algorithm>" (e.g. kohya-lora, lycoris-loha, peft-lora), sorted
    modules: dict[str, LoraModule]  # file order
    ranks: tuple[int, ...]  # distinct integer ranks, sorted
    alphas: tuple[float, ...]  # distinct alphas read, sorted
    algorithms: tuple[str, ...]  # in ALGORITHMS order
    dora: bool
    touches_unet: bool
    text_encoders: tuple[str, ...]  # components among "te", "te1", "te2"
    training_metadata: dict[str, str]
    arch: str  # "sd1" | "sd2" | "sdxl" | "unknown" (a guess)
    arch_source: str  # why
    unrecognised: tuple[str, ...]  # keys that fit no known suffix
    unbakeable_modules: tuple[str, ...] = field(default=())  # modules whose algorithm is not bakeable

    @property
    def module_count(self) -> int:
        return len(self.modules)

    @property
    def touches_text_encoders(self) -> bool:
        return bool(self.text_encoders)


# -- key suffixes ----------------------------------------------------------------------------

# (suffix, role, key style). Tried in order; no suffix here ends another one of the list with a
# different meaning except ".weight" (IA3), handled apart. Roles shared by styles mean the same.
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_magnitude_vector.weight", "magnitude", "peft"),
    (".lora_magnitude_vector", "magnitude", "peft"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    ("_lora.down.weight", "down", "diffusers"),
    ("_lora.up.weight", "up", "diffusers"),
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".hada_w1_a", "hada_w1_a", "lycoris"),
    (".hada_w1_b", "hada_w1_b", "lycoris"),
    (".hada_w2_a", "hada_w2_a", "lycoris"),
    (".hada_w2_b", "hada_w2_b", "lycoris"),
    (".hada_t1", "hada_t1", "lycoris"),
    (".hada_t2", "hada_t2", "lycoris"),
    (".lokr_w1", "lokr_w1", "lycoris"),
    (".lokr_w1_a", "lokr_w1_a", "lycoris"),
    (".lokr_w1_b", "lokr_w1_b", "lycoris"),
    (".lokr_w2", "lokr_w2", "lycoris"),
    (".lokr_w2_a", "lokr_w2_a", "lycoris"),
    (".lokr_w2_b", "lokr_w2_b", "lycoris"),
    (".lokr_t2", "lokr_t2", "lycoris"),
    (".diff_b", "diff_b", "lycoris"),
    (".diff", "diff", "lycoris"),
    (".on_input", "on_input", "lycoris"),
    (".alpha", "alpha", ""),
    (".dora_scale", "dora_scale", ""),
)
_COMMON_ROLES = frozenset({"alpha", "dora_scale", "magnitude"})
_FAMILY_OF_ROLE = {
    "down": "lora",
    "up": "lora",
    "mid": "lora",
    "hada_w1_a": "loha",
    "hada_w1_b": "loha",
    "hada_w2_a": "loha",
    "hada_w2_b": "loha",
    "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr",
    "lokr_w1_a": "lokr",
    "lokr_w1_b": "lokr",
    "lokr_w2": "lokr",
    "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr",
    "lokr_t2": "lokr",
    "diff": "full",
    "diff_b": "full",
    "ia3_weight": "ia3",
    "on_input": "ia3",
}

# Module-name prefixes -> component. kohya / LyCORIS, then diffusers / PEFT (and ComfyUI's own).
_COMPONENT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"),
    ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"),
)

_ARCH_BY_TE_WIDTH = {768: "sd1", 1024: "sd2"}
_ARCH_BY_CROSS_ATTN_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _component(name: str) -> tuple[str, str]:
    """(component, the name without its component prefix)."""
    for prefix, component in _COMPONENT_PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix) :]
    return "unknown", name


def _split_key(key: str, tensors: dict[str, TensorInfo]) -> tuple[str, str, str] | None:
    """(module, role, key style) of a key, or None when it fits no known suffix."""
    for suffix, role, style in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role, style
    # IA3's "<m>.weight" is any checkpoint's key too: only beside its "<m>.on_input".
    if key.endswith(".weight") and key[: -len(".weight")] + ".on_input" in tensors:
        return key[: -len(".weight")], "ia3_weight", "lycoris"
    return None


# -- describe_lora ---------------------------------------------------------------------------


def describe_lora(
    header: CheckpointHeader,
    path: str | os.PathLike[str] | None = None,
    *,
    fileobj: BinaryIO | None = None,
) -> LoraFile | None:
    """Describe the LoRA in `header`; None when the file is not a LoRA (no LoRA key, or mostly keys
    that fit no LoRA suffix). Alphas are read from `path` (or `fileobj`) when given, else None.

    Raises LoraFormatError when the LoRA's tensors do not fit together (a lora_up without its
    lora_down, ranks that differ between factors, a LoHa without hada_w1_b ...)."""
    tensors = header.tensors
    grouped: dict[str, dict[str, str]] = {}
    styles: dict[str, set[str]] = {}
    unrecognised: list[str] = []
    for key in tensors:
        split = _split_key(key, tensors)
        if split is None:
            unrecognised.append(key)
            continue
        module, role, style = split
        roles = grouped.setdefault(module, {})
        if role in roles:
            raise LoraFormatError(
                f"LoRA module {module!r}: two tensors for its {role!r}: {roles[role]!r} and {key!r}"
            )
        roles[role] = key
        if style:
            styles.setdefault(module, set()).add(style)

    # Modules with only alpha / dora_scale (ComfyUI ignores them too) count as unrecognised.
    for module in [m for m, roles in grouped.items() if set(roles) <= _COMMON_ROLES]:
        unrecognised.extend(grouped.pop(module).values())
    recognised = sum(len(roles) for roles in grouped.values())
    if recognised == 0 or len(unrecognised) > recognised:
        return None

    read_path = os.fspath(path) if path is not None else None
    can_read = read_path is not None or fileobj is not None
    peft_alphas = _peft_alphas(header.metadata)

    modules: dict[str, LoraModule] = {}
    for name, roles in grouped.items():
        module_styles = styles.get(name, set())
        if len(module_styles - {"lycoris"}) > 1:
            raise LoraFormatError(f"LoRA module {name!r} mixes key namings: {sorted(module_styles)}")
        modules[name] = _describe_module(
            name,
            roles,
            module_styles,
            tensors,
            (lambda module, key: _read_alpha(module, key, header, read_path, fileobj)) if can_read else None,
            peft_alphas,
        )

    unbakeable = tuple(n for n, m in modules.items() if m.algorithm not in BAKEABLE_ALGORITHMS)
    components = {m.component for m in modules.values()}
    arch, arch_source = _guess_arch(header.metadata, modules)
    return LoraFile(
        path=read_path,
        formats=tuple(sorted({f"{m.key_style}-{m.algorithm}" for m in modules.values()})),
        modules=modules,
        ranks=tuple(sorted({m.rank for m in modules.values() if isinstance(m.rank, int)})),
        alphas=tuple(sorted({m.alpha for m in modules.values() if m.alpha is not None})),
        algorithms=tuple(a for a in ALGORITHMS if any(m.algorithm == a for m in modules.values())),
        dora=any(m.dora for m in modules.values()),
        touches_unet="unet" in components,
        text_encoders=tuple(c for c in ("te", "te1", "te2") if c in components),
        training_metadata=_training_metadata(header.metadata),
        arch=arch,
        arch_source=arch_source,
        unrecognised=tuple(unrecognised),
        unbakeable_modules=unbakeable,
    )


def _read_alpha(
    module: str,
    key: str,
    header: CheckpointHeader,
    path: str | None,
    fileobj: BinaryIO | None,
) -> float | None:
    values = read_float_values(path, header, key, fileobj=fileobj)
    if values is None:
        return None
    if len(values) != 1:
        raise LoraFormatError(f"LoRA module {module!r}: alpha {key!r} holds {len(values)} values, not one")
    return values[0]


def _peft_alphas(metadata: dict[str, str]) -> dict[str, object]:
    """The PEFT LoraConfig(s) diffusers stores as JSON under "lora_adapter_metadata": keys
    "lora_alpha", "alpha_pattern", "r", each possibly prefixed by its component ("unet.lora_alpha")."""
    raw = metadata.get(_PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _peft_alpha(name: str, peft: dict[str, object]) -> float | None:
    if not peft:
        return None
    component_prefix = next((p for p, _ in _COMPONENT_PREFIXES if name.startswith(p) and "." in p), "")
    bare = name[len(component_prefix) :]
    for prefix in (component_prefix, ""):
        pattern = peft.get(prefix + "alpha_pattern")
        if isinstance(pattern, dict):
            for target, value in pattern.items():
                if (bare == target or bare.endswith("." + target)) and isinstance(value, int | float):
                    return float(value)
        value = peft.get(prefix + "lora_alpha")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _peft_rslora(name: str, peft: dict[str, object]) -> bool:
    """Whether the module's PEFT LoraConfig says ``use_rslora`` (rank-stabilised LoRA: PEFT's
    ``scaling = lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``), its component's key first."""
    if not peft:
        return False
    component_prefix = next((p for p, _ in _COMPONENT_PREFIXES if name.startswith(p) and "." in p), "")
    for prefix in dict.fromkeys((component_prefix, "")):
        value = peft.get(prefix + "use_rslora")
        if isinstance(value, bool):
            return value
    return False


def _shape(tensors: dict[str, TensorInfo], roles: dict[str, str], role: str) -> tuple[int, ...] | None:
    key = roles.get(role)
    return None if key is None else tuple(tensors[key].shape)


def _describe_module(
    name: str,
    roles: dict[str, str],
    styles: set[str],
    tensors: dict[str, TensorInfo],
    read_alpha: Callable[[str, str], float | None] | None,
    peft: dict[str, object],
) -> LoraModule:
    families = {_FAMILY_OF_ROLE[r] for r in roles if r not in _COMMON_ROLES}
    if len(families) > 1:
        raise LoraFormatError(f"LoRA module {name!r} mixes the tensors of {' and '.join(sorted(families))}")
    (family,) = families

    def shape(role: str) -> tuple[int, ...] | None:
        return _shape(tensors, roles, role)

    def fail(problem: str) -> LoraFormatError:
        return LoraFormatError(f"LoRA module {name!r} ({family}): {problem}")

    if family == "lora":
        algorithm, rank, is_conv, tucker, delta = _lora_factors(shape, fail)
    elif family == "loha":
        algorithm, rank, is_conv, tucker, delta = _loha_factors(shape, fail)
    elif family == "lokr":
        algorithm, rank, is_conv, tucker, delta = _lokr_factors(shape, fail)
    elif family == "full":
        diff = shape("diff")
        if diff is None:
            raise fail("diff_b without diff")
        algorithm, rank, is_conv, tucker, delta = "full", None, len(diff) > 2, False, diff
    else:
        weight = shape("ia3_weight")
        if weight is None:
            raise fail("on_input without weight")
        algorithm, rank, is_conv, tucker, delta = "ia3", None, len(weight) > 2, False, None

    if family == "lora":
        key_style = next(iter(styles))
    else:
        key_style = "lycoris"

    if "alpha" in roles:
        alpha_key = roles["alpha"]
        if tensors[alpha_key].numel != 1:
            raise fail(f"alpha {alpha_key!r} is not a scalar: shape {list(tensors[alpha_key].shape)}")
        alpha = read_alpha(name, alpha_key) if read_alpha is not None else None
        alpha_source = "tensor"
    elif family in ("full", "ia3"):
        alpha, alpha_source = None, "none"
    elif (peft_alpha := _peft_alpha(name, peft)) is not None:
        alpha, alpha_source = peft_alpha, "metadata"
    else:
        alpha, alpha_source = None, "default"
    if alpha_source in ("metadata", "default") and isinstance(rank, int) and _peft_rslora(name, peft):
        # PEFT use_rslora: scale = alpha / sqrt(rank). Everything downstream (LoraModule.scale, the
        # bake's lora_delta / addmm_) computes alpha / rank, so the module carries the effective
        # alpha · sqrt(rank) (alpha = rank where the config gives no lora_alpha), as LyCORIS
        # stores an rs-LoRA's alpha; LoraFile.alphas lists that effective alpha.
        alpha = (rank if alpha is None else alpha) * math.sqrt(rank)
        alpha_source = "metadata"

    if family in ("lora", "loha", "lokr") and delta is not None:
        _check_dora(roles, shape, delta, is_conv, fail)

    return LoraModule(
        name=name,
        algorithm=algorithm,
        key_style=key_style,
        component=_component(name)[0],
        keys=dict(roles),
        rank=rank,
        alpha=alpha,
        alpha_source=alpha_source,
        is_conv=is_conv,
        dora="dora_scale" in roles or "magnitude" in roles,
        tucker=tucker,
        delta_shape=delta,
    )


def _check_dora(roles, shape, delta, is_conv, fail) -> None:
    """A DoRA magnitude must fit the module's ΔW (out, in[, kh, kw]) as lora_delta reads it:
    ``dora_scale`` (out, 1[, 1, 1]) or (out,) per output channel, (1, in[, 1, 1]) per input
    channel; PEFT's ``lora_magnitude_vector`` one value per output channel, (out,) or
    (1, out, 1, 1). A LoHa / LoKr ΔW of 2-D factors may hold a conv kernel flattened
    (``is_conv`` None: in · kh · kw columns), so there any divisor of its columns may be `in`."""
    if "dora_scale" in roles and "magnitude" in roles:
        raise fail("both a dora_scale and a lora_magnitude_vector")
    out, columns = delta[0], math.prod(delta[1:])
    inp = delta[1] if len(delta) > 1 else 1
    if "magnitude" in roles:
        m = shape("magnitude")
        if math.prod(m) == out and [d for d in m if d != 1] in ([], [out]):
            return
        raise fail(
            f"lora_magnitude_vector {list(m)} is not one value per output channel of its {list(delta)} update: "
            f"expected [{out}] (or [1, {out}, 1, 1] on a conv)"
        )
    if "dora_scale" not in roles:
        return
    ds = shape("dora_scale")
    trailing_ones = all(d == 1 for d in ds[2:])
    if len(ds) >= 1 and ds[0] == out and all(d == 1 for d in ds[1:]):
        return  # per output channel (LyCORIS wd_on_out)
    if len(ds) >= 2 and ds[0] == 1 and trailing_ones and ds[1] > 0:
        if ds[1] == inp or (is_conv is None and len(delta) == 2 and columns % ds[1] == 0):
            return  # per input channel
    raise fail(
        f"dora_scale {list(ds)} fits neither the output axis ([{out}, 1, …]) nor the input axis "
        f"([1, {inp}, …]) of its {list(delta)} update"
    )


def _lora_factors(shape, fail):
    down, up, mid = shape("down"), shape("up"), shape("mid")
    if down is None:
        raise fail("lora up weight without its down weight")
    if up is None:
        raise fail("lora down weight without its up weight")
    if len(down) not in (2, 4) or len(up) not in (2, 4):
        raise fail(f"down {list(down)} and up {list(up)} must be 2-D (linear) or 4-D (conv)")
    if up[2:] not in ((), (1, 1)):
        # the kernel is down's (or mid's): an up is out × rank[ × 1 × 1] (kohya, LyCORIS, ComfyUI)
        raise fail(f"lora_up {list(up)} must be 1×1: the kernel is lora_down's (or lora_mid's)")
    rank = down[0]
    if mid is not None:
        # LoCon CP: down rank × in × 1 × 1, mid rank × rank × kh × kw, up out × rank × 1 × 1.
        if len(mid) != 4 or len(down) != 4:
            raise fail(f"lora_mid {list(mid)} needs 4-D factors (down {list(down)})")
        if mid[1] != rank or math.prod(up[1:]) != mid[0]:
            raise fail(f"rank mismatch: down {list(down)}, mid {list(mid)}, up {list(up)}")
        if down[2:] != (1, 1):
            raise fail(f"with lora_mid, down must be 1×1: {list(down)}")
        return "locon", rank, True, True, (up[0], down[1], *mid[2:])
    if math.prod(up[1:]) != rank:
        raise fail(f"rank mismatch: down {list(down)} has rank {rank}, up {list(up)} takes {up[1]}")
    is_conv = len(down) == 4 or len(up) == 4
    kernel = down[2:] if len(down) == 4 else ()
    algorithm = "locon" if any(k != 1 for k in kernel) else "lora"
    delta = (up[0], down[1], *kernel) if is_conv else (up[0], down[1])
    if is_conv and len(down) == 2:  # a 2-D down with a 4-D 1×1 up: a 1×1 conv
        delta = (up[0], down[1], 1, 1)
    return algorithm, rank, is_conv, False, delta


def _loha_factors(shape, fail):
    w1a, w1b, w2a, w2b = (shape(r) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    t1, t2 = shape("hada_t1"), shape("hada_t2")
    for role, s in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
        if s is None:
            raise fail(f"{role} is missing")
        if len(s) != 2:
            raise fail(f"{role} must be 2-D: {list(s)}")
    if (t1 is None) != (t2 is None):
        raise fail("hada_t1 and hada_t2 come together")
    rank = w1b[0]
    if t1 is not None:
        # Tucker: t r × r × kh × kw; the a factors r × out, the b factors r × in.
        for t, a, b, i in ((t1, w1a, w1b, 1), (t2, w2a, w2b, 2)):
            if len(t) < 3 or t[0] != a[0] or t[1] != b[0]:
                raise fail(
                    f"rank mismatch: hada_t{i} {list(t)}, hada_w{i}_a {list(a)}, hada_w{i}_b {list(b)}"
                )
        if (w1a[1], w1b[1], t1[2:]) != (w2a[1], w2b[1], t2[2:]):
            raise fail("the two Hadamard factors build different shapes")
        return "loha", rank, True, True, (w1a[1], w1b[1], *t1[2:])
    if w1a[1] != w1b[0]:
        raise fail(f"rank mismatch: hada_w1_a {list(w1a)}, hada_w1_b {list(w1b)}")
    if w2a[1] != w2b[0]:
        raise fail(f"rank mismatch: hada_w2_a {list(w2a)}, hada_w2_b {list(w2b)}")
    if (w1a[0], w1b[1]) != (w2a[0], w2b[1]):
        raise fail(f"the two Hadamard factors build {[w1a[0], w1b[1]]} and {[w2a[0], w2b[1]]}")
    return "loha", rank, None, False, (w1a[0], w1b[1])


def _lokr_side(shape, fail, i):
    """(shape of w_i, rank or None when stored whole, Tucker)."""
    full, a, b = shape(f"lokr_w{i}"), shape(f"lokr_w{i}_a"), shape(f"lokr_w{i}_b")
    t = shape("lokr_t2") if i == 2 else None
    if full is not None:
        if a is not None or b is not None or t is not None:
            raise fail(f"lokr_w{i} beside its factors lokr_w{i}_a/_b")
        return full, None, False
    if a is None or b is None:
        missing = f"lokr_w{i}_b" if a is not None else f"lokr_w{i}_a" if b is not None else f"lokr_w{i}"
        raise fail(f"{missing} is missing")
    if len(a) != 2 or len(b) != 2:
        raise fail(f"lokr_w{i}_a {list(a)} and lokr_w{i}_b {list(b)} must be 2-D")
    if t is not None:  # t2 r × r × kh × kw, w2_a r × out2, w2_b r × in2
        if len(t) < 3 or t[0] != a[0] or t[1] != b[0]:
            raise fail(f"rank mismatch: lokr_t2 {list(t)}, lokr_w2_a {list(a)}, lokr_w2_b {list(b)}")
        return (a[1], b[1], *t[2:]), b[0], True
    if a[1] != b[0]:
        raise fail(f"rank mismatch: lokr_w{i}_a {list(a)}, lokr_w{i}_b {list(b)}")
    return (a[0], b[1]), b[0], False


def _lokr_factors(shape, fail):
    w1, rank1, _ = _lokr_side(shape, fail, 1)
    w2, rank2, tucker = _lokr_side(shape, fail, 2)
    if len(w1) != 2:
        raise fail(f"w1 must be 2-D: {list(w1)}")
    if len(w2) not in (2, 4):
        raise fail(f"w2 must be 2-D (linear) or 4-D (conv): {list(w2)}")
    rank = rank2 if rank2 is not None else rank1 if rank1 is not None else "full"
    delta = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    is_conv = True if len(w2) > 2 else (False if rank2 is None else None)
    return "lokr", rank, is_conv, tucker, delta


# -- metadata and architecture ---------------------------------------------------------------


def _training_metadata(metadata: dict[str, str]) -> dict[str, str]:
    return {k: metadata[k][:_MAX_METADATA_VALUE] for k in TRAINING_METADATA_KEYS if k in metadata}


def _arch_from_base_model_version(value: str) -> str:
    # kohya sd-scripts: "sd_v1", "sd_v2", "sdxl_base_v1-0", "sd3", "flux1" ...
    v = value.lower()
    if v.startswith("sdxl"):
        return "sdxl"
    if v.startswith("sd_v2"):
        return "sd2"
    if v.startswith("sd_v1"):
        return "sd1"
    return "unknown"


def _arch_from_modelspec(value: str) -> str:
    # modelspec: "stable-diffusion-v1/lora", "stable-diffusion-v2-768-v/lora",
    # "stable-diffusion-xl-v1-base/lora", "flux-1-dev/lora" ...
    v = value.lower()
    if v.startswith("stable-diffusion-xl"):
        return "sdxl"
    if v.startswith("stable-diffusion-v2"):
        return "sd2"
    if v.startswith("stable-diffusion-v1"):
        return "sd1"
    return "unknown"


def _guess_arch(metadata: dict[str, str], modules: dict[str, LoraModule]) -> tuple[str, str]:
    if value := metadata.get("ss_base_model_version"):
        arch = _arch_from_base_model_version(value)
        return arch, f"metadata ss_base_model_version={value[:80]!r}" + (
            "" if arch != "unknown" else " (not an architecture of ours)"
        )
    if value := metadata.get("modelspec.architecture"):
        arch = _arch_from_modelspec(value)
        return arch, f"metadata modelspec.architecture={value[:80]!r}" + (
            "" if arch != "unknown" else " (not an architecture of ours)"
        )
    if metadata.get("ss_v2", "").lower() == "true":
        return "sd2", "metadata ss_v2='True'"

    components = {m.component for m in modules.values()}
    if components & {"te1", "te2"}:
        return "sdxl", "two text encoders (lora_te1_/lora_te2_ or text_encoder_2 modules)"
    te_widths = set()
    for m in modules.values():
        if m.component != "te" or m.delta_shape is None or len(m.delta_shape) != 2:
            continue
        bare = _component(m.name)[1]
        if any(p in bare for p in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")):
            te_widths.add(m.delta_shape[1])
        elif "fc2" in bare:
            te_widths.add(m.delta_shape[0])
    if len(te_widths) == 1 and (width := next(iter(te_widths))) in _ARCH_BY_TE_WIDTH:
        return _ARCH_BY_TE_WIDTH[width], f"text encoder hidden size {width}"
    cross = set()
    for m in modules.values():
        bare = _component(m.name)[1]
        if m.component == "unet" and m.delta_shape is not None and len(m.delta_shape) == 2:
            if bare.endswith(("attn2_to_k", "attn2.to_k", "attn2.processor.to_k")):
                cross.add(m.delta_shape[1])
    if len(cross) == 1 and (width := next(iter(cross))) in _ARCH_BY_CROSS_ATTN_WIDTH:
        return _ARCH_BY_CROSS_ATTN_WIDTH[width], f"U-Net cross-attention to_k input width {width}"
    if te_widths or cross:
        return "unknown", (
            f"no metadata; text encoder widths {sorted(te_widths)}, "
            f"cross-attention widths {sorted(cross)} fit no architecture of ours"
        )
    return "unknown", "no metadata and no text encoder or cross-attention module to measure"


def lora_summary(lora: LoraFile) -> dict[str, object]:
    """What the library shows of a LoRA (JSON): enough to choose it and bake it, not every module."""
    return {
        "arch": lora.arch,
        "arch_source": lora.arch_source,
        "formats": list(lora.formats),
        "algorithms": list(lora.algorithms),
        "module_count": lora.module_count,
        "ranks": list(lora.ranks),
        "alphas": list(lora.alphas),
        "dora": lora.dora,
        "touches_unet": lora.touches_unet,
        "text_encoders": list(lora.text_encoders),
        "unbakeable_modules": len(lora.unbakeable_modules),
        "training_metadata": dict(lora.training_metadata),
    }
