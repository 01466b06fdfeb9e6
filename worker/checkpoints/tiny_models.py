"""Tiny random Stable Diffusion checkpoints with the real key names and block topology.

Stand-ins for 2-7 GB checkpoints in tests and for ``mergeprobe demo-models``: sd1, sd2 and sdxl
single-file checkpoints in the original LDM ("A1111") layout, about 8 MB each in fp16, with every key
name real files have (``model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight``,
``first_stage_model.encoder.mid.attn_1.q.weight``, ``cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight``,
``conditioner.embedders.1.model.text_projection`` ...) and the real block topology
(sd1/sd2: 12 input blocks, a middle block, 12 output blocks, cross-attention in the first three
levels; sdxl: 9 + 1 + 9 blocks, no attention in the first level, ``label_emb``), only much narrower.

The models are built from the diffusers pipeline configs shipped in ``mergeprobe/configs/tiny/<arch>/``
(usable as ``config=`` of ``StableDiffusionPipeline.from_single_file`` /
``StableDiffusionXLPipeline.from_single_file`` with ``local_files_only=True``), and every float
parameter is then overwritten with values drawn from a generator seeded by (arch, component, seed):
the same seed gives the same bytes, different seeds differ in every float tensor.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import mergeprobe
from mergeprobe.probing.clip_tokenizer import bytes_to_unicode, clip_vocab, merge_pair

__all__ = [
    "TINY_ARCHS",
    "TINY_CONFIG_ROOT",
    "build_tiny_pipeline_components",
    "tiny_checkpoint_state_dict",
    "tiny_config_dir",
    "tiny_tokenizer_vocab_and_merges",
    "write_demo_models",
    "write_tiny_checkpoint",
]

TINY_ARCHS = ("sd1", "sd2", "sdxl")
# mergeprobe/configs/tiny; one diffusers pipeline config directory per arch below it.
TINY_CONFIG_ROOT = Path(mergeprobe.__file__).resolve().parent / "configs" / "tiny"

DTYPES = ("fp32", "fp16", "bf16")
DEMO_MODELS = (
    ("sd1", "a"),
    ("sd1", "b"),
    ("sd1", "c"),
    ("sd2", "a"),
    ("sd2", "b"),
    ("sdxl", "a"),
    ("sdxl", "b"),
)


def tiny_config_dir(arch: str) -> Path:
    """The shipped diffusers pipeline config directory of ``arch`` (no weights in it)."""
    _check_arch(arch)
    return TINY_CONFIG_ROOT / arch


def _check_arch(arch: str) -> None:
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")


# ------------------------------------------------------------------------------------ tokenizer

# Words the tiny BPE vocabulary tokenizes to a single token each (plus every byte, as in CLIP).
_TOKENIZER_WORDS = (
    "a an the of in on with and at by for to is girl boy woman man cat dog cute photo portrait "
    "painting landscape city night day light red blue green white black sky sun moon tree forest "
    "house street water sea mountain flower hair eyes face dress smiling beautiful detailed art style "
    "high quality best masterpiece realistic anime lowres bad blurry sitting standing"
).split()


def tiny_tokenizer_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny CLIP BPE tokenizer shipped in the config dirs: (vocab, merges).

    Laid out like CLIP's: the 256 byte symbols, the same with ``</w>``, one token per learned
    merge, then ``<|startoftext|>`` and ``<|endoftext|>``. The merges are learned (greedy BPE,
    ties broken by first occurrence) on a few dozen common prompt words, so "a cute girl" or
    "a cat" are one token per word; anything else falls back to bytes.
    """
    b2u = bytes_to_unicode()
    words: dict[str, list[str]] = {}
    for word in _TOKENIZER_WORDS:
        symbols = [b2u[b] for b in word.encode()]
        symbols[-1] += "</w>"
        words[word] = symbols
    merges: list[tuple[str, str]] = []
    while True:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        order: dict[tuple[str, str], int] = {}
        for symbols in words.values():
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] += 1
                order.setdefault(pair, len(order))
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -order[p]))
        merges.append(best)
        words = {word: merge_pair(symbols, best) for word, symbols in words.items()}
    return {t: i for i, t in enumerate(clip_vocab(merges))}, merges


# ------------------------------------------------------------------------------ model building


