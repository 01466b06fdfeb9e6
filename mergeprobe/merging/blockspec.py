"""The block-selection, sampler-step and block-weight grammars (pure Python: the API validates with it).

Block names follow the architecture (`mergeprobe.checkpoints.archs`): sd1/sd2 IN00–IN11, M00,
OUT00–OUT11; sdxl IN00–IN08, M00, OUT00–OUT08; BASE is everything outside the
U-Net. Names are case-insensitive and may drop the leading zero (`in5` = IN05,
`M0` = M00).

Block sets (`parse_block_set`), comma-separated items, whitespace anywhere
between tokens::

    IN00                       one block
    IN00, IN01, M00            a list
    IN09-OUT02                 an inclusive range in U-Net order (IN11 → M00 → OUT00)
    IN00-OUT11(+2)             every 2nd block of the range, counted from its start

The result is in U-Net order (BASE first when allowed) without duplicates.
`parse_block_words` is the same item grammar with items separated by spaces
instead of commas (so no spaces inside a range); it is the block column of
the elemental grammar and takes BASE.

Sampler steps (`parse_steps`): `1,5-20(+5)`, 1-based, blank = every step.

Block weights (`resolve_block_weights`): a number, a list of numbers, a
preset name (`GRAD_V`, or `GRAD_V@depth` for the depth-resampled curve on
sdxl), a comma-separated number string, or a spec
`IN00-IN05:0.2, M00:1, OUT00-OUT11(+2):0.7, _:0.5`; see that function.
Presets and sd1 lists on sdxl follow SuperMerger (`mergeprobe.merging.presets`).

Every error is an `InvalidInput` error with slug `invalid-spec`, the request field,
and `position`: the 0-based character offset of the offending token in the
string as the client sent it (plus the caller's `offset`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from mergeprobe.checkpoints.archs import ARCHITECTURES, BASE, MIDDLE, Architecture
from mergeprobe.merging.presets import PRESET_BLOCK_COUNT, PRESET_BLOCKS, PRESETS, find_preset, sd1_to_arch
from mergeprobe.service.errors import InvalidInput

SLUG = "invalid-spec"
TITLE = "Invalid spec"
DEFAULT_NAMES = ("_", "default")
"""Block part of a weight-spec entry that sets every U-Net block no other entry names."""
PRESET_OPTION_MARK = "@"
DEPTH_OPTION = "depth"
"""`GRAD_V@depth`: the preset's curve resampled over U-Net depth instead of SuperMerger's conversion."""

_WORD = re.compile(r"[A-Za-z0-9_]+")
_INT = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BLOCK_NAME = re.compile(r"(IN|OUT)([0-9]{1,2})|(M0{1,2})|(BASE)")
_STEP = re.compile(r"\s*\+\s*([0-9]+)\s*")
_ANY_ARCH_BLOCKS = frozenset(b for a in ARCHITECTURES.values() for b in a.unet_blocks)


def spec_problem(detail: str, *, field: str, position: int | None = None) -> InvalidInput:
    """The 400 every grammar here raises."""
    return InvalidInput(SLUG, TITLE, detail, field=field, position=position)


def describe_blocks(arch: Architecture, *, with_base: bool = False) -> str:
    """`IN00–IN08, M00, OUT00–OUT08` (with `BASE, ` in front when asked)."""
    text = f"IN00–IN{arch.input_blocks - 1:02d}, {MIDDLE}, OUT00–OUT{arch.output_blocks - 1:02d}"
    return f"{BASE}, {text}" if with_base else text


def format_blocks(blocks: Iterable[str], arch: Architecture) -> str:
    """Blocks written back in the grammar, runs of 3+ adjacent U-Net blocks as ranges.

    `format_blocks(["IN03", "IN04", "IN05", "OUT00"], sd1)` → `IN03-IN05, OUT00`.
    """
    chosen = set(blocks)
    parts: list[str] = [BASE] if BASE in chosen else []
    order = arch.unet_blocks
    i = 0
    while i < len(order):
        if order[i] not in chosen:
            i += 1
            continue
        j = i
        while j + 1 < len(order) and order[j + 1] in chosen:
            j += 1
        if j - i >= 2:
            parts.append(f"{order[i]}-{order[j]}")
        else:
            parts.extend(order[i : j + 1])
        i = j + 1
    return ", ".join(parts)


# --- scanning -------------------------------------------------------------------------------------------


def _skip_ws(text: str, i: int, end: int) -> int:
    while i < end and text[i].isspace():
        i += 1
    return i


def _segments(text: str, separators: str) -> Iterator[tuple[int, int]]:
    """(start, end) of every piece of `text` between separator characters, empty pieces included."""
    start = 0
    for i, ch in enumerate(text):
        if ch in separators:
            yield start, i
            start = i + 1
    yield start, len(text)


@dataclass(frozen=True)
class _Item:
    first: str
    first_pos: int
    last: str | None
    last_pos: int
    step: int


def _scan_item(
    text: str, start: int, end: int, token: re.Pattern[str], *, what: str, field: str, offset: int
) -> _Item:
    """One `A`, `A-B` or `A-B(+N)` in text[start:end]; positions in the result are raw (no offset)."""

    def fail(detail: str, at: int) -> InvalidInput:
        return spec_problem(detail, field=field, position=at + offset)

    item = text[start:end].strip()
    i = _skip_ws(text, start, end)
    if i == end:
        raise fail(f"empty item: name a {what} between the commas", i)
    m = token.match(text, i, end)
    if not m:
        raise fail(f"expected a {what}, got `{item}`", i)
    first, first_pos = m.group(), i
    i = _skip_ws(text, m.end(), end)
    if i == end:
        return _Item(first, first_pos, None, first_pos, 1)
    if text[i] == "(":
        raise fail(f"a step `(+N)` needs a range, as in `{first}-…(+2)`", i)
    if text[i] != "-":
        raise fail(f"unexpected `{text[i:end].strip()}` after {first} in `{item}`", i)
    i = _skip_ws(text, i + 1, end)
    m = token.match(text, i, end)
    if not m:
        if i == end:
            raise fail(f"range `{item}` has no end {what}", i)
        raise fail(f"expected the {what} that ends the range, got `{text[i:end].strip()}`", i)
    last, last_pos = m.group(), i
    i = _skip_ws(text, m.end(), end)
    step = 1
    if i < end and text[i] == "(":
        close = text.find(")", i, end)
        if close == -1:
            raise fail(f"unclosed `(` in `{item}`", i)
        sm = _STEP.fullmatch(text, i + 1, close)
        if not sm or int(sm.group(1)) == 0:
            raise fail(
                f"step must be `(+N)` with N a whole number of 1 or more, got `{text[i : close + 1]}`", i
            )
        step = int(sm.group(1))
        i = _skip_ws(text, close + 1, end)
    if i != end:
        raise fail(f"unexpected `{text[i:end].strip()}` after `{text[start:i].strip()}`", i)
    return _Item(first, first_pos, last, last_pos, step)


def _normalize_block(word: str) -> str | None:
    m = _BLOCK_NAME.fullmatch(word.upper())
    if not m:
        return None
    if m.group(1):
        return f"{m.group(1)}{int(m.group(2)):02d}"
    return MIDDLE if m.group(3) else BASE


def _resolve_block(
    word: str, pos: int, arch: Architecture, *, allow_base: bool, field: str, offset: int
) -> str:
    name = _normalize_block(word)
    listing = describe_blocks(arch, with_base=allow_base)
    if name is None or (name != BASE and name not in _ANY_ARCH_BLOCKS):
        raise spec_problem(
            f"unknown block {word} ({arch.name} blocks: {listing})", field=field, position=pos + offset
        )
    if name == BASE and not allow_base:
        raise spec_problem(
            f"BASE (text encoders, VAE) is not a U-Net block; this field takes U-Net blocks only ({listing})",
            field=field,
            position=pos + offset,
        )
    if name not in arch.blocks:
        raise spec_problem(f"{arch.name} has no block {name} ({listing})", field=field, position=pos + offset)
    return name


def _expand_blocks(
    item: _Item, arch: Architecture, *, allow_base: bool, field: str, offset: int
) -> list[str]:
    first = _resolve_block(
        item.first, item.first_pos, arch, allow_base=allow_base, field=field, offset=offset
    )
    if item.last is None:
        return [first]
    last = _resolve_block(item.last, item.last_pos, arch, allow_base=allow_base, field=field, offset=offset)
    for name, pos in ((first, item.first_pos), (last, item.last_pos)):
        if name == BASE:
            raise spec_problem(
                "BASE is not in U-Net order and cannot be part of a range", field=field, position=pos + offset
            )
    order = arch.unet_blocks
    a, b = order.index(first), order.index(last)
    if a > b:
        raise spec_problem(
            f"reversed range {first}-{last}: {first} comes after {last} in U-Net order (write {last}-{first})",
            field=field,
            position=item.first_pos + offset,
        )
    return list(order[a : b + 1 : item.step])


# --- block sets -----------------------------------------------------------------------------------------


def parse_block_set(
    spec: str, arch: Architecture, *, field: str, allow_base: bool = False, offset: int = 0
) -> list[str]:
    """Blocks named by a comma-separated list of names and ranges, in U-Net order (BASE first), no duplicates.

    `IN00-OUT11(+2)` on sd1 → IN00, IN02, …, IN10, M00, OUT01, OUT03, …, OUT11. BASE
    is accepted only with `allow_base` and never inside a range. `offset` is
    added to every error position (for a spec embedded in a longer string).
    """
    if not isinstance(spec, str):
        raise spec_problem("must be a string of block names such as `IN00, M00, OUT00-OUT11`", field=field)
    if not spec.strip():
        raise spec_problem(
            "empty block list: name at least one block (`IN00`, `IN00, M00`, `IN00-OUT11(+2)`)",
            field=field,
            position=offset,
        )
    chosen: set[str] = set()
    for start, end in _segments(spec, ","):
        item = _scan_item(spec, start, end, _WORD, what="block", field=field, offset=offset)
        chosen.update(_expand_blocks(item, arch, allow_base=allow_base, field=field, offset=offset))
    return [b for b in arch.blocks if b in chosen]


def parse_block_words(text: str, arch: Architecture, *, field: str, offset: int = 0) -> list[str]:
    """Blocks named by space-separated names and ranges (`OUT03 OUT04 IN00-IN05(+1) BASE`).

    Same items as `parse_block_set` without spaces inside a range; BASE allowed.
    Blank text gives [] (the caller decides what "no blocks" means).
    Result in `arch.blocks` order without duplicates.
    """
    chosen: set[str] = set()
    for m in re.finditer(r"\S+", text):
        item = _scan_item(text, m.start(), m.end(), _WORD, what="block", field=field, offset=offset)
        chosen.update(_expand_blocks(item, arch, allow_base=True, field=field, offset=offset))
    return [b for b in arch.blocks if b in chosen]


# --- sampler steps --------------------------------------------------------------------------------------


def parse_steps(spec: str | None, total_steps: int, *, field: str) -> list[int]:
    """Sampler steps, 1-based: `1,5-20(+5)` with 20 steps → [1, 5, 10, 15, 20]; blank or None → 1…total."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return list(range(1, total_steps + 1))
    if not isinstance(spec, str):
        raise spec_problem("must be a string of steps such as `1,5-20(+5)`", field=field)
    chosen: set[int] = set()
    for start, end in _segments(spec, ","):
        item = _scan_item(spec, start, end, _INT, what="step", field=field, offset=0)
        bounds = [(item.first, item.first_pos)] + (
            [(item.last, item.last_pos)] if item.last is not None else []
        )
        values = []
        for token, pos in bounds:
            value = int(token)
            if value == 0:
                raise spec_problem("steps count from 1; 0 is not a step", field=field, position=pos)
            if value > total_steps:
                raise spec_problem(
                    f"step {value} is beyond total_steps {total_steps}", field=field, position=pos
                )
            values.append(value)
        if len(values) == 1:
            chosen.add(values[0])
            continue
        a, b = values
        if a > b:
            raise spec_problem(
                f"reversed range {a}-{b} (write {b}-{a})", field=field, position=item.first_pos
            )
        chosen.update(range(a, b + 1, item.step))
    return sorted(chosen)


