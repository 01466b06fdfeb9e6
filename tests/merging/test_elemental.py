"""SuperMerger's Elemental Merge grammar, evaluated on real key and element names."""

from __future__ import annotations

import pytest

from mergeprobe.checkpoints.archs import SD1, SDXL, block_of_key, element_of_key
from mergeprobe.merging.elemental import (
    ElementalRule,
    elemental_ratio,
    elements_by_block,
    parse_elemental,
    rule_matches,
    supermerger_block_name,
    supermerger_differences,
    unmatched_rules,
)
from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.problems import Problem
from mergeprobe.service.problems import problem_of as as_problem

P = "model.diffusion_model."
ATTN2_K = "1.transformer_blocks.0.attn2.to_k.weight"
ATTN2_Q = "1.transformer_blocks.0.attn2.to_q.weight"
ATTN1_OUT = "1.transformer_blocks.0.attn1.to_out.0.weight"
ATTN1_Q = "1.transformer_blocks.0.attn1.to_q.weight"
RES = "0.in_layers.0.weight"
PROJ_IN = "1.proj_in.weight"
NORM = "1.norm.weight"
VAE = "first_stage_model.decoder.conv_in.weight"
CLIP_ATTN = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"


def ratio(text: str, block: str, element: str, arch=SD1) -> float | None:
    return elemental_ratio(parse_elemental(text, arch, field="elemental"), block, element)


def problem_of(text: str, arch=SD1) -> Problem:
    """The problem the client is shown for the domain error the call raises."""
    with pytest.raises(MergeprobeError) as info:
        parse_elemental(text, arch, field="merge.elemental")
    p = as_problem(info.value)
    assert (p.status, p.slug, p.field) == (400, "invalid-spec", "merge.elemental")
    return p


def test_element_names_are_the_archs():
    assert element_of_key(SD1, P + "output_blocks.3." + ATTN2_K) == ATTN2_K
    assert block_of_key(SD1, P + "output_blocks.3." + ATTN2_K) == "OUT03"
    assert element_of_key(SD1, VAE) == VAE


def test_several_blocks_several_elements():
    text = "OUT03 OUT04 OUT05:attn2 attn1.to_out:0.5"
    assert ratio(text, "OUT03", ATTN2_K) == 0.5
    assert ratio(text, "OUT04", ATTN1_OUT) == 0.5
    assert ratio(text, "OUT05", ATTN2_Q) == 0.5
    assert ratio(text, "OUT05", ATTN1_Q) is None
    assert ratio(text, "OUT04", RES) is None
    assert ratio(text, "OUT06", ATTN2_K) is None
    [rule] = parse_elemental(text, SD1, field="e")
    assert rule == ElementalRule(
        blocks=frozenset({"OUT03", "OUT04", "OUT05"}),
        elements=("attn2", "attn1.to_out"),
        elements_negated=False,
        ratio=0.5,
        source=text,
        index=1,
        position=0,
    )


def test_later_entries_override():
    text = "OUT06:attn:0.5,OUT06:attn2.to_k:0.2"
    assert ratio(text, "OUT06", ATTN2_K) == 0.2
    assert ratio(text, "OUT06", ATTN2_Q) == 0.5
    assert ratio(text, "OUT06", ATTN1_OUT) == 0.5
    assert ratio(text, "OUT06", PROJ_IN) is None
    # the other order: the broad entry wins everywhere
    assert ratio("OUT06:attn2.to_k:0.2,OUT06:attn:0.5", "OUT06", ATTN2_K) == 0.5


def test_not_blocks():
    text = "NOT OUT04:attn:1"
    assert ratio(text, "OUT04", ATTN2_K) is None
    assert ratio(text, "OUT05", ATTN2_K) == 1.0
    assert ratio(text, "IN01", ATTN1_OUT) == 1.0
    assert ratio(text, "OUT05", PROJ_IN) is None
    # relative to every block, BASE included: CLIP's self_attn contains "attn"
    assert ratio(text, "BASE", CLIP_ATTN) == 1.0
    [rule] = parse_elemental(text, SD1, field="e")
    assert rule.blocks == frozenset(SD1.blocks) - {"OUT04"}


