"""Per-block prompts, Dump U-Net style (pure Python: the API validates with it).

A prompt may hold groups that give U-Net blocks different text::

    a (~: IN00-OUT11: cute; M00: excellent :~) girl

Every block but M00 reads `a cute girl`; M00 reads `a excellent girl`.

Grammar, exactly:

* A group opens with `(~:` and closes with the first `:~)` after it. Groups do
  not nest; a `:~)` outside a group and a `(~:` without its `:~)` are errors.
  Text outside the groups is shared by every block, kept character for
  character. A prompt may hold any number of groups; each resolves on its own.
* Inside a group: pairs `spec:text` separated by `;`; a `;` after the last pair
  is optional. A group whose inside is blank (`(~: :~)`, `(~::~)`) is a group
  with no pairs: it gives every block the empty string. A blank pair anywhere
  else (`a; ; b`, `(~: ; :~)`) is an error.
* `spec` is everything before the pair's first `:`; the text is everything
  after it, so the text may hold `:` (`(~: M00: (cute:1.2) :~)`) but never
  `;` or `:~)`. The spec is a block set in the `parse_block_set` grammar
  (`IN00`, `IN00, M00`, `IN00-OUT11`, `IN00-OUT11(+2)`; case-insensitive,
  spaces allowed) or `_`.
* Spaces: the text is stripped of whitespace at both ends (the spaces after
  the `:` and before the `;` or `:~)` are separators); whitespace inside the
  text is kept exactly. So `a (~: IN00-OUT11: cute; M00: excellent :~) girl`
  gives exactly `a cute girl` and `a excellent girl`. (The reference
  implementation keeps those outer spaces, which only ever adds spaces that
  CLIP's tokenizer collapses anyway.)
* Later pairs win over earlier ones for the blocks they share. `_` gives its
  text to every block no other pair of its group names, wherever it stands
  (the last `_` of a group wins over earlier ones). A block no pair names and
  no `_` covers gets the empty string.

Substitution is verbatim: a block's prompt is the outside text with each group
replaced by that block's text, with no whitespace normalization. `plain()` is
the same with every group replaced by the empty string, so `a (~: IN00: x :~)
girl` is `a  girl` (two spaces) for plain() and for every block but IN00; CLIP
tokenizes that exactly as `a girl`, and a block whose groups give it no text
reads a prompt *identical* to plain() (so a layer-prompt difference map is
exactly zero for it).

Every error is an `InvalidInput` error (`invalid-spec`) with the request field and the
0-based character offset in the whole prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mergeprobe.checkpoints.archs import Architecture
from mergeprobe.merging.blockspec import format_blocks, parse_block_set, spec_problem

OPEN = "(~:"
CLOSE = ":~)"
FALLBACK = "_"
_SHOWN_TEXT = 40  # characters of a pair shown in a warning


@dataclass(frozen=True)
class PromptPair:
    """One `spec:text` pair of a group."""

    spec: str  # as written, stripped
    blocks: tuple[str, ...] | None  # U-Net order; None for `_`
    text: str  # stripped at both ends
    position: int  # offset of the spec's first character in the whole prompt

    @property
    def is_fallback(self) -> bool:
        return self.blocks is None


@dataclass(frozen=True)
class PromptGroup:
    """One `(~: … :~)`; `start`/`end` delimit it in the whole prompt (end exclusive)."""

    pairs: tuple[PromptPair, ...]
    start: int
    end: int

    def assignment(self, arch: Architecture) -> dict[str, str]:
        """Block → this group's text for it, for every U-Net block."""
        named: dict[str, str] = {}
        fallback = ""
        for pair in self.pairs:
            if pair.blocks is None:
                fallback = pair.text
            else:
                named.update(dict.fromkeys(pair.blocks, pair.text))
        return {block: named.get(block, fallback) for block in arch.unet_blocks}

    def named_blocks(self) -> set[str]:
        return {b for pair in self.pairs if pair.blocks is not None for b in pair.blocks}


