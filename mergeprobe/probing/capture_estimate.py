"""How much a dump writes and holds, estimated at submission from the model's header and config.

A dump that saves attention tensors at every step of a 512×512 generation writes gigabytes and
holds them in the worker until the job ends; the largest request the schema accepts would need
terabytes. So the API estimates each dump before queueing it and refuses those beyond the caps
(MERGEPROBE_MAX_CAPTURE_BYTES, MERGEPROBE_MAX_CAPTURE_MEMORY_BYTES), naming the capture and the
figures. Pure Python (no torch): the geometry of every U-Net block (output channels, downscale,
transformer layers, attention heads) is read from the key shapes and the pipeline config.

What the engine keeps (worker/engines/dump.py): with `save_tensors`, every captured block output
(float32, batch × channels × h × w per CFG half) and every attention probability tensor (float32,
batch × heads × queries × 77 tokens per half and transformer layer) until the job ends, then one
safetensors file serialised in memory (a second copy); `layer_prompt_diff` keeps the plain run's
block outputs for the difference. PNGs are written as they are made; their size is bounded here
by 3 bytes a pixel (they compress to less); a feature grid's pixels are its picture's, upscaled and
framed (`mergeprobe.probing.picture_geometry`, the geometry the renderer draws with).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeprobe.checkpoints.archs import Architecture
from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader
from mergeprobe.probing.picture_geometry import feature_grid_size, framed_pixels_bound

TOKENS = 77  # every text encoder's context: the keys of each cross-attention map
FLOAT32 = 4
PNG_BOUND = 3  # bytes per pixel of an RGB image before compression


@dataclass(frozen=True)
class BlockGeometry:
    channels: int  # of the block's output
    downscale: int  # of the block's output relative to the latent (1, 2, 4, 8)
    transformers: int  # cross-attention layers in the block
    heads: int  # attention heads of those layers
    attention_downscale: int  # of their queries: an OUT block's transformers run before its upsampler


@dataclass(frozen=True)
class CaptureEstimate:
    written_bytes: int  # artifacts: saved tensors and PNGs
    held_bytes: int  # the saved tensors, kept until the job ends (tensors.safetensors' data)
    memory_bytes: int  # what the worker holds at most on top of the pipeline
    by_capture: dict[str, int]  # "features" / "attention" → bytes written for it

    @property
    def largest_capture(self) -> str:
        return max(self.by_capture, key=self.by_capture.__getitem__)


def _shape(header: CheckpointHeader, key: str) -> tuple[int, ...] | None:
    info = header.tensors.get(key)
    return info.shape if info is not None else None


def _heads_per_level(config_dir: Path) -> list[int]:
    """Heads of the attention layers at each U-Net level (diffusers' `attention_head_dim` of the
    sd1/sd2/sdxl configs is, despite its name, the head count: 8 for sd1, 5-10-20-20 for sd2)."""
    unet = json.loads((config_dir / "unet" / "config.json").read_text())
    levels = len(unet["block_out_channels"])
    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]
    return list(heads) if isinstance(heads, list) else [heads] * levels


def block_geometry(
    header: CheckpointHeader, arch: Architecture, config_dir: Path
) -> dict[str, BlockGeometry]:
    """U-Net block → the geometry of its output, from key shapes (downsampling `op` and upsampling
    `conv` layers, ResBlock output widths, transformer indices)."""
    prefix = arch.unet_prefix
    heads = _heads_per_level(config_dir)
    transformers: dict[str, set[int]] = {}
    for key in header.tensors:
        if key.startswith(prefix) and key.endswith("attn2.to_q.weight"):
            block, element = arch.split_key(key)
            layer = re.search(r"transformer_blocks\.(\d+)\.", element)
            transformers.setdefault(block, set()).add(int(layer.group(1)) if layer else 0)

    def width(*keys: str) -> int | None:
        for key in keys:
            shape = _shape(header, prefix + key)
            if shape:
                return shape[0]
        return None

    geometry: dict[str, BlockGeometry] = {}
    downscale, channels = 1, width("input_blocks.0.0.weight") or 0

    def add(block: str, scale: int) -> None:
        level = min(int(math.log2(scale)), len(heads) - 1)
        geometry[block] = BlockGeometry(
            channels, scale, len(transformers.get(block, ())), heads[level], scale
        )

    for n in range(arch.input_blocks):
        if n and _shape(header, f"{prefix}input_blocks.{n}.0.op.weight"):
            downscale *= 2
        channels = (
            width(f"input_blocks.{n}.0.out_layers.3.weight", f"input_blocks.{n}.0.op.weight") or channels
        )
        add(f"IN{n:02d}", downscale)
    channels = width("middle_block.2.out_layers.3.weight") or channels
    add("M00", downscale)
    for n in range(arch.output_blocks):
        channels = width(f"output_blocks.{n}.0.out_layers.3.weight") or channels
        upsampler = re.compile(rf"{re.escape(prefix)}output_blocks\.{n}\.\d+\.conv\.weight$")
        upsample = any(upsampler.match(k) for k in header.tensors)
        # The block's transformers run before its upsampler: heads by the level it starts at.
        level_scale = downscale
        if upsample:
            downscale = max(1, downscale // 2)
        geometry[f"OUT{n:02d}"] = BlockGeometry(
            channels,
            downscale,
            len(transformers.get(f"OUT{n:02d}", ())),
            heads[min(int(math.log2(level_scale)), len(heads) - 1)],
            level_scale,
        )
    return geometry


def _side(pixels: int, downscale: int) -> int:
    side = pixels // 8
    while downscale > 1:
        side, downscale = (side + 1) // 2, downscale // 2  # stride-2 convs round up
    return side


def estimate_dump(request: Any, inputs: Any, geometry: dict[str, BlockGeometry]) -> CaptureEstimate:
    """`request`: a DumpRequest; `inputs`: its DumpInputs (resolved blocks and steps)."""
    halves = 2 if request.cfg_scale > 1.0 else 1
    batch = request.batch_size
    by_capture = {"features": 0, "attention": 0}
    held = 0  # tensors kept until the job ends
    baseline = 0
    if inputs.features is not None:
        steps = len(inputs.features.steps)
        for block in inputs.features.layers:
            g = geometry[block]
            map_h, map_w = _side(request.height, g.downscale), _side(request.width, g.downscale)
            values = batch * halves * g.channels * map_h * map_w * steps
            picture = framed_pixels_bound(*feature_grid_size(g.channels, map_h, map_w))
            images = batch * halves * steps * picture * PNG_BOUND
            if request.layer_prompt_diff:
                images *= 2  # a difference image beside each
                baseline += values * FLOAT32
            saved = (
                values * FLOAT32 * (2 if request.layer_prompt_diff else 1)
                if inputs.features.save_tensors
                else 0
            )
            held += saved
            by_capture["features"] += saved + images
    if inputs.attention is not None:
        steps = len(inputs.attention.steps)
        for block in inputs.attention.layers:
            g = geometry[block]
            queries = _side(request.height, g.attention_downscale) * _side(
                request.width, g.attention_downscale
            )
            values = batch * halves * g.heads * queries * TOKENS * steps * g.transformers
            images = steps * g.heads * TOKENS * queries * PNG_BOUND  # one grid per block and step
            saved = values * FLOAT32 if inputs.attention.save_tensors else 0
            held += saved
            by_capture["attention"] += saved + images
    latent = (request.height // 8) * (request.width // 8)
    heatmaps = TOKENS * latent * FLOAT32 if inputs.attention is not None else 0
    memory = 2 * held + baseline + heatmaps  # the held tensors, serialised once more at the end
    written = sum(by_capture.values()) + batch * request.width * request.height * PNG_BOUND
    return CaptureEstimate(written_bytes=written, held_bytes=held, memory_bytes=memory, by_capture=by_capture)