def test_not_elements():
    text = "OUT05:NOT attn proj:0.2"
    assert ratio(text, "OUT05", RES) == 0.2
    assert ratio(text, "OUT05", NORM) == 0.2
    assert ratio(text, "OUT05", PROJ_IN) is None
    assert ratio(text, "OUT05", ATTN2_K) is None
    assert ratio(text, "OUT04", RES) is None
    [rule] = parse_elemental(text, SD1, field="e")
    assert rule.elements == ("attn", "proj") and rule.elements_negated


def test_base_full_keys():
    text = "BASE:first_stage_model:0"
    assert ratio(text, "BASE", VAE) == 0.0
    assert ratio(text, "BASE", CLIP_ATTN) is None
    assert ratio(text, "OUT00", RES) is None


def test_empty_columns_and_ranges():
    [rule] = parse_elemental(":attn2:0.3", SD1, field="e")
    assert rule.blocks == frozenset(SD1.blocks) and rule.elements == ("attn2",)
    assert ratio(":attn2:0.3", "M00", ATTN2_K) == 0.3
    assert ratio("OUT05::0.7", "OUT05", RES) == 0.7
    assert ratio("::-1.5", "BASE", VAE) == -1.5
    [rule] = parse_elemental("IN00-IN02 m00 OUT00-OUT11(+5):attn:1", SD1, field="e")
    assert rule.blocks == frozenset({"IN00", "IN01", "IN02", "M00", "OUT00", "OUT05", "OUT10"})
    [rule] = parse_elemental("not OUT04 BASE:not attn:1", SD1, field="e")  # NOT in any case
    assert "BASE" not in rule.blocks and "OUT04" not in rule.blocks and rule.elements_negated
    [rule] = parse_elemental(
        "NOT BASE IN00-OUT11::0", SD1, field="e"
    )  # selects nothing; reported as unmatched
    assert rule.blocks == frozenset()


def test_separators_blank_lines_index_position():
    text = "OUT03:attn:0.1\n\n  OUT04::0.2, \r\nOUT05:attn:3,,\n"
    rules = parse_elemental(text, SD1, field="e")
    assert [(r.index, r.position, r.source, r.ratio) for r in rules] == [
        (1, 0, "OUT03:attn:0.1", 0.1),
        (2, 18, "OUT04::0.2", 0.2),
        (3, 32, "OUT05:attn:3", 3.0),
    ]
    assert parse_elemental("", SD1, field="e") == []
    assert parse_elemental(" \n , \n", SD1, field="e") == []


def test_sdxl():
    rules = parse_elemental("IN08 M00 OUT00:attn:1", SDXL, field="e")
    assert rules[0].blocks == frozenset({"IN08", "M00", "OUT00"})
    p = problem_of("IN11:attn:1", SDXL)
    assert p.position == 0
    assert (
        p.detail
        == "entry 1 (`IN11:attn:1`), column 1: sdxl has no block IN11 (BASE, IN00–IN08, M00, OUT00–OUT08)"
    )