def _seed_for(arch: str, component: str, seed: int) -> int:
    digest = hashlib.sha256(f"mergeprobe-tiny/{arch}/{component}/{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _randomize_(module: Any, generator: Any) -> None:
    """Overwrite every float parameter of ``module`` with small seeded random values.

    Norm weights stay near 1 and everything else near 0 at a scale that keeps activations
    sane (weights ~ N(0, 1/fan_in)), so a pipeline made of them produces finite images.
    """
    import torch
    from torch import nn

    norms = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
    with torch.no_grad():
        for _, sub in module.named_modules():
            for name, param in sub.named_parameters(recurse=False):
                if not param.is_floating_point():
                    continue
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                if isinstance(sub, norms):
                    value = (1.0 + 0.1 * noise) if name == "weight" else 0.05 * noise
                elif isinstance(sub, nn.Embedding):
                    value = 0.05 * noise
                elif name == "weight" and param.ndim >= 2:
                    value = noise / math.sqrt(param[0].numel())
                else:
                    value = 0.05 * noise
                param.copy_(value.to(param.dtype))


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def build_tiny_pipeline_components(arch: str, seed: int = 0) -> dict[str, Any]:
    """Freshly built, seeded, fp32 pipeline components of the tiny ``arch`` model.

    Keys are the pipeline's ``__init__`` arguments: ``unet``, ``vae``, ``text_encoder``,
    ``tokenizer``, ``scheduler`` (+ ``text_encoder_2``, ``tokenizer_2`` for sdxl), so
    ``StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
    requires_safety_checker=False)`` / ``StableDiffusionXLPipeline(**components)`` work.
    """
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = tiny_config_dir(arch)
    index = _load_json(root / "model_index.json")
    components: dict[str, Any] = {}
    # Construction draws from the global CPU generator; fork it so callers' random state is left alone.
    # The values drawn there do not matter: _randomize_ overwrites every parameter from our own generator.
    with torch.random.fork_rng(devices=[]):
        for name, entry in sorted(index.items()):
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
                continue  # metadata, pipeline flags, absent components (safety checker ...)
            library, class_name = entry
            folder = root / name
            if class_name in ("UNet2DConditionModel", "AutoencoderKL"):
                cls = UNet2DConditionModel if class_name == "UNet2DConditionModel" else AutoencoderKL
                model = cls.from_config(_load_json(folder / "config.json"))
            elif library == "transformers" and class_name.startswith("CLIPTextModel"):
                cls = getattr(transformers, class_name)
                model = cls(transformers.CLIPTextConfig.from_pretrained(folder, local_files_only=True))
            elif library == "transformers":
                components[name] = getattr(transformers, class_name).from_pretrained(
                    folder, local_files_only=True
                )
                continue
            else:  # scheduler
                components[name] = getattr(diffusers, class_name).from_pretrained(
                    root, subfolder=name, local_files_only=True
                )
                continue
            generator = torch.Generator().manual_seed(_seed_for(arch, name, seed))
            _randomize_(model, generator)
            components[name] = model.eval().requires_grad_(False)
    return components


def tiny_checkpoint_state_dict(arch: str, seed: int = 0) -> dict[str, Any]:
    """The single-file LDM state dict of the tiny ``arch`` model (fp32; int64 position_ids)."""
    import torch

    from worker.checkpoints import ldm_convert as lc

    components = build_tiny_pipeline_components(arch, seed)
    sd: dict[str, torch.Tensor] = {}
    sd.update(lc.unet_to_ldm(components["unet"].state_dict()))
    sd.update(lc.vae_to_ldm(components["vae"].state_dict()))
    extras = torch.Generator().manual_seed(_seed_for(arch, "ldm-extras", seed))
    if arch == "sd1":
        sd.update(lc.clip_l_to_ldm(components["text_encoder"].state_dict(), lc.SD1_CLIP_PREFIX))
    elif arch == "sd2":
        # sd2's diffusers text encoder has no projection, yet real sd2 files carry OpenCLIP's.
        width = components["text_encoder"].config.hidden_size
        projection = torch.randn(width, width, generator=extras) / math.sqrt(width)
        logit_scale = lc.OPEN_CLIP_LOGIT_SCALE + 0.01 * torch.randn((), generator=extras)
        sd.update(
            lc.open_clip_to_ldm(
                components["text_encoder"].state_dict(),
                lc.SD2_OPENCLIP_PREFIX,
                text_projection=projection,
                logit_scale=logit_scale,
            )
        )
    else:
        sd.update(lc.clip_l_to_ldm(components["text_encoder"].state_dict(), lc.SDXL_CLIP_L_PREFIX))
        logit_scale = lc.OPEN_CLIP_LOGIT_SCALE + 0.01 * torch.randn((), generator=extras)
        sd.update(
            lc.open_clip_to_ldm(
                components["text_encoder_2"].state_dict(), lc.SDXL_OPENCLIP_PREFIX, logit_scale=logit_scale
            )
        )
    return {key: value.detach().clone().contiguous() for key, value in sd.items()}


def _torch_dtype(dtype: str) -> Any:
    import torch

    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}") from None


def write_tiny_checkpoint(
    arch: str,
    path: str | os.PathLike[str],
    seed: int = 0,
    dtype: str = "fp32",
    fmt: str | None = None,
) -> Path:
    """Write the tiny ``arch`` checkpoint to ``path`` and return it as a Path.

    ``fmt`` is "safetensors" or "ckpt"; by default ``.ckpt`` / ``.pt`` / ``.pth`` paths get a
    torch.save zip of ``{"state_dict": sd}`` (real .ckpt files nest it so) and anything else
    a .safetensors file (metadata ``{"format": "pt"}``). Float tensors are stored in ``dtype``;
    the int64 position_ids keep their dtype. The file appears atomically.
    """
    import torch

    _check_arch(arch)
    path = Path(path)
    if fmt is None:
        fmt = "ckpt" if path.suffix.lower() in (".ckpt", ".pt", ".pth") else "safetensors"
    if fmt not in ("safetensors", "ckpt"):
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', not {fmt!r}")
    target = _torch_dtype(dtype)
    sd = {
        key: (value.to(target) if value.is_floating_point() else value).contiguous()
        for key, value in tiny_checkpoint_state_dict(arch, seed).items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        if fmt == "safetensors":
            from safetensors.torch import save

            # save() gives the bytes save_file() would write; writing them ourselves keeps the
            # usual umask-based permissions (save_file creates 0600 files).
            partial.write_bytes(save(sd, metadata={"format": "pt"}))
        else:
            torch.save({"state_dict": sd}, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_demo_models(directory: str | os.PathLike[str]) -> list[Path]:
    """Write the demo library: tiny-sd1-{a,b,c}, tiny-sd2-{a,b}, tiny-sdxl-{a,b} (.safetensors, fp16).

    The letter picks the seed (a=1, b=2, c=3), so the files are the same on every run.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [
        write_tiny_checkpoint(
            arch,
            directory / f"tiny-{arch}-{letter}.safetensors",
            seed=ord(letter) - ord("a") + 1,
            dtype="fp16",
        )
        for arch, letter in DEMO_MODELS
    ]
