"""What a checkpoint is (detect_variant): each variant users bring, on tiny models that carry its
marker keys, channel counts and statistics, in both file formats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeprobe.checkpoints.checkpoint_headers import read_checkpoint_header, read_float_values
from mergeprobe.checkpoints.variants import SD2_V_STATISTIC_KEY, detect_variant
from tests.checkpoints.test_checkpoint_headers import NoFilenoReader

UNET = "model.diffusion_model."


def derive(
    source: Path,
    dest: Path,
    *,
    add: dict[str, torch.Tensor] | None = None,
    drop: tuple[str, ...] = (),
    metadata: dict[str, str] | None = None,
    nest: bool = False,
) -> Path:
    """A copy of a tiny checkpoint with keys added, replaced or dropped (by prefix); .ckpt when
    `dest` says so (nested under `state_dict` with `nest`, as training checkpoints are)."""
    state = {k: v for k, v in load_file(source).items() if not (drop and k.startswith(drop))}
    state.update(add or {})
    if dest.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 7} if nest else state, dest)
    else:
        save_file(state, dest, metadata=metadata)
    return dest


def variant_of(path: Path, *, from_fileobj: bool = False):
    """detect_variant of the file at `path`, or of its bytes in a file object with no fileno()
    (named so that nothing could open it)."""
    if not from_fileobj:
        return detect_variant(read_checkpoint_header(path), path)
    fileobj = NoFilenoReader(path.read_bytes())
    return detect_variant(
        read_checkpoint_header(f"/no/such/dir/{path.name}", fileobj=fileobj), fileobj=fileobj
    )


def with_spread(source: Path, std: float, dtype=torch.float16) -> dict[str, torch.Tensor]:
    width = load_file(source)[SD2_V_STATISTIC_KEY].numel()
    values = torch.linspace(-1.0, 1.0, width, dtype=torch.float64)
    values = values / values.std(unbiased=False) * std
    return {SD2_V_STATISTIC_KEY: values.to(dtype)}


@pytest.mark.parametrize(("arch", "name", "resolution"), [("sd1", "sd1", 512), ("sdxl", "sdxl", 1024)])
def test_plain_models(tiny_models, arch, name, resolution):
    v = variant_of(tiny_models[arch])
    assert (v.arch, v.name, v.prediction_type, v.resolution) == (arch, name, "epsilon", resolution)
    assert v.has_unet and v.has_vae and v.has_text_encoders and v.ema == "none"
    assert not (v.inpainting or v.refiner or v.zero_terminal_snr) and v.in_channels == 4
    assert v.unsupported_for_generation is None


@pytest.mark.parametrize(("std", "expected"), [(0.2, "v_prediction"), (0.05, "epsilon")])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("from_fileobj", [False, True], ids=["path", "fileobj"])
def test_sd2_by_comfyuis_statistic(tiny_models, tmp_path, std, expected, suffix, from_fileobj):
    path = derive(
        tiny_models["sd2"], tmp_path / f"sd2{suffix}", add=with_spread(tiny_models["sd2"], std), nest=True
    )
    v = variant_of(path, from_fileobj=from_fileobj)
    assert (v.arch, v.prediction_type) == ("sd2", expected)
    assert v.name == ("sd2-v" if expected == "v_prediction" else "sd2-epsilon")
    assert v.resolution == (768 if expected == "v_prediction" else 512)
    assert f"{std:.4f}" in v.prediction_source and "ComfyUI" in v.prediction_source


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_statistic_values_read_without_torch(tiny_models, tmp_path, dtype):
    path = derive(
        tiny_models["sd2"], tmp_path / "m.safetensors", add=with_spread(tiny_models["sd2"], 0.3, dtype)
    )
    header = read_checkpoint_header(path)
    values = read_float_values(path, header, SD2_V_STATISTIC_KEY)
    expected = load_file(path)[SD2_V_STATISTIC_KEY].float().tolist()
    assert values == pytest.approx(expected, abs=0) and len(values) > 1
    fileobj = NoFilenoReader(path.read_bytes())
    assert read_float_values(None, header, SD2_V_STATISTIC_KEY, fileobj=fileobj) == values


def test_markers_and_metadata(tiny_models, tmp_path):
    empty = torch.zeros(0)
    vpred = variant_of(derive(tiny_models["sdxl"], tmp_path / "v.safetensors", add={"v_pred": empty}))
    assert (vpred.name, vpred.prediction_type, vpred.zero_terminal_snr) == ("sdxl-v", "v_prediction", False)
    assert vpred.prediction_source == "the v_pred marker key"
    zt = variant_of(
        derive(tiny_models["sdxl"], tmp_path / "z.safetensors", add={"v_pred": empty, "ztsnr": empty})
    )
    assert zt.zero_terminal_snr and zt.prediction_type == "v_prediction"
    declared = variant_of(
        derive(tiny_models["sd1"], tmp_path / "d.safetensors", metadata={"modelspec.prediction_type": "v"})
    )
    assert declared.prediction_type == "v_prediction" and "modelspec" in declared.prediction_source
    edm = variant_of(
        derive(tiny_models["sdxl"], tmp_path / "e.safetensors", add={"edm_mean": torch.zeros(4)})
    )
    assert (edm.arch, edm.name, edm.prediction_type) == ("sdxl", "sdxl-edm", "edm")
    assert "EDM" in edm.unsupported_for_generation


def test_inpainting_and_pix2pix(tiny_models, tmp_path):
    conv = load_file(tiny_models["sd1"])[UNET + "input_blocks.0.0.weight"]
    for channels, name in ((9, "sd1-inpainting"), (8, "sd1-8ch")):
        wide = torch.zeros(conv.shape[0], channels, *conv.shape[2:], dtype=conv.dtype)
        v = variant_of(
            derive(
                tiny_models["sd1"],
                tmp_path / f"{channels}.safetensors",
                add={UNET + "input_blocks.0.0.weight": wide},
            )
        )
        assert (v.name, v.in_channels, v.inpainting) == (name, channels, channels == 9)
        assert "channels" in v.unsupported_for_generation


def test_refiner_is_no_known_architecture(tiny_models, tmp_path):
    label = load_file(tiny_models["sdxl"])[UNET + "label_emb.0.0.weight"]
    refiner_label = torch.zeros(label.shape[0], 2560, dtype=label.dtype)
    v = variant_of(
        derive(
            tiny_models["sdxl"],
            tmp_path / "r.safetensors",
            add={UNET + "label_emb.0.0.weight": refiner_label},
        )
    )
    assert (v.arch, v.name, v.refiner) == ("unknown", "sdxl-refiner", True)
    assert "refiner" in v.unsupported_for_generation


def test_ema_and_components(tiny_models, tmp_path):
    source = tiny_models["sd1"]
    buffers = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)}
    assert variant_of(derive(source, tmp_path / "b.safetensors", add=buffers)).ema == "none"
    copies = {**buffers, "model_ema.diffusion_modelout2bias": torch.zeros(4)}
    assert variant_of(derive(source, tmp_path / "s.safetensors", add=copies)).ema == "separate"
    pruned = variant_of(
        derive(source, tmp_path / "p.safetensors", drop=("first_stage_model.", "cond_stage_model."))
    )
    assert pruned.arch == "sd1" and not pruned.has_vae and not pruned.has_text_encoders
    assert "no VAE and no text encoders" in pruned.unsupported_for_generation