# --- numbers and block weights --------------------------------------------------------------------------


def parse_number(
    text: str, *, field: str, start: int = 0, end: int | None = None, offset: int = 0, what: str = "value"
) -> float:
    """The finite decimal number in text[start:end] (surrounding spaces allowed), else a 400 at its position.

    Strict: `1`, `-0.5`, `.5`, `2.`, `1e-3`; no `nan`, `inf`, `1_000`, hex or expressions.
    """
    end = len(text) if end is None else end
    pos = _skip_ws(text, start, end)
    token = text[start:end].strip()
    if not token:
        raise spec_problem(f"missing {what}", field=field, position=pos + offset)
    if not _NUMBER.fullmatch(token):
        raise spec_problem(f"{what} `{token}` is not a number", field=field, position=pos + offset)
    value = float(token)
    if not math.isfinite(value):
        raise spec_problem(f"{what} `{token}` is out of range", field=field, position=pos + offset)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _weights(arch: Architecture, unet: list[float], base: float | None) -> dict[str, float | None]:
    result: dict[str, float | None] = {BASE: base}
    result.update(zip(arch.unet_blocks, unet, strict=True))
    return result


def _takes_sd1_lists(arch: Architecture) -> bool:
    """Whether a 25/26-value sd1 list is converted for `arch` (sdxl) rather than refused."""
    return len(arch.unet_blocks) != PRESET_BLOCK_COUNT and set(arch.unet_blocks) <= set(PRESET_BLOCKS)


