"""The key layout of real full-size Stable Diffusion checkpoints, and random files with it.

``full_state_dict_layout(arch)`` gives every key of a real single-file checkpoint (LDM / "A1111"
layout, U-Net + VAE + text encoder(s), no EMA copy) with its shape and safetensors dtype. It is
computed, not transcribed: the full-size diffusers / transformers modules are built on the meta
device (no memory, no weights, well under a second) from the published pipeline configs shipped in
``mergeprobe/configs/full/<arch>/``, and their state dicts are renamed by ``worker.checkpoints.ldm_convert``
exactly as the tiny test models are (1x1-conv VAE attention, OpenCLIP ``in_proj_weight``,
transposed ``text_projection``, int64 ``position_ids``, scalar ``logit_scale``).

Where a real file differs from what the diffusers modules hold, the layout follows the file:

* sd2: the OpenCLIP ViT-H text tower has 24 residual blocks; diffusers' text encoder keeps 23
  (SD 2.x conditions on the penultimate layer) and its single-file loader ignores
  ``cond_stage_model.model.transformer.resblocks.23.*``. The layout builds 24 layers.
* sd2: the diffusers text encoder has no projection, real files carry OpenCLIP's
  ``text_projection`` ([1024, 1024]) and ``logit_scale``; sdxl's OpenCLIP bigG has both too.

Not in the layout: the diffusion schedule buffers (``betas``, ``alphas_cumprod`` ...) and
``model_ema.*`` that some sd1/sd2 files also carry; they are BASE keys merge tools copy.

``element_table(arch)`` is, per U-Net block, the sorted element names of those keys
(``mergeprobe.checkpoints.archs.element_of_key``); ``python -m worker.checkpoints.full_layouts --write-element-tables``
writes them to ``mergeprobe/configs/elements/<arch>.json``, which ``mergeprobe.checkpoints.elements`` reads
without torch.

``write_random_checkpoint(arch, path, seed=...)`` streams a full-size random checkpoint with that
layout to disk, tensor by tensor (a few MB of memory whatever the size), for benchmarks.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mergeprobe
from mergeprobe.checkpoints.archs import BASE, UNET_PREFIX, VAE_PREFIX, get_arch
from mergeprobe.checkpoints.archs import block_of_key as _block_of_key
from mergeprobe.checkpoints.archs import element_of_key as _element_of_key

__all__ = [
    "ELEMENTS_ROOT",
    "FULL_ARCHS",
    "FULL_CONFIG_ROOT",
    "base_prefixes",
    "element_table",
    "element_table_document",
    "full_config_dir",
    "full_state_dict_layout",
    "layout_numel",
    "write_element_tables",
    "write_random_checkpoint",
]

FULL_ARCHS = ("sd1", "sd2", "sdxl")
_PACKAGE = Path(mergeprobe.__file__).resolve().parent
FULL_CONFIG_ROOT = _PACKAGE / "configs" / "full"
ELEMENTS_ROOT = _PACKAGE / "configs" / "elements"

# OpenCLIP ViT-H (sd2): the file has 24 blocks, diffusers' config 23 (the last one is unused).
_SD2_OPEN_CLIP_LAYERS = 24
_FLOAT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
# safetensors' own writer orders tensors by dtype (larger alignment first), then by name.
_DTYPE_ORDER = {
    name: rank
    for rank, names in enumerate(("F64 I64", "F32 I32", "F16 BF16 I16", "U8 I8 BOOL"))
    for name in names.split()
}
_FILL_CHUNK = 1 << 22  # elements generated per step when writing random tensors (16 MB of fp32)
_RING = 3  # buffers in flight between the generating and the writing thread


def _check_arch(arch: str) -> None:
    if arch not in FULL_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(FULL_ARCHS)}")


def full_config_dir(arch: str) -> Path:
    """The shipped full-size diffusers pipeline config directory of ``arch`` (no weights, no tokenizer)."""
    _check_arch(arch)
    return FULL_CONFIG_ROOT / arch


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _meta_state_dict(arch: str) -> dict[str, Any]:
    """The LDM-layout state dict of the full-size model as meta tensors (shapes only, no data)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from worker.checkpoints import ldm_convert as lc

    root = full_config_dir(arch)

    def text_encoder(folder: str, cls_name: str, **overrides: Any) -> dict[str, torch.Tensor]:
        config = transformers.CLIPTextConfig.from_pretrained(root / folder, local_files_only=True)
        for name, value in overrides.items():
            setattr(config, name, value)
        with torch.device("meta"):
            return getattr(transformers, cls_name)(config).state_dict()

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_load_json(root / "unet" / "config.json")).state_dict()
        vae = AutoencoderKL.from_config(_load_json(root / "vae" / "config.json")).state_dict()
    sd: dict[str, torch.Tensor] = {}
    sd.update(lc.unet_to_ldm(unet))
    sd.update(lc.vae_to_ldm(vae))
    logit_scale = torch.empty((), device="meta")
    if arch == "sd1":
        sd.update(lc.clip_l_to_ldm(text_encoder("text_encoder", "CLIPTextModel"), lc.SD1_CLIP_PREFIX))
    elif arch == "sd2":
        te = text_encoder("text_encoder", "CLIPTextModel", num_hidden_layers=_SD2_OPEN_CLIP_LAYERS)
        width = te["embeddings.token_embedding.weight"].shape[1]
        projection = torch.empty(width, width, device="meta")
        sd.update(
            lc.open_clip_to_ldm(
                te, lc.SD2_OPENCLIP_PREFIX, text_projection=projection, logit_scale=logit_scale
            )
        )
    else:
        sd.update(lc.clip_l_to_ldm(text_encoder("text_encoder", "CLIPTextModel"), lc.SDXL_CLIP_L_PREFIX))
        te2 = text_encoder("text_encoder_2", "CLIPTextModelWithProjection")
        sd.update(lc.open_clip_to_ldm(te2, lc.SDXL_OPENCLIP_PREFIX, logit_scale=logit_scale))
    return sd


