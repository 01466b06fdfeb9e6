"""Per-block LoRA strengths, written as the "LoRA Block Weight" extension writes them, or as merge weights.

Source of the forms and presets: hako-mikan/sd-webui-lora-block-weight,
`scripts/lora_block_weight.py` (BLOCKID12/17/20/26, `to26`, `ratiodealer`,
`DEF_WEIGHT_PRESET`, `loradealer`); its README's 17-block table agrees.

LoRA Block Weight (LBW) vectors name their blocks by position (`LBW_FORMS`):

* 17 values, the SD1.x/2.x LoRA form: BASE, IN01, IN02, IN04, IN05, IN07, IN08,
  M00 (the README's MID), OUT03 … OUT11: the blocks where kohya-style LoRAs keep
  their attention (transformer) modules;
* 26 values, the SD1.x/2.x "full" form for LyCORIS/LoCon: BASE, IN00 … IN11, M00, OUT00 … OUT11;
* 12 values, the SDXL LoRA form: BASE, IN04, IN05, IN07, IN08, M00, OUT00 … OUT05;
* 20 values, the SDXL full form: BASE, IN00 … IN08, M00, OUT00 … OUT08.

The extension's UI labels these "17(1.X/2.X)", "26(1.X/2.X full)", "12(XL)" and
"20(XL full)"; here a raw vector must have one of its architecture's two
lengths (`LBW_LENGTHS`).

Blocks a vector does not name get 0. That is what the extension does: `to26`
puts the vector into a 26-slot list that starts as `[0]*26`, by block name, and
`ratiodealer` then gives every LoRA module the slot of the block its key names
(`diffusion_model_input_blocks_3_` → IN03; the text encoders' keys → BASE).
For a plain LoRA the unnamed blocks hold no module (IN00 is conv_in, IN03/IN06/IN09
are downsamplers, IN10/IN11 and OUT00–OUT02 are ResNet blocks in SD1), so their
value changes nothing; for a LoCon/LyCORIS file, which has modules there, the
extension switches them off, and so does this.

The extension's default presets (`LBW_PRESETS`, its `DEF_WEIGHT_PRESET`) are all
17-value vectors (its 61-value FLUXALL is for Flux and left out). On sdxl they
are applied the way the extension applies any vector, by block name (`to26`):
IN01, IN02, IN04, IN05, IN07, IN08, M00 and OUT03–OUT08 take their values,
OUT09–OUT11 are dropped, and IN00, IN03, IN06 and OUT00–OUT02 get 0 (so `ALL`
on sdxl switches off OUT00–OUT02, where SDXL LoRAs have their deepest
attention layers); a warning says so.

Random and variable values (`R`, `U`, `X`, `X+0.5` …) are refused: a recipe must
give the same merge every time.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

from mergeprobe.checkpoints.archs import BASE, MIDDLE, Architecture
from mergeprobe.merging.blockspec import parse_number, resolve_block_weights, spec_problem
from mergeprobe.merging.presets import PRESET_BLOCK_COUNT, PRESET_BLOCKS, PRESETS, find_preset
from mergeprobe.service.errors import InvalidInput

SOURCE = "hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py"

_IN = tuple(f"IN{i:02d}" for i in range(12))
_OUT = tuple(f"OUT{i:02d}" for i in range(12))

# The extension's BLOCKID12/17/20/26 (its M00 is the README's MID).
LBW_FORMS: dict[int, tuple[str, ...]] = {
    12: (BASE, "IN04", "IN05", "IN07", "IN08", MIDDLE, *_OUT[0:6]),
    17: (BASE, "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", MIDDLE, *_OUT[3:12]),
    20: (BASE, *_IN[0:9], MIDDLE, *_OUT[0:9]),
    26: (BASE, *_IN, MIDDLE, *_OUT),
}
"""Vector length → the block of each value, as the extension reads it."""

LBW_LENGTHS: dict[str, tuple[int, ...]] = {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20)}
"""Architecture → the LBW vector lengths taken for it (the extension's LoRA form, then its full form)."""

PRESET_FORM = 17
"""Every default preset is a 17-value (SD1.x/2.x) vector."""

# Copied from the extension's DEF_WEIGHT_PRESET (data, not code), in its order; FLUXALL left out.
# fmt: off
LBW_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE":   (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "ALL":    (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "INS":    (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND":    (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL":  (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD":   (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD":   (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS":   (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5),
}
# fmt: on
"""The extension's default presets: name → 17 values (`LBW_FORMS[17]`)."""

DEFAULT_BASE = 1.0
"""BASE's strength when a merge-style value does not give it (a 25-value list, a spec without `BASE:`):
the LoRA's text-encoder part stays as it is, as in the extension when no block weights are given."""

_RANDOM = re.compile(r"[RU]|X(?:[+-][0-9.]*)?", re.IGNORECASE)
_BLOCKISH = re.compile(r"(?:IN|OUT)[0-9]{1,2}|M0{1,2}|BASE", re.IGNORECASE)
_NUMBERISH = re.compile(r"[+-]?(?:[0-9]|\.[0-9])")


def list_lbw_presets() -> list[tuple[str, str]]:
    """(name, vector as the extension writes it) for every default preset, in the extension's order."""
    return [(name, ",".join(f"{v:g}" for v in values)) for name, values in LBW_PRESETS.items()]


def lbw_presets_markdown() -> str:
    """The preset table for docs: one column per block of the 17-value form."""
    blocks = LBW_FORMS[PRESET_FORM]
    lines = [
        "| preset | " + " | ".join(blocks) + " |",
        "|---|" + "---|" * len(blocks),
    ]
    for name, values in LBW_PRESETS.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:g}" for v in values) + " |")
    return "\n".join(lines) + f"\n\nSource: {SOURCE} (`DEF_WEIGHT_PRESET`).\n"


def lbw_lengths(arch: Architecture) -> tuple[int, ...]:
    return LBW_LENGTHS.get(arch.name, ())


def _merge_lengths(arch: Architecture) -> tuple[int, ...]:
    """The list lengths `resolve_block_weights` takes for `arch` (see its docstring)."""
    n = len(arch.unet_blocks)
    takes_sd1 = n != PRESET_BLOCK_COUNT and set(arch.unet_blocks) <= set(PRESET_BLOCKS)
    return (n, n + 1, *((PRESET_BLOCK_COUNT, PRESET_BLOCK_COUNT + 1) if takes_sd1 else ()))


def _accepted_lengths(arch: Architecture) -> tuple[int, ...]:
    return tuple(sorted(set(lbw_lengths(arch)) | set(_merge_lengths(arch))))


def _describe_form(length: int) -> str:
    blocks = LBW_FORMS[length]
    if length == 26 or length == 20:
        return f"{length} (BASE, {blocks[1]}…{blocks[-1]})"
    return f"{length} ({', '.join(blocks)})"


def _length_detail(arch: Architecture, got: int) -> str:
    lbw = lbw_lengths(arch)
    merge = [n for n in _merge_lengths(arch) if n not in lbw]
    parts = (
        [f"LoRA Block Weight vectors of {' or '.join(_describe_form(n) for n in lbw)} values"] if lbw else []
    )
    if merge:
        parts.append(f"merge-weight lists of {' or '.join(str(n) for n in merge)} values")
    detail = (
        f"expected {', '.join(str(n) for n in _accepted_lengths(arch))} values for {arch.name}: "
        + "; ".join(parts)
    )
    detail += f"; got {got}"
    other = [name for name, lengths in LBW_LENGTHS.items() if got in lengths and name != arch.name]
    if other and got not in _accepted_lengths(arch):
        detail += f" (a {got}-value vector is LoRA Block Weight's form for {', '.join(other)})"
    return detail


def _random_detail(token: str) -> str:
    kind = "a random value" if token.upper() in ("R", "U") else "the LoRA's own strength (x=) as a variable"
    return (
        f"`{token}` is {kind} in LoRA Block Weight; random and variable values are not supported "
        "(a recipe must give the same merge every time): write the number"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _uniform(arch: Architecture, value: float) -> dict[str, float]:
    return dict.fromkeys(arch.blocks, float(value))


def _from_lbw(
    values: list[float], arch: Architecture, *, field: str, warnings: list[str] | None, what: str
) -> dict[str, float]:
    """Strengths from an LBW vector, by block name as the extension's `to26` places it; 0 where unnamed."""
    blocks = LBW_FORMS[len(values)]
    by_name = dict(zip(blocks, values, strict=True))
    result = {b: float(by_name.get(b, 0.0)) for b in arch.blocks}
    if warnings is not None and len(values) not in lbw_lengths(arch):
        zeroed = [b for b in arch.blocks if b not in by_name]
        dropped = [b for b in blocks if b not in arch.blocks]
        warnings.append(
            f"{field}: {what} is LoRA Block Weight's {len(values)}-value form, not {arch.name}'s "
            f"({' or '.join(str(n) for n in lbw_lengths(arch))} values); applied by block name as the "
            f"extension does: {', '.join(zeroed) or 'no block'} get 0"
            + (f", {', '.join(dropped)} dropped" if dropped else "")
        )
    return result


def _from_merge(
    value: Any, arch: Architecture, *, field: str, warnings: list[str] | None
) -> dict[str, float]:
    weights = resolve_block_weights(value, arch, field=field, warnings=warnings)
    return {b: (DEFAULT_BASE if w is None else float(w)) for b, w in weights.items()}


def _find_lbw_preset(name: str) -> str | None:
    wanted = name.strip()
    if wanted in LBW_PRESETS:
        return wanted
    folded = wanted.casefold()
    return next((p for p in LBW_PRESETS if p.casefold() == folded), None)


def _from_preset(
    name: str, arch: Architecture, *, field: str, warnings: list[str] | None
) -> dict[str, float]:
    return _from_lbw(list(LBW_PRESETS[name]), arch, field=field, warnings=warnings, what=f"the preset {name}")


def _unknown_name(token: str, pos: int, *, field: str) -> InvalidInput:
    close = difflib.get_close_matches(token.upper(), [*LBW_PRESETS, *PRESETS], n=1)
    return spec_problem(
        f"`{token}` is not a LoRA Block Weight preset ({', '.join(LBW_PRESETS)}), a merge preset, "
        "a number, a vector or a block-weight spec (`IN00-IN05:0.2, _:1`)"
        + (f"; did you mean {close[0]}?" if close else ""),
        field=field,
        position=pos,
    )


def _from_list(
    value: list[Any] | tuple[Any, ...], arch: Architecture, *, field: str, warnings: list[str] | None
) -> dict[str, float]:
    for i, v in enumerate(value):
        if isinstance(v, str) and _RANDOM.fullmatch(v.strip()):
            raise spec_problem(_random_detail(v.strip()), field=f"{field}[{i}]")
    if len(value) in lbw_lengths(arch):
        numbers: list[float] = []
        for i, v in enumerate(value):
            if not _is_number(v) or not math.isfinite(v):
                raise spec_problem(f"must be a finite number, got {v!r}", field=f"{field}[{i}]")
            numbers.append(float(v))
        return _from_lbw(numbers, arch, field=field, warnings=warnings, what=f"a {len(value)}-value vector")
    if len(value) in _merge_lengths(arch):
        return _from_merge(list(value), arch, field=field, warnings=warnings)
    raise spec_problem(_length_detail(arch, len(value)), field=field)


def _segments(text: str) -> list[tuple[int, int]]:
    bounds: list[tuple[int, int]] = []
    start = 0
    for i, ch in enumerate(text):
        if ch == ",":
            bounds.append((start, i))
            start = i + 1
    bounds.append((start, len(text)))
    return bounds


def _first(text: str, start: int, end: int) -> int:
    while start < end and text[start].isspace():
        start += 1
    return start


def _from_string(
    text: str, arch: Architecture, *, field: str, warnings: list[str] | None
) -> dict[str, float]:
    stripped = text.strip()
    if not stripped or ":" in text:
        return _from_merge(text, arch, field=field, warnings=warnings)  # its errors for these
    preset = _find_lbw_preset(text)
    if preset is not None:
        return _from_preset(preset, arch, field=field, warnings=warnings)
    segments = _segments(text)
    for start, end in segments:
        token = text[start:end].strip()
        if _RANDOM.fullmatch(token):
            raise spec_problem(_random_detail(token), field=field, position=_first(text, start, end))
    if len(segments) == 1:
        pos = _first(text, 0, len(text))
        if _NUMBERISH.match(stripped):
            return _uniform(arch, parse_number(text, field=field))
        if (
            "@" not in stripped
            and not _BLOCKISH.match(stripped)
            and find_preset(stripped, arch) is None
            and not any(ch.isspace() for ch in stripped)
        ):
            raise _unknown_name(stripped, pos, field=field)
        return _from_merge(text, arch, field=field, warnings=warnings)
    if _BLOCKISH.match(stripped):
        return _from_merge(text, arch, field=field, warnings=warnings)  # a spec lacking its `:RATIO`
    accepted = _accepted_lengths(arch)
    numbers: list[float] = []
    for k, (start, end) in enumerate(segments):
        if k == max(accepted):
            raise spec_problem(
                _length_detail(arch, len(segments)), field=field, position=_first(text, start, end)
            )
        numbers.append(parse_number(text, field=field, start=start, end=end))
    if len(numbers) in lbw_lengths(arch):
        return _from_lbw(numbers, arch, field=field, warnings=warnings, what=f"a {len(numbers)}-value vector")
    if len(numbers) in _merge_lengths(arch):
        return _from_merge(text, arch, field=field, warnings=warnings)
    raise spec_problem(_length_detail(arch, len(numbers)), field=field, position=len(text))


def resolve_lora_block_weights(
    value: Any, arch: Architecture, *, field: str, warnings: list[str] | None = None
) -> dict[str, float]:
    """A LoRA's strength multiplier for every block of `arch` (`arch.blocks`: BASE, then U-Net order).

    `value` is one of:

    * a number, or a string holding one: every block, BASE included, gets it;
    * a LoRA Block Weight vector, as a list of numbers or a comma-separated string
      (`"1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"`, spaces allowed): 17 or 26 values on
      sd1/sd2, 12 or 20 on sdxl (`LBW_FORMS`); blocks it does not name get 0, as
      in the extension (see the module docstring);
    * a LoRA Block Weight preset name (`LBW_PRESETS`: `ALL`, `OUTALL`, `ALL0.5` …;
      exact, else any case); on sdxl its 17 values go by block name, with a warning;
    * anything `mergeprobe.merging.blockspec.resolve_block_weights` takes (a 25-value
      list, 19 on sdxl, a merge preset such as `GRAD_V`, a spec
      `IN00-IN03:0.3, _:0.7`): what it gives, BASE `DEFAULT_BASE` (1) when it
      gives none.

    Lines about conversions are appended to `warnings` when given. Errors are
    `InvalidInput` with `field` (`field[i]` for a list element) and, in a string,
    the `position` of the offending value; `R`, `U` and `X…` are refused.
    """
    if _is_number(value):
        if not math.isfinite(value):
            raise spec_problem(f"must be a finite number, got {value}", field=field)
        return _uniform(arch, value)
    if isinstance(value, list | tuple):
        return _from_list(value, arch, field=field, warnings=warnings)
    if isinstance(value, str):
        return _from_string(value, arch, field=field, warnings=warnings)
    raise spec_problem(
        "must be a number, a LoRA Block Weight vector or preset name, a list of numbers or a "
        "block-weight spec such as `IN00-IN05:0.2, _:1`",
        field=field,
    )
