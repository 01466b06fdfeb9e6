"""The low-rank factoring both LoRA-writing jobs use, and the kohya names they write."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from mergeprobe.lora.lora_extract_plan import ExtractRequest, extract_layers  # noqa: E402
from mergeprobe.lora.lora_keys import LoraKeyTable  # noqa: E402
from mergeprobe.lora.lora_merge_plan import published_header  # noqa: E402
from worker.lora.low_rank import (  # noqa: E402
    chosen_rank,
    clamp_to_quantile,
    layer_generator,
    low_rank,
    low_rank_of_product,
    relative_error,
)


def _decaying(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix with singular values 1, 0.8, 0.64, … and the values themselves."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rows, generator=g)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g)).Q
    k = min(rows, cols)
    s = 0.8 ** torch.arange(k, dtype=torch.float32)
    return (u[:, :k] * s) @ v[:, :k].T, s


def test_exact_svd_error_is_the_tail_of_the_spectrum():
    matrix, s = _decaying(48, 40)
    factors = low_rank(matrix, 6)
    assert factors.rank == 6 and factors.up.shape == (48, 6) and factors.down.shape == (6, 40)
    residual, total = relative_error(matrix, factors.up, factors.down)
    expected = float((s[6:] ** 2).sum() / (s**2).sum())
    assert residual / total == pytest.approx(expected, rel=1e-3)


def test_randomised_svd_is_near_optimal_and_repeatable():
    matrix, s = _decaying(200, 160, seed=1)
    optimal = math.sqrt(float((s[8:] ** 2).sum() / (s**2).sum()))
    runs = [low_rank(matrix, 8, generator=layer_generator(3, "layer", torch.device("cpu"))) for _ in range(2)]
    residual, total = relative_error(matrix, runs[0].up, runs[0].down)
    assert math.sqrt(residual / total) <= optimal * 1.01
    assert torch.equal(runs[0].up, runs[1].up) and torch.equal(runs[0].down, runs[1].down)
    other = low_rank(matrix, 8, generator=layer_generator(4, "layer", torch.device("cpu")))
    assert not torch.equal(other.up, runs[0].up)


def test_energy_picks_the_smallest_rank_that_holds_it():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = float((s**2).sum())  # 14.25
    assert chosen_rank(s, total, 4, None) == 4
    assert chosen_rank(s, total, 4, 9 / total) == 1  # 9 of 14.25
    assert chosen_rank(s, total, 4, 13.1 / total) == 3  # 9 + 4 + 1 = 14 ≥ 13.1
    assert chosen_rank(s, total, 2, 0.999) == 2  # capped
    matrix, _ = _decaying(30, 30)
    assert low_rank(matrix, 30, energy=0.9).rank == chosen_rank(
        torch.linalg.svdvals(matrix), float(matrix.square().sum()), 30, 0.9
    )


def test_the_factored_svd_is_the_svd_of_the_product():
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(64, 12, generator=g), torch.randn(12, 90, generator=g)
    product = up @ down
    reduced = low_rank_of_product(up, down, 5)
    exact = low_rank(product, 5)
    torch.testing.assert_close(reduced.up @ reduced.down, exact.up @ exact.down, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        reduced.singular_values, torch.linalg.svdvals(product)[:12], atol=1e-4, rtol=1e-4
    )
    full = low_rank_of_product(up, down, 12)
    torch.testing.assert_close(full.up @ full.down, product, atol=1e-4, rtol=1e-4)


def test_clamp_is_sd_scripts_quantile_clamp():
    g = torch.Generator().manual_seed(2)
    factors = low_rank(torch.randn(40, 30, generator=g), 4)
    up, down = factors.up.clone(), factors.down.clone()
    limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)  # sd-scripts' CLAMP_QUANTILE
    clamp_to_quantile(factors, 0.99)
    assert torch.equal(factors.up, up.clamp(-limit, limit))
    assert torch.equal(factors.down, down.clamp(-limit, limit))


@pytest.mark.parametrize(
    ("arch", "counts", "names"),
    [
        (
            "sd1",
            {"unet": 192, "te": 72},
            [
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_up_blocks_3_attentions_2_proj_out",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                "lora_te_text_model_encoder_layers_11_mlp_fc2",
            ],
        ),
        (
            "sd2",
            {"unet": 192, "te": 138},  # OpenCLIP ViT-H: 23 layers (the 24th is in the file, unused)
            ["lora_te_text_model_encoder_layers_0_self_attn_v_proj"],
        ),
        (
            "sdxl",
            {"unet": 722, "te1": 72, "te2": 192},
            [
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te2_text_model_encoder_layers_31_self_attn_k_proj",
            ],
        ),
    ],
)
def test_extracted_layers_are_the_ones_sd_scripts_trains_and_named_as_it_names_them(arch, counts, names):
    """sd-scripts logs "create LoRA for U-Net: 192 modules" (SD1) and 722 / 72 / 192 (SDXL U-Net, TE1,
    TE2); every name we write matches back to the layer it was made from."""
    header = published_header(arch)
    layers = extract_layers(arch, header, ExtractRequest(model_tuned="t", model_base="b"))
    by_component: dict[str, int] = {}
    for layer in layers:
        by_component[layer.target.component] = by_component.get(layer.target.component, 0) + 1
    assert by_component == counts
    written = {layer.name for layer in layers}
    assert set(names) <= written
    table = LoraKeyTable.for_checkpoint(arch, header.tensors)
    for layer in layers:
        assert table.match(layer.name + ".lora_down.weight") == layer.target, layer.name
    with_convs = extract_layers(arch, header, ExtractRequest(model_tuned="t", model_base="b", conv_rank=8))
    convs = [layer for layer in with_convs if layer.conv]
    assert convs and all(layer.rank_cap == 8 for layer in convs)
    assert all(table.match(layer.name) == layer.target for layer in with_convs)