@dataclass(frozen=True)
class LayerPrompt:
    """A parsed prompt: shared text and groups, in order."""

    text: str
    arch: Architecture
    field: str
    parts: tuple[str | PromptGroup, ...]

    @property
    def groups(self) -> tuple[PromptGroup, ...]:
        return tuple(p for p in self.parts if isinstance(p, PromptGroup))

    @property
    def has_groups(self) -> bool:
        """True when the prompt holds at least one group, even an empty one."""
        return any(isinstance(p, PromptGroup) for p in self.parts)

    def resolve(self) -> dict[str, str]:
        """Block → its full prompt, for every block of `arch.unet_blocks`, in U-Net order."""
        assignments = [p.assignment(self.arch) if isinstance(p, PromptGroup) else p for p in self.parts]
        return {
            block: "".join(a if isinstance(a, str) else a[block] for a in assignments)
            for block in self.arch.unet_blocks
        }

    def plain(self) -> str:
        """The prompt with every group removed (replaced by nothing; the text around it is kept as is)."""
        return "".join(p for p in self.parts if isinstance(p, str))

    def warnings(self) -> list[str]:
        """One line per pair that reaches only blocks without cross-attention (they read no prompt)."""
        textless = self.arch.textless_blocks
        found: list[str] = []
        for group in self.groups:
            named = group.named_blocks()
            for pair in group.pairs:
                shown = _show_pair(pair)
                if pair.blocks is None:
                    rest = [b for b in self.arch.unet_blocks if b not in named]
                    if rest and all(b in textless for b in rest):
                        found.append(
                            f"{shown} at position {pair.position}: `_` reaches only blocks without "
                            f"cross-attention ({format_blocks(rest, self.arch)}); they read no prompt"
                        )
                elif all(b in textless for b in pair.blocks):
                    found.append(
                        f"{shown} at position {pair.position} names only blocks without cross-attention "
                        f"({format_blocks(pair.blocks, self.arch)}); they read no prompt"
                    )
        return found


def _show_pair(pair: PromptPair) -> str:
    text = pair.text if len(pair.text) <= _SHOWN_TEXT else pair.text[: _SHOWN_TEXT - 1] + "…"
    return f"{OPEN} {pair.spec}: {text} {CLOSE}"


def parse_layer_prompt(text: str, arch: Architecture, *, field: str) -> LayerPrompt:
    """Parse a prompt with `(~: spec: text; … :~)` groups; see the module docstring for the grammar."""
    if not isinstance(text, str):
        raise spec_problem("must be a string", field=field)
    parts: list[str | PromptGroup] = []
    i = 0
    while True:
        opening = text.find(OPEN, i)
        closing = text.find(CLOSE, i)
        if closing != -1 and (opening == -1 or closing < opening):
            raise spec_problem(
                f"`{CLOSE}` closes no group (a group is `{OPEN} spec: text; … {CLOSE}`)",
                field=field,
                position=closing,
            )
        if opening == -1:
            parts.append(text[i:])
            break
        parts.append(text[i:opening])
        body_start = opening + len(OPEN)
        closing = text.find(CLOSE, body_start)
        if closing == -1:
            raise spec_problem(f"`{OPEN}` has no closing `{CLOSE}`", field=field, position=opening)
        nested = text.find(OPEN, body_start, closing)
        if nested != -1:
            raise spec_problem(
                f"groups do not nest: `{OPEN}` inside the group opened at position {opening}",
                field=field,
                position=nested,
            )
        pairs = _parse_pairs(text, body_start, closing, arch, field=field)
        parts.append(PromptGroup(pairs=pairs, start=opening, end=closing + len(CLOSE)))
        i = closing + len(CLOSE)
    return LayerPrompt(text=text, arch=arch, field=field, parts=tuple(p for p in parts if p != ""))


def _parse_pairs(
    text: str, start: int, end: int, arch: Architecture, *, field: str
) -> tuple[PromptPair, ...]:
    if not text[start:end].strip():
        return ()
    segments: list[tuple[int, int]] = []
    seg_start = start
    for k in range(start, end):
        if text[k] == ";":
            segments.append((seg_start, k))
            seg_start = k + 1
    segments.append((seg_start, end))
    pairs: list[PromptPair] = []
    for n, (a, b) in enumerate(segments):
        first = a
        while first < b and text[first].isspace():
            first += 1
        if first == b:
            if n == len(segments) - 1:
                continue  # the optional `;` after the last pair
            raise spec_problem("empty pair: write `spec: text` between the `;`", field=field, position=b)
        colon = text.find(":", a, b)
        if colon == -1:
            raise spec_problem(
                f"pair `{text[a:b].strip()}` has no `:` (write `spec: text`, e.g. `M00: excellent`)",
                field=field,
                position=first,
            )
        spec = text[a:colon].strip()
        if not spec:
            raise spec_problem(
                "pair names no block before its `:` (use `_: text` for every block the others do not name)",
                field=field,
                position=first,
            )
        blocks = (
            None if spec == FALLBACK else tuple(parse_block_set(text[a:colon], arch, field=field, offset=a))
        )
        pairs.append(PromptPair(spec=spec, blocks=blocks, text=text[colon + 1 : b].strip(), position=first))
    return tuple(pairs)


def distinct_prompts(resolved: Mapping[str, str]) -> list[str]:
    """The distinct prompts of a `resolve()` result, in order of first appearance (U-Net order for it)."""
    return list(dict.fromkeys(resolved.values()))