@pytest.mark.parametrize(
    ("text", "position", "detail"),
    [
        (
            "OUT03:attn:0.5, OUT99:attn:0.5",
            16,
            "entry 2 (`OUT99:attn:0.5`), column 1: unknown block OUT99 (sd1 blocks: BASE, IN00–IN11, M00, OUT00–OUT11)",
        ),
        (
            "OUT03:attn:0.5\n\nOUT04 FOO:attn:1",
            22,
            "entry 2 (`OUT04 FOO:attn:1`), column 1: unknown block FOO (sd1 blocks: BASE, IN00–IN11, M00, OUT00–OUT11)",
        ),
        (
            "OUT03:attn",
            0,
            "entry 1 (`OUT03:attn`): expected `blocks:elements:ratio` (3 parts separated by `:`), got 2",
        ),
        (
            "OUT00::1,  OUT03:attn:0.5:1",
            11,
            "entry 2 (`OUT03:attn:0.5:1`): expected `blocks:elements:ratio` (3 parts separated by `:`), got 4",
        ),
        (
            "OUT03 attn 0.5",
            0,
            "entry 1 (`OUT03 attn 0.5`): expected `blocks:elements:ratio` (3 parts separated by `:`), got 1",
        ),
        ("  OUT03:attn:abc", 13, "entry 1 (`OUT03:attn:abc`), column 3: ratio `abc` is not a number"),
        ("OUT03:attn:nan", 11, "entry 1 (`OUT03:attn:nan`), column 3: ratio `nan` is not a number"),
        ("OUT03:attn: 1/2", 12, "entry 1 (`OUT03:attn: 1/2`), column 3: ratio `1/2` is not a number"),
        ("OUT03:attn:", 11, "entry 1 (`OUT03:attn:`), column 3: missing ratio"),
        ("NOT:attn:1", 0, "entry 1 (`NOT:attn:1`), column 1: NOT needs at least one block after it"),
        ("OUT03:NOT :1", 6, "entry 1 (`OUT03:NOT :1`), column 2: NOT needs at least one element after it"),
        (
            "OUT03-OUT01:attn:1",
            0,
            "entry 1 (`OUT03-OUT01:attn:1`), column 1: reversed range OUT03-OUT01: OUT03 comes after OUT01 in U-Net order (write OUT01-OUT03)",
        ),
        (
            "IN00-OUT11(+0)::1",
            10,
            "entry 1 (`IN00-OUT11(+0)::1`), column 1: step must be `(+N)` with N a whole number of 1 or more, got `(+0)`",
        ),
        (
            "BASE-IN03::1",
            0,
            "entry 1 (`BASE-IN03::1`), column 1: BASE is not in U-Net order and cannot be part of a range",
        ),
    ],
)
def test_errors(text, position, detail):
    p = problem_of(text)
    assert (p.position, p.detail) == (position, detail)


def test_not_a_string():
    assert problem_of(["OUT03:attn:1"]).position is None  # type: ignore[arg-type]


def test_rule_matches_and_unmatched():
    keys = [
        P + "time_embed.0.weight",
        P + "input_blocks.0.0.weight",
        P + "input_blocks.1." + ATTN2_K,
        P + "input_blocks.1." + RES,
        P + "output_blocks.5." + ATTN2_K,
        P + "output_blocks.5." + PROJ_IN,
        VAE,
    ]
    grouped = elements_by_block(SD1, keys)
    assert grouped == {
        "IN00": ["time_embed.0.weight", "0.weight"],
        "IN01": [ATTN2_K, RES],
        "OUT05": [ATTN2_K, PROJ_IN],
        "BASE": [VAE],
    }
    rules = parse_elemental(
        "IN00:attn:1\nOUT05:attn2:0.5\nOUT06::1\nBASE:first_stage:0\nIN01:NOT attn in_layers:1\nNOT BASE IN00-OUT11::0",
        SD1,
        field="e",
    )
    assert [r.index for r in unmatched_rules(rules, grouped)] == [1, 3, 5, 6]
    assert rule_matches(rules[1], "OUT05", ATTN2_K) and not rule_matches(rules[1], "OUT05", PROJ_IN)
    assert not rule_matches(rules[1], "OUT04", ATTN2_K)
    # generators are fine as element iterables
    assert unmatched_rules(rules[:2], {"OUT05": (e for e in [ATTN2_K])}) == [rules[0]]
    with pytest.raises(ValueError):
        elements_by_block(SD1, [P + "input_blocks.12.0.weight"])


def triples(arch, keys):
    return [(key, block_of_key(arch, key), element_of_key(arch, key)) for key in keys]


OUT05_KEYS = [
    P + "output_blocks.5.0.in_layers.0.weight",
    P + "output_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight",
    P + "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
    P + "output_blocks.6.0.in_layers.0.weight",
]