@functools.cache
def _layout(arch: str, dtype: str) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    _check_arch(arch)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_FLOAT_DTYPES)}, not {dtype!r}")
    float_name = _FLOAT_DTYPES[dtype]
    rows = []
    for key, tensor in _meta_state_dict(arch).items():
        if tensor.is_floating_point():
            name = float_name
        elif str(tensor.dtype) == "torch.int64":
            name = "I64"
        else:
            raise TypeError(f"{key}: unexpected dtype {tensor.dtype}")
        rows.append((key, tuple(int(d) for d in tensor.shape), name))
    return tuple(rows)


def full_state_dict_layout(arch: str, dtype: str = "fp16") -> dict[str, tuple[tuple[int, ...], str]]:
    """key → (shape, safetensors dtype name) of a real single-file ``arch`` checkpoint.

    Floating-point tensors get ``dtype`` ("fp16", "bf16" or "fp32"); ``position_ids`` stay I64.
    Keys come in the order U-Net, VAE, text encoder(s) (not the order of a file).
    """
    return {key: (shape, name) for key, shape, name in _layout(arch, dtype)}


def layout_numel(layout: dict[str, tuple[tuple[int, ...], str]], prefix: str = "") -> int:
    """Number of elements of the layout's keys that start with ``prefix``."""
    total = 0
    for key, (shape, _) in layout.items():
        if key.startswith(prefix):
            count = 1
            for dim in shape:
                count *= dim
            total += count
    return total


# ------------------------------------------------------------------------------ element tables

_BASE_PREFIXES = (
    "first_stage_model.",
    "cond_stage_model.transformer.text_model.",
    "cond_stage_model.model.",
    "conditioner.embedders.0.transformer.text_model.",
    "conditioner.embedders.1.model.",
)


