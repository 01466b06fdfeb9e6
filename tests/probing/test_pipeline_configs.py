"""Full-size pipeline configs work offline with no MERGEPROBE_PIPELINE_CONFIGS_DIR: the config that
fits a checkpoint is found, and its tokenizers get CLIP's vocabulary from the shipped merges, with
each tokenizer's own padding (sd2 and sdxl's second pad with `!`)."""

from __future__ import annotations

import shutil

import pytest

from mergeprobe.checkpoints.checkpoint_headers import CheckpointHeader, TensorInfo
from mergeprobe.probing.pipeline_configs import SHIPPED_CONFIGS, completed_config_dir, fitting_config_dir
from mergeprobe.service.errors import Unprocessable
from mergeprobe.service.settings import Settings

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" (OpenAI's CLIP README)


def header(channels: int, context: int) -> CheckpointHeader:
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": TensorInfo("c", "F16", (channels, 4, 3, 3), None),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": TensorInfo(
            "k", "F16", (channels, context), None
        ),
    }
    return CheckpointHeader("safetensors", tensors, {}, 0, 0)


@pytest.mark.parametrize(
    ("arch", "slots"),
    [
        ("sd1", {"tokenizer": 49407}),
        ("sd2", {"tokenizer": 0}),
        ("sdxl", {"tokenizer": 49407, "tokenizer_2": 0}),
    ],
)
def test_full_size_configs_complete_offline(tmp_path, arch, slots):
    from transformers import CLIPTokenizer

    settings = Settings(data_dir=tmp_path, pipeline_configs_dir=None)
    context = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[arch]
    found = fitting_config_dir(arch, header(320, context), settings)
    assert found == SHIPPED_CONFIGS / "full" / arch
    completed = completed_config_dir(found, arch, settings)
    assert completed.is_relative_to(settings.cache_path) and (completed / "unet" / "config.json").is_file()
    for slot, pad_id in slots.items():
        tokenizer = CLIPTokenizer.from_pretrained(completed / slot, local_files_only=True)
        ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert ids[:7] == CAT and len(ids) == 77 and set(ids[7:]) == {pad_id}, slot
    stamp = (completed / "tokenizer" / "vocab.json").stat().st_mtime_ns
    assert completed_config_dir(found, arch, settings) == completed  # written once
    assert (completed / "tokenizer" / "vocab.json").stat().st_mtime_ns == stamp
    assert not list(completed.parent.glob(".*"))  # no half-built copy left


def test_complete_configs_are_used_as_they_are(tmp_path):
    settings = Settings(data_dir=tmp_path)
    tiny = SHIPPED_CONFIGS / "tiny" / "sdxl"
    assert completed_config_dir(tiny, "sdxl", settings) == tiny
    assert not settings.cache_path.exists()


def test_an_override_without_tokenizers_gets_them(tmp_path):
    from transformers import CLIPTokenizer

    override = tmp_path / "configs"
    shutil.copytree(SHIPPED_CONFIGS / "full" / "sd2", override / "sd2")
    shutil.rmtree(override / "sd2" / "tokenizer")
    settings = Settings(data_dir=tmp_path / "data", pipeline_configs_dir=override)
    found = fitting_config_dir("sd2", header(320, 1024), settings)
    assert found == override / "sd2"
    tokenizer = CLIPTokenizer.from_pretrained(completed_config_dir(found, "sd2", settings) / "tokenizer")
    assert tokenizer.pad_token == "!" and not (override / "sd2" / "tokenizer").exists()


def test_a_checkpoint_no_config_fits_is_refused_naming_the_field(tmp_path):
    with pytest.raises(Unprocessable) as raised:
        fitting_config_dir("sd1", header(192, 768), Settings(data_dir=tmp_path), field="model_a")
    assert raised.value.field == "model_a" and "MERGEPROBE_PIPELINE_CONFIGS_DIR" in raised.value.detail


def test_a_v_prediction_model_gets_a_v_prediction_zero_snr_scheduler(tmp_path, tiny_models):
    """The scheduler follows the variant decided at submission, through the worker's cache and the
    sampler the request picks."""
    from safetensors.torch import load_file, save_file

    from mergeprobe.checkpoints.checkpoint_headers import read_checkpoint_header
    from mergeprobe.checkpoints.variants import detect_variant
    from mergeprobe.probing.pipeline_configs import check_probeable
    from worker.probing import generation

    state = load_file(tiny_models["sdxl"])
    import torch

    state.update(v_pred=torch.zeros(0), ztsnr=torch.zeros(0))
    path = tmp_path / "xl-v.safetensors"
    save_file(state, path)
    settings = Settings(data_dir=tmp_path / "data")
    header = read_checkpoint_header(path)
    variant = check_probeable(path.name, header, detect_variant(header, path), None, settings)
    assert (variant.prediction_type, variant.zero_terminal_snr) == ("v_prediction", True)
    generation._cache = None
    pipe, cached, _ = generation.get_pipeline(settings, path, header, "sdxl", "x" * 64, variant)
    assert not cached
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing"
    for sampler in ("euler_a", "dpmpp_2m", "ddim"):
        assert generation.make_scheduler(sampler, config).config.prediction_type == "v_prediction"
    forced = check_probeable(path.name, header, detect_variant(header, path), "epsilon", settings)
    again, cached, _ = generation.get_pipeline(settings, path, header, "sdxl", "x" * 64, forced)
    assert not cached and again.scheduler.config.prediction_type == "epsilon"
    generation._cache = None
