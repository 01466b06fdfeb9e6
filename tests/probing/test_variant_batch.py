"""Several sweep variants in one U-Net call (worker.probing.variant_batch) on the tiny U-Nets."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from worker.checkpoints.full_layouts import full_config_dir
from worker.checkpoints.tiny_models import build_tiny_pipeline_components
from worker.probing.variant_batch import UnbatchableModule, VariantBatch, check_batchable

ROWS_PER_VARIANT = 2


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def unet(request) -> UNet2DConditionModel:
    return build_tiny_pipeline_components(request.param, seed=4)["unet"]


def _inputs(unet: UNet2DConditionModel, rows: int) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(rows, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(rows, 7, config.cross_attention_dim, generator=generator)
    timestep = torch.tensor(400)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        time_ids = config.addition_time_embed_dim
        text = config.projection_class_embeddings_input_dim - 6 * time_ids
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, text, generator=generator),
            "time_ids": torch.randn(rows, 6, generator=generator),
        }
    return (sample, timestep, context), kwargs


def _first(unet: nn.Module, kind: type, where: str) -> str:
    return next(n for n, m in unet.named_modules() if type(m) is kind and n.startswith(where))


def _patches(unet: UNet2DConditionModel) -> list[dict[str, torch.Tensor]]:
    """Three variants, each changing leaves of several kinds, some of them global (time embedding)."""
    generator = torch.Generator().manual_seed(1)
    params = dict(unet.named_parameters())

    def random_like(*names: str) -> dict[str, torch.Tensor]:
        return {n: torch.randn(params[n].shape, generator=generator) for n in names}

    conv = _first(unet, nn.Conv2d, "down_blocks.0.resnets.0")
    to_k = next(n for n, _ in unet.named_modules() if n.endswith("attn2.to_k"))
    group_norm = _first(unet, nn.GroupNorm, "up_blocks.1")
    layer_norm = _first(unet, nn.LayerNorm, "mid_block")
    return [
        random_like(f"{conv}.weight", f"{conv}.bias"),
        random_like(f"{to_k}.weight", f"{group_norm}.weight"),
        random_like("time_embedding.linear_1.weight", f"{layer_norm}.bias", "conv_out.weight"),
    ]


def _alone(unet: UNet2DConditionModel, patch: dict[str, torch.Tensor], args, kwargs) -> torch.Tensor:
    patched = copy.deepcopy(unet)
    with torch.no_grad():
        for name, tensor in patch.items():
            dict(patched.named_parameters())[name].copy_(tensor)
        return patched(*args, **kwargs).sample


def _rows(args, kwargs, index: torch.Tensor):
    take = lambda t: t.index_select(0, index) if t.dim() else t  # noqa: E731
    return tuple(take(a) for a in args), {
        k: ({kk: take(vv) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in kwargs.items()
    }


def test_each_variant_rows_compute_with_its_own_weights(unet):
    patches = _patches(unet)
    variants = len(patches)
    rows = 2 * variants * ROWS_PER_VARIANT  # two halves, as with classifier-free guidance
    args, kwargs = _inputs(unet, rows)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.no_grad(), VariantBatch(unet, patches, ROWS_PER_VARIANT):
        batched = unet(*args, **kwargs).sample
    with torch.no_grad():
        baseline = unet(*args, **kwargs).sample

    for index, patch in enumerate(patches):
        own = torch.tensor(
            [r for r in range(rows) if (r % (variants * ROWS_PER_VARIANT)) // ROWS_PER_VARIANT == index]
        )
        expected = _alone(unet, patch, *_rows(args, kwargs, own))
        torch.testing.assert_close(batched.index_select(0, own), expected, rtol=1e-4, atol=1e-4)
        # The patch mattered: these rows are not the baseline's.
        assert (batched.index_select(0, own) - baseline.index_select(0, own)).abs().max() > 1e-2

    assert all(torch.equal(p.detach(), before[n]) for n, p in unet.named_parameters())
    assert not any("forward" in vars(m) for m in unet.modules()), "a wrapper was left behind"


def test_one_variant_uses_its_weights_for_every_row(unet):
    patch = _patches(unet)[1]
    args, kwargs = _inputs(unet, 2 * ROWS_PER_VARIANT)
    with torch.no_grad(), VariantBatch(unet, [patch], ROWS_PER_VARIANT):
        batched = unet(*args, **kwargs).sample
    torch.testing.assert_close(batched, _alone(unet, patch, args, kwargs), rtol=1e-5, atol=1e-5)


def test_rows_that_do_not_split_into_the_variants_are_an_error(unet):
    patches = _patches(unet)
    args, kwargs = _inputs(unet, 5)
    with torch.no_grad(), VariantBatch(unet, patches, ROWS_PER_VARIANT):
        with pytest.raises(RuntimeError, match="not a multiple of 3 variants"):
            unet(*args, **kwargs)
    assert not any("forward" in vars(m) for m in unet.modules())


def test_a_parameter_outside_the_known_leaves_is_refused():
    model = nn.ModuleDict({"emb": nn.Embedding(4, 3), "proj": nn.Linear(3, 3)})
    with pytest.raises(UnbatchableModule, match="emb.weight: Embedding"):
        VariantBatch(model, [{"proj.weight": torch.zeros(3, 3), "emb.weight": torch.zeros(4, 3)}], 1)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_full_size_unet_parameter_is_batchable(arch):
    config = UNet2DConditionModel.load_config(full_config_dir(arch) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    check_batchable(unet, [name for name, _ in unet.named_parameters()])
