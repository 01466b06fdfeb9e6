"""Hooks on a diffusers U-Net: block outputs and cross-attention probabilities per sampler
step, and a different text context per block. Installed for one generation and always
removed afterwards, so a cached pipeline is never left patched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from worker.probing.unet_blocks import UNetBlock, unet_blocks

# (block, step, output) / (block, step, transformer index, probs, (h, w))
FeatureSink = Callable[[str, int, torch.Tensor], None]
AttentionSink = Callable[[str, int, int, torch.Tensor, tuple[int, int]], None]


@dataclass
class ProbeState:
    latent_size: tuple[int, int]  # (h, w) of the latent
    step: int = 1  # 1-based sampler step of the U-Net call in progress
    contexts: dict[str, torch.Tensor] = field(default_factory=dict)  # block → attn2 context
    feature_steps: dict[str, set[int]] = field(default_factory=dict)
    attention_steps: dict[str, set[int]] = field(default_factory=dict)
    on_feature: FeatureSink | None = None
    on_attention: AttentionSink | None = None


def _spatial(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of an attention layer's queries, from their count and the latent size."""
    h, w = latent
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2  # diffusers' stride-2 convs round up
    if h * w != tokens:
        raise ValueError(f"cannot place {tokens} queries on a {latent} latent")
    return h, w


class BlockCrossAttention:
    """attn2 processor: swaps in the block's own text context, and computes the attention
    explicitly (to record its probabilities) at the steps being captured; otherwise it
    hands over to the processor the model had."""

    def __init__(self, block: str, index: int, state: ProbeState, original) -> None:
        self.block = block
        self.index = index
        self.state = state
        self.original = original

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        state = self.state
        context = state.contexts.get(self.block)
        if context is not None and encoder_hidden_states is not None:
            encoder_hidden_states = context.to(
                device=encoder_hidden_states.device, dtype=encoder_hidden_states.dtype
            )
        if state.on_attention is None or state.step not in state.attention_steps.get(self.block, ()):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask)

    def _explicit(self, attn, hidden_states, context, attention_mask):
        # Cross-attention inside SD transformer blocks: 3-D input, no spatial/group norm, no residual.
        batch, queries, _ = hidden_states.shape
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        # Scores in float32 whatever the pipeline's precision: the recorded maps are what users study.
        probs = attn.get_attention_scores(query.float(), key.float(), mask)
        out = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))
        out = attn.to_out[1](attn.to_out[0](out))
        heads = attn.heads
        per_head = probs.reshape(batch, heads, queries, probs.shape[-1])
        self.state.on_attention(
            self.block, self.state.step, self.index, per_head, _spatial(queries, self.state.latent_size)
        )
        return out / attn.rescale_output_factor


class Probe:
    """Context manager: install on enter, restore the U-Net exactly on exit (also on errors)."""

    def __init__(self, unet: nn.Module, state: ProbeState) -> None:
        self.unet = unet
        self.state = state
        self.blocks: dict[str, UNetBlock] = unet_blocks(unet)
        self._hooks: list = []
        self._saved_processors: dict | None = None

    def __enter__(self) -> Probe:
        try:
            self._saved_processors = dict(self.unet.attn_processors)
            processors = dict(self._saved_processors)
            by_module = {id(m): name for name, m in self.unet.named_modules()}
            for block in self.blocks.values():
                for index, (_, module) in enumerate(block.cross_attentions()):
                    key = f"{by_module[id(module)]}.processor"
                    processors[key] = BlockCrossAttention(
                        block.name, index, self.state, self._saved_processors[key]
                    )
            self.unet.set_attn_processor(processors)
            for name, steps in self.state.feature_steps.items():
                if steps:
                    self._hooks.append(
                        self.blocks[name].output.register_forward_hook(self._feature_hook(name))
                    )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _feature_hook(self, name: str):
        def hook(module, args, output):
            if self.state.on_feature is not None and self.state.step in self.state.feature_steps[name]:
                tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
                self.state.on_feature(name, self.state.step, tensor)

        return hook

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._saved_processors is not None:
            self.unet.set_attn_processor(self._saved_processors)
            self._saved_processors = None