def _list_lengths(arch: Architecture) -> tuple[int, ...]:
    """The lengths a list of numbers may have for `arch`: its U-Net blocks, BASE first or not, and
    (sdxl) sd1's 25 or 26 as SuperMerger converts them."""
    n = len(arch.unet_blocks)
    sd1 = (PRESET_BLOCK_COUNT, PRESET_BLOCK_COUNT + 1) if _takes_sd1_lists(arch) else ()
    return (n, n + 1, *sd1)


def _length_detail(arch: Architecture, got: int) -> str:
    n = len(arch.unet_blocks)
    sd1 = (
        f", or {PRESET_BLOCK_COUNT} / {PRESET_BLOCK_COUNT + 1} sd1 values (converted as SuperMerger's weighttoxl does)"
        if _takes_sd1_lists(arch)
        else ""
    )
    return (
        f"expected {n} weights (IN00…{arch.last_out_block} in U-Net order) or {n + 1} (BASE first) "
        f"for {arch.name}{sd1}, got {got}"
    )


def _weights_from_numbers(
    numbers: list[float], arch: Architecture, *, field: str, warnings: list[str] | None
) -> dict[str, float | None]:
    """Weights from a list whose length is one of `_list_lengths(arch)`: BASE first when it has one
    value more than a U-Net; an sd1 list on sdxl converted as SuperMerger does, with a warning."""
    n = len(arch.unet_blocks)
    if len(numbers) in (n, n + 1):
        return _weights(arch, numbers[-n:], numbers[0] if len(numbers) == n + 1 else None)
    base = numbers[0] if len(numbers) == PRESET_BLOCK_COUNT + 1 else None
    sd1 = numbers[-PRESET_BLOCK_COUNT:]
    if warnings is not None:
        dropped = ", ".join(
            f"{b}={v:g}" for b, v in zip(PRESET_BLOCKS, sd1, strict=True) if b not in arch.unet_blocks
        )
        warnings.append(
            f"{field}: {len(numbers)} sd1 values{' (BASE first)' if base is not None else ''} converted to "
            f"{arch.name} as SuperMerger's weighttoxl does: each {arch.name} block takes the sd1 block of "
            f"the same name ({describe_blocks(arch)}); dropped {dropped}"
        )
    return _weights(arch, list(sd1_to_arch(sd1, arch)), base)


