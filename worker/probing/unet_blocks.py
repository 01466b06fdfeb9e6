"""Where the block-merge blocks (IN00 … OUTnn) live inside a diffusers UNet2DConditionModel.

The original (LDM) U-Net is a flat list of `input_blocks`, a `middle_block` and
`output_blocks`; diffusers groups the same layers by resolution level. This maps one
onto the other, so hooks placed here see exactly what a block of the original outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class UNetBlock:
    name: str
    output: nn.Module  # its forward output is the block's output
    members: list[nn.Module] = field(default_factory=list)  # every module of the block

    def cross_attentions(self) -> list[tuple[str, nn.Module]]:
        """(path inside the block, module) of every cross-attention (attn2) in the block."""
        found = []
        for index, member in enumerate(self.members):
            for path, module in member.named_modules():
                if path.endswith("attn2"):
                    found.append((f"{index}.{path}", module))
        return found


def unet_blocks(unet: nn.Module) -> dict[str, UNetBlock]:
    """Block name → UNetBlock, in U-Net order."""
    blocks = {"IN00": UNetBlock("IN00", unet.conv_in, [unet.conv_in])}
    index = 1
    for down in unet.down_blocks:
        attentions = getattr(down, "attentions", None)
        for j, resnet in enumerate(down.resnets):
            attention = attentions[j] if attentions else None
            name = f"IN{index:02d}"
            blocks[name] = UNetBlock(name, attention or resnet, [resnet] + ([attention] if attention else []))
            index += 1
        if down.downsamplers:
            name = f"IN{index:02d}"
            blocks[name] = UNetBlock(name, down.downsamplers[0], [down.downsamplers[0]])
            index += 1
    blocks["M00"] = UNetBlock("M00", unet.mid_block, [unet.mid_block])
    index = 0
    for up in unet.up_blocks:
        attentions = getattr(up, "attentions", None)
        last = len(up.resnets) - 1
        for j, resnet in enumerate(up.resnets):
            attention = attentions[j] if attentions else None
            members = [resnet] + ([attention] if attention else [])
            output = attention or resnet
            if j == last and up.upsamplers:
                # The original's output block holds the level's upsampler too.
                members.append(up.upsamplers[0])
                output = up.upsamplers[0]
            name = f"OUT{index:02d}"
            blocks[name] = UNetBlock(name, output, members)
            index += 1
    return blocks
