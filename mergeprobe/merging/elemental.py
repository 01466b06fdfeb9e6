"""SuperMerger's Elemental Merge grammar: a ratio per (block, element) pair (pure Python).

Entries are `blocks:elements:ratio`, separated by commas or newlines (mixed
freely; blank entries and blank lines are skipped and not counted)::

    OUT03 OUT04 OUT05:attn2 attn1.to_out:0.5
    OUT06:attn:0.5, OUT06:attn2.to_k:0.2
    NOT OUT04:attn:1
    OUT05:NOT attn proj:0.2
    BASE:first_stage_model:0

* blocks: space-separated block names or ranges (`IN00-IN05`, `IN00-OUT11(+2)`;
  the `mergeprobe.merging.blockspec.parse_block_words` grammar, BASE allowed); empty =
  every block, BASE included; a leading `NOT` takes every block (BASE
  included) except those named.
* elements: space-separated substrings looked for in the key's element name
  (`mergeprobe.checkpoints.archs.element_of_key`: the key relative to its block, such as
  `1.transformer_blocks.0.attn2.to_k.weight`; for BASE the full key); empty =
  the whole block; a leading `NOT` selects the elements containing none of them.
  Substrings are case-sensitive (keys are).
* ratio: a finite decimal number (may be negative or above 1).

`NOT` is recognised in any case. A key takes the ratio of the last entry that
matches it (later entries override earlier ones).

Where mergeprobe differs from SuperMerger on purpose: SuperMerger (`elementals` in
`scripts/mergers/mergers.py`) looks for an element substring in the whole key
(`model.diffusion_model.output_blocks.5.1.…`), so a token that also occurs in the
key's prefix selects more there: `ff` (in `diffusion`), `in` (`input_blocks`),
`out` (`output_blocks`), block digits such as `0`–`3`. mergeprobe looks in the
element only, so an entry means the same in every block. And on sdxl SuperMerger
compares an entry's block names with its sd1 block list at the key's position in
its sdxl list (unless its "use extended XL" setting is on), so its `M00` is
sdxl's OUT02, `OUT00` sdxl's OUT03 and so on; mergeprobe uses sdxl's own names.
`supermerger_differences` finds the entries whose keys differ for those reasons;
the merge plan reports them as warnings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergeprobe.checkpoints.archs import BASE, SD1, Architecture, block_of_key, element_of_key
from mergeprobe.merging.blockspec import parse_block_words, parse_number, spec_problem
from mergeprobe.service.errors import InvalidInput

NOT = "NOT"
_WORDS = re.compile(r"\S+")


@dataclass(frozen=True)
class ElementalRule:
    """One parsed entry.

    blocks: the blocks it applies to, already resolved (NOT applied) over `arch.blocks`.
    elements: the substrings; empty = the whole block.
    elements_negated: the rule applies to elements containing none of `elements`.
    source: the entry's text, stripped. index: its 1-based entry number (blank
    entries not counted), as error messages and warnings cite it. position: the
    0-based offset of the entry's first character in the whole text.
    """

    blocks: frozenset[str]
    elements: tuple[str, ...]
    elements_negated: bool
    ratio: float
    source: str
    index: int
    position: int

    def to_json(self) -> dict[str, Any]:
        """The rule as a job's inputs keep it (a sweep variant's rules)."""
        return {
            "blocks": sorted(self.blocks),
            "elements": list(self.elements),
            "negated": self.elements_negated,
            "ratio": self.ratio,
            "source": self.source,
            "index": self.index,
            "position": self.position,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ElementalRule:
        return cls(
            frozenset(data["blocks"]),
            tuple(data["elements"]),
            data["negated"],
            data["ratio"],
            data["source"],
            data["index"],
            data["position"],
        )


def _entries(text: str) -> list[tuple[int, int]]:
    """(start, end) of every non-blank entry between `,` / newline separators."""
    spans: list[tuple[int, int]] = []
    start = 0
    for i, ch in enumerate(text + "\n"):
        if ch in ",\n\r":
            if text[start:i].strip():
                spans.append((start, i))
            start = i + 1
    return spans


def _split_not(text: str, start: int, end: int) -> tuple[bool, int, list[re.Match[str]]]:
    """(negated, offset where the rest starts, words of the rest) of text[start:end]."""
    words = list(_WORDS.finditer(text, start, end))
    if words and words[0].group().upper() == NOT:
        return True, words[0].end(), words[1:]
    return False, start, words


def parse_elemental(text: str, arch: Architecture, *, field: str) -> list[ElementalRule]:
    """Every entry of an elemental spec as a rule, in text order; blank text gives []."""
    if not isinstance(text, str):
        raise spec_problem("must be a string of `blocks:elements:ratio` entries", field=field)
    rules: list[ElementalRule] = []
    for number, (start, end) in enumerate(_entries(text), start=1):
        pos = start + len(text[start:end]) - len(text[start:end].lstrip())
        source = text[start:end].strip()
        label = f"entry {number} (`{source}`)"

        def fail(column: int, problem: InvalidInput, label: str = label) -> InvalidInput:
            return spec_problem(
                f"{label}, column {column}: {problem.detail}", field=field, position=problem.position
            )

        colons = [i for i in range(start, end) if text[i] == ":"]
        if len(colons) != 2:
            raise spec_problem(
                f"{label}: expected `blocks:elements:ratio` (3 parts separated by `:`), got {len(colons) + 1}",
                field=field,
                position=pos,
            )
        c1, c2 = colons

        negated, rest, words = _split_not(text, start, c1)
        if negated and not words:
            raise spec_problem(
                f"{label}, column 1: NOT needs at least one block after it",
                field=field,
                position=rest - len(NOT),
            )
        if words:
            try:
                named = set(parse_block_words(text[rest:c1], arch, field=field, offset=rest))
            except InvalidInput as problem:
                raise fail(1, problem) from None
        else:
            named = set(arch.blocks)
        blocks = frozenset(b for b in arch.blocks if (b in named) != negated)

        elements_negated, rest, words = _split_not(text, c1 + 1, c2)
        if elements_negated and not words:
            raise spec_problem(
                f"{label}, column 2: NOT needs at least one element after it",
                field=field,
                position=rest - len(NOT),
            )
        elements = tuple(dict.fromkeys(w.group() for w in words))

        try:
            ratio = parse_number(text, field=field, start=c2 + 1, end=end, what="ratio")
        except InvalidInput as problem:
            raise fail(3, problem) from None

        rules.append(ElementalRule(blocks, elements, elements_negated, ratio, source, number, pos))
    return rules


def rule_matches(rule: ElementalRule, block: str, element: str) -> bool:
    """Whether `rule` applies to `element` (an `element_of_key` name) of `block`."""
    if block not in rule.blocks:
        return False
    if not rule.elements:
        return True
    hit = any(e in element for e in rule.elements)
    return hit != rule.elements_negated


def elemental_ratio(rules: Sequence[ElementalRule], block: str, element: str) -> float | None:
    """The ratio of the last rule that matches (block, element), or None when none does."""
    for rule in reversed(rules):
        if rule_matches(rule, block, element):
            return rule.ratio
    return None


def elements_by_block(arch: Architecture, keys: Iterable[str]) -> dict[str, list[str]]:
    """Checkpoint keys grouped for `unmatched_rules`: block → element names. Raises ValueError on a key
    the block table does not know (as `block_of_key` does)."""
    grouped: dict[str, list[str]] = {}
    for key in keys:
        grouped.setdefault(block_of_key(arch, key), []).append(element_of_key(arch, key))
    return grouped


def unmatched_rules(
    rules: Sequence[ElementalRule], keys_by_block: Mapping[str, Iterable[str]]
) -> list[ElementalRule]:
    """The rules that match no key: `keys_by_block` maps block → element names (see `elements_by_block`)."""
    materialized = {block: list(elements) for block, elements in keys_by_block.items()}
    return [
        rule
        for rule in rules
        if not any(
            rule_matches(rule, block, element)
            for block in rule.blocks
            for element in materialized.get(block, ())
        )
    ]


def supermerger_block_name(arch: Architecture, block: str) -> str:
    """The block name SuperMerger's elemental merge compares an entry's block names with, for a
    key of `block`.

    SuperMerger (mergers.py `smerge`, then `elementals` without "use extended XL") takes the
    key's index in its list for the model (sdxl: BASE, IN00…IN08, M00, OUT00…OUT08) and reads
    the name at that index in its sd1 list (BASE, IN00…IN11, M00, OUT00…OUT11): the same
    name on sd1 and sd2, sd1's name at the same U-Net position on sdxl (M00 → IN09).
    """
    if block == BASE:
        return BASE
    return SD1.unet_blocks[arch.unet_blocks.index(block)]


def _supermerger_blocks(rule: ElementalRule, arch: Architecture) -> frozenset[str]:
    """The blocks of `arch` whose keys SuperMerger applies `rule` to (block column only).

    SuperMerger expands the column's ranges over its sd1 list whatever the model (`blocker`
    with BLOCKID), so on sdxl `IN08-OUT00` names IN08, IN09, IN10, IN11, M00, OUT00 there.
    """
    column = rule.source[: rule.source.index(":")]
    negated, rest, words = _split_not(column, 0, len(column))
    if not words:
        return frozenset(arch.blocks)
    # `parse_elemental` accepted the column for `arch`, whose block names sd1 all has: no error here
    named = set(parse_block_words(column[rest:], SD1, field="elemental"))
    return frozenset(b for b in arch.blocks if (supermerger_block_name(arch, b) in named) != negated)


def supermerger_differences(
    rules: Sequence[ElementalRule], arch: Architecture, keys: Iterable[tuple[str, str, str]], *, field: str
) -> list[str]:
    """One warning for each rule that SuperMerger would apply to another set of keys.

    `keys`: (key, block, element) of every key a ratio applies to. mergeprobe's rule is
    `rule_matches`; SuperMerger's takes a key when its block passes the block column as
    `supermerger_block_name` reads it and an element token occurs anywhere in the whole key
    (`elementals`: `if dw in key`; NOT inverts as here). A warning names the entry, how many
    keys differ, and the first of them with the reason.
    """
    materialized = list(keys)
    warnings: list[str] = []
    for rule in rules:
        their_blocks = _supermerger_blocks(rule, arch)
        differing: list[tuple[str, str, str, bool]] = []
        for key, block, element in materialized:
            ours = rule_matches(rule, block, element)
            theirs = block in their_blocks and (
                not rule.elements or any(e in key for e in rule.elements) != rule.elements_negated
            )
            if ours != theirs:
                differing.append((key, block, element, theirs))
        if not differing:
            continue
        key, block, element, theirs = differing[0]
        if (block in rule.blocks) != (block in their_blocks):
            reason = (
                f"SuperMerger reads block names on {arch.name} through its sd1 list, where this "
                f"{block} key is {supermerger_block_name(arch, block)}"
            )
        else:
            tokens = ", ".join(f"`{e}`" for e in rule.elements if e in key and e not in element)
            reason = (
                f"{tokens} occurs in the key outside its element `{element}`: SuperMerger matches elements "
                "against the whole key, mergeprobe against the key relative to its block"
            )
        warnings.append(
            f"{field} entry {rule.index} (`{rule.source}`) would select other keys in SuperMerger: "
            f"{len(differing)} differ, e.g. `{key}`, which SuperMerger "
            f"{'would change and mergeprobe does not' if theirs else 'would leave and mergeprobe changes'} "
            f"({reason})"
        )
    return warnings