def resolve_block_weights(
    value: Any, arch: Architecture, *, field: str, warnings: list[str] | None = None
) -> dict[str, float | None]:
    """Per-block weights over `arch.blocks` (BASE first); BASE is None when the value does not give it.

    `value` is one of:

    * a number (not a bool): every U-Net block gets it;
    * a list of numbers: len(unet_blocks) values in U-Net order (25 sd1/sd2, 19
      sdxl), or one more with BASE first; an element that is not a finite number
      fails with `field="<field>[i]"`. On sdxl a 25-value sd1 list (26 with BASE
      first, SuperMerger's own format) is also taken and converted as SuperMerger's
      `weighttoxl` does (`mergeprobe.merging.presets.sd1_to_arch`: IN00–IN08, M00,
      OUT00–OUT08 by name; IN09–IN11, OUT09–OUT11 dropped), and a line saying so is
      appended to `warnings` when given;
    * a preset name (`GRAD_V`; exact, else case-insensitive; see `mergeprobe.merging.presets`):
      its U-Net values as SuperMerger applies them to `arch`, and its BASE (0, 1 for
      ALL_B). `NAME@depth` (`GRAD_V@depth`, `@depth` in any case) takes instead the
      curve resampled over U-Net depth (`mergeprobe.merging.presets.resample`), which
      differs from SuperMerger's only on sdxl;
    * a string of numbers and commas (`"0,0.5,…"`, the A1111 convention): read as
      the list above; a string holding one number is that number;
    * a spec: comma-separated `BLOCKS:RATIO` entries, BLOCKS one name or range
      (`IN00`, `IN00-IN05`, `OUT00-OUT11(+2)`), `BASE`, or `_` / `default`.
      Later entries win over earlier ones for the blocks they share. `_:r`
      (wherever it stands) sets every U-Net block no other entry names; it does
      not set BASE, which only `BASE:r` sets. A U-Net block that no entry names
      without a `_` entry is an error, so nothing is silently left out.

    Ratios may be negative or above 1 but must be finite decimal numbers.
    """
    n = len(arch.unet_blocks)
    if _is_number(value):
        if not math.isfinite(value):
            raise spec_problem(f"must be a finite number, got {value}", field=field)
        return _weights(arch, [float(value)] * n, None)
    if isinstance(value, list | tuple):
        if len(value) not in _list_lengths(arch):
            raise spec_problem(_length_detail(arch, len(value)), field=field)
        numbers: list[float] = []
        for i, v in enumerate(value):
            if not _is_number(v) or not math.isfinite(v):
                raise spec_problem(f"must be a finite number, got {v!r}", field=f"{field}[{i}]")
            numbers.append(float(v))
        return _weights_from_numbers(numbers, arch, field=field, warnings=warnings)
    if isinstance(value, str):
        return _weights_from_string(value, arch, field=field, warnings=warnings)
    raise spec_problem(
        "must be a number, a list of numbers, a preset name or a block-weight spec such as `IN00-IN05:0.2, _:1`",
        field=field,
    )