def base_prefixes(arch: str) -> dict[str, int]:
    """BASE key prefix → number of keys in the full layout (text encoders and VAE)."""
    arch_info = get_arch(arch)
    counts: dict[str, int] = {}
    for key in full_state_dict_layout(arch):
        if _block_of_key(arch_info, key) != BASE:
            continue
        prefix = next((p for p in _BASE_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{key}: BASE key with no known prefix")
        counts[prefix] = counts.get(prefix, 0) + 1
    return dict(sorted(counts.items()))


def element_table(arch: str) -> dict[str, list[str]]:
    """U-Net block → sorted element names of the real full-size keys in it (BASE excluded)."""
    arch_info = get_arch(arch)
    table: dict[str, set[str]] = {block: set() for block in arch_info.unet_blocks}
    for key in full_state_dict_layout(arch):
        block = _block_of_key(arch_info, key)
        if block != BASE:
            table[block].add(_element_of_key(arch_info, key))
    return {block: sorted(elements) for block, elements in table.items()}


def element_table_document(arch: str) -> dict[str, Any]:
    """What ``mergeprobe/configs/elements/<arch>.json`` holds."""
    return {
        "arch": arch,
        "generated_by": "python -m worker.checkpoints.full_layouts --write-element-tables",
        "base": {
            "note": "BASE (text encoders and VAE) has no element table: its element is the full key. "
            "Key counts by prefix:",
            "prefixes": base_prefixes(arch),
        },
        "blocks": element_table(arch),
        "weights_note": "Every U-Net and text encoder weight of two or more dimensions with its shape: the "
        "layers LoRAs are made for (a LoRA merge without a checkpoint assigns its modules to blocks by them).",
        "weights": lora_layer_shapes(arch),
    }


def lora_layer_shapes(arch: str) -> dict[str, str]:
    """key → shape ("320x4x3x3": one line per key in the file) of the U-Net and text encoder
    weights (2-D and up) of a real ``arch`` checkpoint."""
    arch_info = get_arch(arch)
    prefixes = (arch_info.unet_prefix, *arch_info.text_encoder_prefixes)
    return {
        key: "x".join(map(str, shape))
        for key, (shape, _) in full_state_dict_layout(arch).items()
        if key.startswith(prefixes) and len(shape) >= 2
    }


def render_element_table(arch: str) -> str:
    return json.dumps(element_table_document(arch), indent=1) + "\n"


def write_element_tables(root: str | os.PathLike[str] = ELEMENTS_ROOT) -> list[Path]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for arch in FULL_ARCHS:
        path = root / f"{arch}.json"
        path.write_text(render_element_table(arch), encoding="utf-8")
        written.append(path)
    return written


# -------------------------------------------------------------------------- random checkpoints


def _key_seed(arch: str, seed: int, key: str) -> int:
    digest = hashlib.sha256(f"mergeprobe-full/{arch}/{int(seed)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def file_order(layout: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """The order safetensors' writer would lay the keys out in: by dtype alignment, then name."""
    return sorted(layout, key=lambda k: (_DTYPE_ORDER.get(layout[k][1], 4), k))


def write_random_checkpoint(
    arch: str,
    path: str | os.PathLike[str],
    *,
    seed: int,
    dtype: str = "fp16",
    keys: Iterable[str] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Stream a full-size random ``arch`` checkpoint (.safetensors) to ``path``; returns the path.

    Float tensors hold standard-normal values drawn from a generator seeded by (arch, seed, key),
    so a key has the same bytes whatever else is written; ``position_ids`` hold 0..76.
    ``keys`` writes only those keys of the layout (tests); unknown keys raise KeyError.
    Memory stays at a few 16 MB buffers; the file appears atomically.
    """
    import torch

    from mergeprobe.checkpoints.safetensors_layout import build_header

    layout = full_state_dict_layout(arch, dtype)
    if keys is not None:
        wanted = list(dict.fromkeys(keys))
        missing = [k for k in wanted if k not in layout]
        if missing:
            raise KeyError(f"not in the {arch} layout: {', '.join(missing[:5])}")
        layout = {k: layout[k] for k in wanted}
    order = file_order(layout)
    header, _ = build_header(((k, layout[k][1], layout[k][0]) for k in order), metadata or {"format": "pt"})
    torch_float = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[_FLOAT_DTYPES[dtype]]
    # A few buffers in a ring: one thread writes a chunk while the next one is generated.
    ring = []
    for _ in range(_RING):
        noise = torch.empty(_FILL_CHUNK, dtype=torch.float32)
        ring.append(
            (noise, noise if torch_float == torch.float32 else torch.empty(_FILL_CHUNK, dtype=torch_float))
        )
    writes: list[Future[None] | None] = [None] * _RING

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="random-writer") as writer:
            writes[0] = writer.submit(_write_all, fd, memoryview(header))
            slot = 0
            for key in order:
                shape, name = layout[key]
                numel = 1
                for dim in shape:
                    numel *= dim
                generator = torch.Generator().manual_seed(_key_seed(arch, seed, key))
                for start in range(0, numel, _FILL_CHUNK):
                    count = min(_FILL_CHUNK, numel - start)
                    slot = (slot + 1) % _RING
                    if (pending := writes[slot]) is not None:
                        pending.result()  # the buffer is free again
                    noise, cast = ring[slot]
                    if name == "I64":  # position_ids
                        data = torch.arange(start, start + count, dtype=torch.int64)
                    else:
                        torch.randn(count, generator=generator, out=noise[:count])
                        if cast is not noise:
                            cast[:count].copy_(noise[:count])
                        data = cast[:count]
                    writes[slot] = writer.submit(_write_all, fd, memoryview(data.view(torch.uint8).numpy()))
            for pending in writes:
                if pending is not None:
                    pending.result()
        os.close(fd)
        fd = -1
        os.replace(partial, path)
    finally:
        if fd >= 0:
            os.close(fd)
        partial.unlink(missing_ok=True)
    return path


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.checkpoints.full_layouts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--write-element-tables", action="store_true", help="write mergeprobe/configs/elements/<arch>.json"
    )
    parser.add_argument("--summary", action="store_true", help="print key and parameter counts per arch")
    parser.add_argument(
        "--random", nargs=2, metavar=("ARCH", "PATH"), help="write a full-size random checkpoint"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp16", choices=sorted(_FLOAT_DTYPES))
    args = parser.parse_args(argv)
    if not (args.write_element_tables or args.summary or args.random):
        parser.error("nothing to do")
    if args.write_element_tables:
        for path in write_element_tables():
            print(path)
    if args.summary:
        for arch in FULL_ARCHS:
            layout = full_state_dict_layout(arch)
            unet = sum(1 for k in layout if k.startswith(UNET_PREFIX))
            print(
                f"{arch}: {len(layout)} keys ({unet} U-Net), {layout_numel(layout) / 1e6:.1f} M elements "
                f"(U-Net {layout_numel(layout, UNET_PREFIX) / 1e6:.1f} M, "
                f"VAE {layout_numel(layout, VAE_PREFIX) / 1e6:.1f} M)"
            )
    if args.random:
        arch, path = args.random
        print(write_random_checkpoint(arch, path, seed=args.seed, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