def test_supermerger_matches_elements_in_the_whole_key():
    # `ff` is in every key's `model.diffusion_model.` prefix: SuperMerger takes all of OUT05
    rules = parse_elemental("OUT05:ff:0.3", SD1, field="elemental")
    [warning] = supermerger_differences(rules, SD1, triples(SD1, OUT05_KEYS), field="elemental")
    assert warning == (
        "elemental entry 1 (`OUT05:ff:0.3`) would select other keys in SuperMerger: 2 differ, e.g. "
        "`model.diffusion_model.output_blocks.5.0.in_layers.0.weight`, which SuperMerger would change and "
        "mergeprobe does not (`ff` occurs in the key outside its element `0.in_layers.0.weight`: SuperMerger "
        "matches elements against the whole key, mergeprobe against the key relative to its block)"
    )
    # NOT the other way round: SuperMerger leaves out what mergeprobe changes
    rules = parse_elemental("OUT05:NOT ff:0.3", SD1, field="elemental")
    [warning] = supermerger_differences(rules, SD1, triples(SD1, OUT05_KEYS), field="elemental_beta")
    assert warning.startswith("elemental_beta entry 1 (`OUT05:NOT ff:0.3`) would select other keys")
    assert ": 2 differ, e.g. `model.diffusion_model.output_blocks.5.0.in_layers.0.weight`" in warning
    assert "which SuperMerger would leave and mergeprobe changes" in warning
    # `out` is in `output_blocks`, block digits are in the key too
    text = "OUT05:out:1, OUT05:5:1, OUT05:in_layers:1, OUT05:attn2 ff.net:1, :transformer_blocks:1"
    rules = parse_elemental(text, SD1, field="elemental")
    warnings = supermerger_differences(rules, SD1, triples(SD1, OUT05_KEYS), field="elemental")
    assert [w.split(")")[0] for w in warnings] == [
        "elemental entry 1 (`OUT05:out:1`",
        "elemental entry 2 (`OUT05:5:1`",
    ]


def test_supermerger_block_names_on_sdxl():
    assert [supermerger_block_name(SD1, b) for b in SD1.blocks] == list(SD1.blocks)
    assert [supermerger_block_name(SDXL, b) for b in ("BASE", "IN08", "M00", "OUT00", "OUT02", "OUT08")] == [
        "BASE",
        "IN08",
        "IN09",
        "IN10",
        "M00",
        "OUT05",
    ]
    keys = [
        P + "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        P + "output_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        P + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    ]
    rules = parse_elemental("M00:attn2:0.2", SDXL, field="elemental")
    [warning] = supermerger_differences(rules, SDXL, triples(SDXL, keys), field="elemental")
    assert warning.startswith(
        "elemental entry 1 (`M00:attn2:0.2`) would select other keys in SuperMerger: 2 differ"
    )
    assert f"`{keys[0]}`, which SuperMerger would leave and mergeprobe changes" in warning
    assert "SuperMerger reads block names on sdxl through its sd1 list, where this M00 key is IN09" in warning
    # SuperMerger expands ranges over its sd1 list: IN08-OUT00 is IN08 … IN11, M00, OUT00 there,
    # which it reads as sdxl IN08, M00, OUT00 … OUT03
    out01 = P + "output_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    rules = parse_elemental("IN08-OUT00:attn2:0.2", SDXL, field="elemental")
    [warning] = supermerger_differences(rules, SDXL, triples(SDXL, [*keys, out01]), field="elemental")
    assert f": 2 differ, e.g. `{keys[1]}`, which SuperMerger would change and mergeprobe does not" in warning
    assert "where this OUT02 key is M00" in warning
    # NOT keeps the difference; the IN blocks and an empty block column are the same in both
    rules = parse_elemental("NOT IN04 M00:attn2:0.2, IN00-IN08:attn2:1, :attn2:1", SDXL, field="elemental")
    warnings = supermerger_differences(rules, SDXL, triples(SDXL, keys), field="elemental")
    assert len(warnings) == 1 and warnings[0].startswith("elemental entry 1 (`NOT IN04 M00:attn2:0.2`)")
    # on sd1 the same entry selects the same keys
    rules = parse_elemental("NOT IN04 M00:attn2:0.2, OUT02:attn2:1", SD1, field="elemental")
    sd1_keys = [*keys, P + "output_blocks.10.1.transformer_blocks.0.attn2.to_k.weight"]
    assert supermerger_differences(rules, SD1, triples(SD1, sd1_keys), field="elemental") == []