def _preset_detail(name: str, *, with_option: bool) -> str:
    if with_option and not name:
        return f"`{PRESET_OPTION_MARK}{DEPTH_OPTION}` must follow a preset name, as in `GRAD_V{PRESET_OPTION_MARK}{DEPTH_OPTION}`"
    if with_option:
        detail = f"`{name}` is not a preset name (`{PRESET_OPTION_MARK}{DEPTH_OPTION}` follows one)"
    else:
        detail = (
            f"`{name}` is not a preset name, a number, a list of numbers or a block-weight spec "
            "(`IN00-IN05:0.2, M00:1, _:0.5`)"
        )
    close = difflib.get_close_matches(name.upper(), list(PRESETS), n=1)
    return detail + (f"; did you mean the preset {close[0]}?" if close else "")


def _preset_weights(text: str, arch: Architecture, *, field: str) -> dict[str, float | None] | None:
    """The weights of `NAME` or `NAME@depth` in `text`, None when `text` is no preset and has no `@`."""
    at = text.find(PRESET_OPTION_MARK)
    name_part = text if at == -1 else text[:at]
    by_depth = False
    if at != -1:
        option = text[at + 1 :].strip()
        if option.casefold() != DEPTH_OPTION:
            raise spec_problem(
                f"unknown preset option `{PRESET_OPTION_MARK}{option}`: the one option is "
                f"`{PRESET_OPTION_MARK}{DEPTH_OPTION}` (`GRAD_V{PRESET_OPTION_MARK}{DEPTH_OPTION}`: the "
                "curve resampled over U-Net depth instead of SuperMerger's same-name blocks)",
                field=field,
                position=at,
            )
        by_depth = True
    preset = find_preset(name_part, arch, by_depth=by_depth)
    if preset is None:
        if at == -1:
            return None
        raise spec_problem(
            _preset_detail(name_part.strip(), with_option=True), field=field, position=_skip_ws(text, 0, at)
        )
    return _weights(arch, list(preset.unet), preset.base)


