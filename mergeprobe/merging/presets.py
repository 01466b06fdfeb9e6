"""Block-weight presets that block-merge users share, per architecture, as SuperMerger applies them.

`PRESETS` holds the 25-value presets of the Merge Block Weighted extension
(bbc-mc/sdweb-merge-block-weighted-gui, `csv/preset.tsv`), in sd1 U-Net order
IN00 … IN11, M00, OUT00 … OUT11. Every value is copied from that file as
published (their rounding included: GRAD_V's 0.9166666667, SMOOTHSTEP's
15-digit decimals); none is computed here. SuperMerger
(hako-mikan/sd-webui-supermerger, `scripts/mbwpresets_master.txt`) ships the
same 38 presets with the same U-Net values and a BASE value in front: 0, or 1
for ALL_B (`PRESET_BASE`). SuperMerger always takes a weight list's first
value as BASE's ratio, so a preset sets BASE; in a request an explicit
`base_alpha` / `base_beta` still wins over it.

sd1 and sd2 have the 25 U-Net blocks of the table and use it as is. sdxl (19
blocks) gets what SuperMerger's `weighttoxl` makes of a 25-value list: every
sdxl block takes the value of the sd1 block of the same name (IN00–IN08, M00,
OUT00–OUT08), and sd1's IN09–IN11 and OUT09–OUT11 are dropped; see
`sd1_to_arch`. The older depth-resampled curve (`resample`) stays available:
`find_preset(..., by_depth=True)`, written `GRAD_V@depth` in a block-weight
value (`mergeprobe.merging.blockspec`).

Names are the published ones, case-sensitive in the table (`find_preset`
also accepts any case).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from mergeprobe.checkpoints.archs import SD1, Architecture

PRESET_BLOCKS = SD1.unet_blocks
"""The block of each value of a preset in `PRESETS` (and of any sd1 weight list): IN00 … IN11, M00, OUT00 … OUT11."""
PRESET_BLOCK_COUNT = len(PRESET_BLOCKS)
"""Values per preset in `PRESETS`: 25."""

# Copied from bbc-mc/sdweb-merge-block-weighted-gui csv/preset.tsv (data, not code).
# fmt: off
PRESETS: dict[str, tuple[float, ...]] = {
    "GRAD_V": (1.0, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333, 0.5, 0.4166666667, 0.3333333333, 0.25, 0.1666666667, 0.0833333333, 0.0, 0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5, 0.5833333333, 0.6666666667, 0.75, 0.8333333333, 0.9166666667, 1.0),
    "GRAD_A": (0.0, 0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5, 0.5833333333, 0.6666666667, 0.75, 0.8333333333, 0.9166666667, 1.0, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333, 0.5, 0.4166666667, 0.3333333333, 0.25, 0.1666666667, 0.0833333333, 0.0),
    "FLAT_25": (0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25),
    "FLAT_75": (0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75),
    "WRAP08": (1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0),
    "WRAP12": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "WRAP14": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "WRAP16": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "MID12_50": (0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "OUT07": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "OUT12": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "OUT12_5": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "RING08_SOFT": (0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0),
    "RING08_5": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "RING10_5": (0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "RING10_3": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "SMOOTHSTEP": (0.0, 0.00506365740740741, 0.0196759259259259, 0.04296875, 0.0740740740740741, 0.112123842592593, 0.15625, 0.205584490740741, 0.259259259259259, 0.31640625, 0.376157407407407, 0.437644675925926, 0.5, 0.562355324074074, 0.623842592592592, 0.68359375, 0.740740740740741, 0.794415509259259, 0.84375, 0.887876157407408, 0.925925925925926, 0.95703125, 0.980324074074074, 0.994936342592593, 1.0),
    "REVERSE-SMOOTHSTEP": (1.0, 0.994936342592593, 0.980324074074074, 0.95703125, 0.925925925925926, 0.887876157407407, 0.84375, 0.794415509259259, 0.740740740740741, 0.68359375, 0.623842592592593, 0.562355324074074, 0.5, 0.437644675925926, 0.376157407407408, 0.31640625, 0.259259259259259, 0.205584490740741, 0.15625, 0.112123842592592, 0.0740740740740742, 0.0429687499999996, 0.0196759259259258, 0.00506365740740744, 0.0),
    "SMOOTHSTEP*2": (0.0, 0.0101273148148148, 0.0393518518518519, 0.0859375, 0.148148148148148, 0.224247685185185, 0.3125, 0.411168981481482, 0.518518518518519, 0.6328125, 0.752314814814815, 0.875289351851852, 1.0, 0.875289351851852, 0.752314814814815, 0.6328125, 0.518518518518519, 0.411168981481481, 0.3125, 0.224247685185184, 0.148148148148148, 0.0859375, 0.0393518518518512, 0.0101273148148153, 0.0),
    "R_SMOOTHSTEP*2": (1.0, 0.989872685185185, 0.960648148148148, 0.9140625, 0.851851851851852, 0.775752314814815, 0.6875, 0.588831018518519, 0.481481481481481, 0.3671875, 0.247685185185185, 0.124710648148148, 0.0, 0.124710648148148, 0.247685185185185, 0.3671875, 0.481481481481481, 0.588831018518519, 0.6875, 0.775752314814816, 0.851851851851852, 0.9140625, 0.960648148148149, 0.989872685185185, 1.0),
    "SMOOTHSTEP*3": (0.0, 0.0151909722222222, 0.0590277777777778, 0.12890625, 0.222222222222222, 0.336371527777778, 0.46875, 0.616753472222222, 0.777777777777778, 0.94921875, 0.871527777777778, 0.687065972222222, 0.5, 0.312934027777778, 0.128472222222222, 0.0507812500000004, 0.222222222222222, 0.383246527777778, 0.53125, 0.663628472222223, 0.777777777777778, 0.87109375, 0.940972222222222, 0.984809027777777, 1.0),
    "R_SMOOTHSTEP*3": (1.0, 0.984809027777778, 0.940972222222222, 0.87109375, 0.777777777777778, 0.663628472222222, 0.53125, 0.383246527777778, 0.222222222222222, 0.05078125, 0.128472222222222, 0.312934027777778, 0.5, 0.687065972222222, 0.871527777777778, 0.94921875, 0.777777777777778, 0.616753472222222, 0.46875, 0.336371527777777, 0.222222222222222, 0.12890625, 0.0590277777777777, 0.0151909722222232, 0.0),
    "SMOOTHSTEP*4": (0.0, 0.0202546296296296, 0.0787037037037037, 0.171875, 0.296296296296296, 0.44849537037037, 0.625, 0.822337962962963, 0.962962962962963, 0.734375, 0.49537037037037, 0.249421296296296, 0.0, 0.249421296296296, 0.495370370370371, 0.734375000000001, 0.962962962962963, 0.822337962962962, 0.625, 0.448495370370369, 0.296296296296297, 0.171875, 0.0787037037037024, 0.0202546296296307, 0.0),
    "R_SMOOTHSTEP*4": (1.0, 0.97974537037037, 0.921296296296296, 0.828125, 0.703703703703704, 0.55150462962963, 0.375, 0.177662037037037, 0.0370370370370372, 0.265625, 0.50462962962963, 0.750578703703704, 1.0, 0.750578703703704, 0.504629629629629, 0.265624999999999, 0.0370370370370372, 0.177662037037038, 0.375, 0.551504629629631, 0.703703703703703, 0.828125, 0.921296296296298, 0.979745370370369, 1.0),
    "SMOOTHSTEP/2": (0.0, 0.0196759259259259, 0.0740740740740741, 0.15625, 0.259259259259259, 0.376157407407407, 0.5, 0.623842592592593, 0.740740740740741, 0.84375, 0.925925925925926, 0.980324074074074, 1.0, 0.980324074074074, 0.925925925925926, 0.84375, 0.740740740740741, 0.623842592592593, 0.5, 0.376157407407407, 0.259259259259259, 0.15625, 0.0740740740740741, 0.0196759259259259, 0.0),
    "R_SMOOTHSTEP/2": (1.0, 0.980324074074074, 0.925925925925926, 0.84375, 0.740740740740741, 0.623842592592593, 0.5, 0.376157407407407, 0.259259259259259, 0.15625, 0.0740740740740742, 0.0196759259259256, 0.0, 0.0196759259259256, 0.0740740740740742, 0.15625, 0.259259259259259, 0.376157407407407, 0.5, 0.623842592592593, 0.740740740740741, 0.84375, 0.925925925925926, 0.980324074074074, 1.0),
    "SMOOTHSTEP/3": (0.0, 0.04296875, 0.15625, 0.31640625, 0.5, 0.68359375, 0.84375, 0.95703125, 1.0, 0.95703125, 0.84375, 0.68359375, 0.5, 0.31640625, 0.15625, 0.04296875, 0.0, 0.04296875, 0.15625, 0.31640625, 0.5, 0.68359375, 0.84375, 0.95703125, 1.0),
    "R_SMOOTHSTEP/3": (1.0, 0.95703125, 0.84375, 0.68359375, 0.5, 0.31640625, 0.15625, 0.04296875, 0.0, 0.04296875, 0.15625, 0.31640625, 0.5, 0.68359375, 0.84375, 0.95703125, 1.0, 0.95703125, 0.84375, 0.68359375, 0.5, 0.31640625, 0.15625, 0.04296875, 0.0),
    "SMOOTHSTEP/4": (0.0, 0.0740740740740741, 0.259259259259259, 0.5, 0.740740740740741, 0.925925925925926, 1.0, 0.925925925925926, 0.740740740740741, 0.5, 0.259259259259259, 0.0740740740740741, 0.0, 0.0740740740740741, 0.259259259259259, 0.5, 0.740740740740741, 0.925925925925926, 1.0, 0.925925925925926, 0.740740740740741, 0.5, 0.259259259259259, 0.0740740740740741, 0.0),
    "R_SMOOTHSTEP/4": (1.0, 0.925925925925926, 0.740740740740741, 0.5, 0.259259259259259, 0.0740740740740742, 0.0, 0.0740740740740742, 0.259259259259259, 0.5, 0.740740740740741, 0.925925925925926, 1.0, 0.925925925925926, 0.740740740740741, 0.5, 0.259259259259259, 0.0740740740740742, 0.0, 0.0740740740740742, 0.259259259259259, 0.5, 0.740740740740741, 0.925925925925926, 1.0),
    "COSINE": (1.0, 0.995722430686905, 0.982962913144534, 0.961939766255643, 0.933012701892219, 0.896676670145617, 0.853553390593274, 0.80438071450436, 0.75, 0.691341716182545, 0.62940952255126, 0.565263096110026, 0.5, 0.434736903889974, 0.37059047744874, 0.308658283817455, 0.25, 0.195619285495639, 0.146446609406726, 0.103323329854382, 0.0669872981077805, 0.0380602337443566, 0.0170370868554658, 0.00427756931309475, 0.0),
    "REVERSE_COSINE": (0.0, 0.00427756931309475, 0.0170370868554659, 0.0380602337443566, 0.0669872981077808, 0.103323329854383, 0.146446609406726, 0.19561928549564, 0.25, 0.308658283817455, 0.37059047744874, 0.434736903889974, 0.5, 0.565263096110026, 0.62940952255126, 0.691341716182545, 0.75, 0.804380714504361, 0.853553390593274, 0.896676670145618, 0.933012701892219, 0.961939766255643, 0.982962913144534, 0.995722430686905, 1.0),
    "TRUE_CUBIC_HERMITE": (0.0, 0.199031876929012, 0.325761959876543, 0.424641927083333, 0.498456790123457, 0.549991560570988, 0.58203125, 0.597360869984568, 0.598765432098765, 0.589029947916667, 0.570939429012346, 0.547278886959876, 0.520833333333333, 0.49438777970679, 0.470727237654321, 0.45263671875, 0.442901234567901, 0.444305796682099, 0.459635416666667, 0.491675106095678, 0.543209876543211, 0.617024739583333, 0.715904706790124, 0.842634789737655, 1.0),
    "TRUE_REVERSE_CUBIC_HERMITE": (1.0, 0.800968123070988, 0.674238040123457, 0.575358072916667, 0.501543209876543, 0.450008439429012, 0.41796875, 0.402639130015432, 0.401234567901235, 0.410970052083333, 0.429060570987654, 0.452721113040124, 0.479166666666667, 0.50561222029321, 0.529272762345679, 0.54736328125, 0.557098765432099, 0.555694203317901, 0.540364583333333, 0.508324893904322, 0.456790123456789, 0.382975260416667, 0.284095293209876, 0.157365210262345, 0.0),
    "FAKE_CUBIC_HERMITE": (0.0, 0.157576195987654, 0.28491512345679, 0.384765625, 0.459876543209877, 0.512996720679012, 0.546875, 0.564260223765432, 0.567901234567901, 0.560546875, 0.544945987654321, 0.523847415123457, 0.5, 0.476152584876543, 0.455054012345679, 0.439453125, 0.432098765432099, 0.435739776234568, 0.453125, 0.487003279320987, 0.540123456790124, 0.615234375, 0.71508487654321, 0.842423804012347, 1.0),
    "FAKE_REVERSE_CUBIC_HERMITE": (1.0, 0.842423804012346, 0.71508487654321, 0.615234375, 0.540123456790123, 0.487003279320988, 0.453125, 0.435739776234568, 0.432098765432099, 0.439453125, 0.455054012345679, 0.476152584876543, 0.5, 0.523847415123457, 0.544945987654321, 0.560546875, 0.567901234567901, 0.564260223765432, 0.546875, 0.512996720679013, 0.459876543209876, 0.384765625, 0.28491512345679, 0.157576195987653, 0.0),
    "ALL_A": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "ALL_B": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
}
# fmt: on

# SuperMerger's scripts/mbwpresets_master.txt puts BASE first on every line: 0 on all of them but ALL_B's.
PRESET_BASE: dict[str, float] = dict.fromkeys(PRESETS, 0.0) | {"ALL_B": 1.0}
"""BASE's ratio (text encoders, VAE) per preset, as SuperMerger's preset file gives it."""


@dataclass(frozen=True)
class Preset:
    """A preset resolved for one architecture.

    name: the published name. base: BASE's ratio (`PRESET_BASE`). unet: one value per U-Net
    block of the architecture, in U-Net order.
    """

    name: str
    base: float
    unet: tuple[float, ...]


def sd1_to_arch(values: Sequence[float], arch: Architecture) -> tuple[float, ...]:
    """25 sd1 U-Net values (IN00 … OUT11) as one value per U-Net block of `arch`, by block name.

    Every block of `arch` takes the value of the sd1 block of the same name; sd1 blocks
    that `arch` lacks are dropped. On sdxl this is SuperMerger's `weighttoxl`
    (`weight[:9] + weight[12:22]`: IN00–IN08, M00, OUT00–OUT08 kept, IN09–IN11 and
    OUT09–OUT11 dropped); on sd1 and sd2 it returns the values unchanged. Raises
    ValueError for another count or an architecture with a block sd1 does not have.
    """
    if len(values) != PRESET_BLOCK_COUNT:
        raise ValueError(f"expected {PRESET_BLOCK_COUNT} sd1 values, got {len(values)}")
    foreign = [b for b in arch.unet_blocks if b not in PRESET_BLOCKS]
    if foreign:
        raise ValueError(f"{arch.name} has blocks that sd1 lacks: {', '.join(foreign)}")
    by_name = dict(zip(PRESET_BLOCKS, (float(v) for v in values), strict=True))
    return tuple(by_name[b] for b in arch.unet_blocks)


def resample(values: tuple[float, ...] | list[float], count: int) -> tuple[float, ...]:
    """`values` (a curve over evenly spaced U-Net positions) read at `count` evenly spaced positions.

    Rule: target position j (0 … count-1) sits at source position
    x = j * (len(values) - 1) / (count - 1), and its value is the linear
    interpolation between the two source values around x (exactly the source
    value when x is a whole number; interpolated values are rounded to 12
    decimals so float noise does not show in listings). First and last values
    are kept as they are. For sdxl (25 → 19) x = j * 4/3: IN00 ← IN00, M00 (j = 9) ← M00
    (x = 12), OUT08 ← OUT11, and a block in between gets the curve between
    its sd1 neighbours (sdxl IN03 at x = 4 ← sd1 IN04, sdxl IN01 at x = 1.33
    ← 2/3 IN01 + 1/3 IN02). Step presets (WRAP, RING, OUT07 …) therefore get
    in-between values at their edges: the rule follows the curve, not the
    sd1 block names. This is not what SuperMerger does (see `sd1_to_arch`); presets
    use it only when asked (`find_preset(..., by_depth=True)`, `GRAD_V@depth`).
    """
    source = tuple(float(v) for v in values)
    if count < 2 or len(source) < 2:
        raise ValueError("resample needs at least two source and two target positions")
    if count == len(source):
        return source
    span = len(source) - 1
    out: list[float] = []
    for j in range(count):
        x = Fraction(j * span, count - 1)
        i = int(x)  # floor: x >= 0
        t = x - i
        if t == 0:
            out.append(source[i])
        else:
            a, b = source[i], source[i + 1]
            out.append(round(a + (b - a) * float(t), 12))
    return tuple(out)


def _unet_values(values: Sequence[float], arch: Architecture, by_depth: bool) -> tuple[float, ...]:
    return resample(values, len(arch.unet_blocks)) if by_depth else sd1_to_arch(values, arch)


def presets_for(arch: Architecture) -> dict[str, tuple[float, ...]]:
    """Every preset for `arch`, in `PRESETS` order: name → one value per U-Net block (U-Net order).

    sd1 and sd2 get the published 25 values; sdxl gets SuperMerger's conversion
    (`sd1_to_arch`). BASE is not in these lists (`PRESET_BASE`). Returns a new
    dict on each call (the caller may change it).
    """
    return {name: sd1_to_arch(values, arch) for name, values in PRESETS.items()}


def find_preset(name: str, arch: Architecture, *, by_depth: bool = False) -> Preset | None:
    """The preset called `name`, resolved for `arch`, or None.

    An exact match wins; otherwise a case-insensitive one (`grad_v` → GRAD_V).
    Surrounding whitespace is ignored. The U-Net values are SuperMerger's
    (`sd1_to_arch`), or with `by_depth` the curve resampled over U-Net depth
    (`resample`; the same values on sd1 and sd2). BASE is `PRESET_BASE` either way.
    """
    wanted = name.strip()
    if wanted not in PRESETS:
        folded = wanted.casefold()
        wanted = next((published for published in PRESETS if published.casefold() == folded), "")
        if not wanted:
            return None
    return Preset(wanted, PRESET_BASE[wanted], _unet_values(PRESETS[wanted], arch, by_depth))