def _weights_from_string(
    text: str, arch: Architecture, *, field: str, warnings: list[str] | None
) -> dict[str, float | None]:
    stripped = text.strip()
    first = _skip_ws(text, 0, len(text))
    if not stripped:
        raise spec_problem("empty weight spec", field=field, position=first)
    preset = _preset_weights(text, arch, field=field)
    if preset is not None:
        return preset
    head = _WORD.match(stripped)
    if ":" in text or (head and _normalize_block(head.group()) is not None):
        # A spec, or a block name that lacks its `:RATIO` (the spec parser says so).
        return _weights_from_spec(text, arch, field=field)
    if "," not in text and not _NUMBER.match(stripped):
        raise spec_problem(_preset_detail(stripped, with_option=False), field=field, position=first)
    lengths = _list_lengths(arch)
    numbers: list[float] = []
    segments = list(_segments(text, ","))
    for k, (start, end) in enumerate(segments):
        if k == max(lengths):
            raise spec_problem(
                _length_detail(arch, len(segments)), field=field, position=_skip_ws(text, start, end)
            )
        numbers.append(parse_number(text, field=field, start=start, end=end))
    if len(numbers) == 1:
        return _weights(arch, numbers * len(arch.unet_blocks), None)
    if len(numbers) not in lengths:
        raise spec_problem(_length_detail(arch, len(numbers)), field=field, position=len(text))
    return _weights_from_numbers(numbers, arch, field=field, warnings=warnings)


def _weights_from_spec(text: str, arch: Architecture, *, field: str) -> dict[str, float | None]:
    assigned: dict[str, float] = {}
    default: float | None = None
    for start, end in _segments(text, ","):
        pos = _skip_ws(text, start, end)
        entry = text[start:end].strip()
        if not entry:
            raise spec_problem(
                "empty entry: write `BLOCKS:RATIO` between the commas", field=field, position=pos
            )
        colon = text.find(":", start, end)
        if colon == -1:
            raise spec_problem(
                f"entry `{entry}` has no `:RATIO` (write `BLOCKS:RATIO`)", field=field, position=pos
            )
        extra = text.find(":", colon + 1, end)
        if extra != -1:
            raise spec_problem(f"entry `{entry}` has more than one `:`", field=field, position=extra)
        block_part = text[start:colon].strip()
        if not block_part:
            raise spec_problem(
                f"entry `{entry}` names no block (use `_:RATIO` for every block not named elsewhere)",
                field=field,
                position=pos,
            )
        ratio = parse_number(text, field=field, start=colon + 1, end=end, what="ratio")
        if block_part.lower() in DEFAULT_NAMES:
            default = ratio
            continue
        item = _scan_item(text, start, colon, _WORD, what="block", field=field, offset=0)
        for block in _expand_blocks(item, arch, allow_base=True, field=field, offset=0):
            assigned[block] = ratio
    missing = [b for b in arch.unet_blocks if b not in assigned]
    if missing and default is None:
        raise spec_problem(
            f"no weight for {format_blocks(missing, arch)} (add `_:<ratio>` for the rest)", field=field
        )
    rest = 0.0 if default is None else default  # only read when `missing` is empty or `_` was given
    unet = [assigned.get(b, rest) for b in arch.unet_blocks]
    return _weights(arch, unet, assigned.get(BASE))
