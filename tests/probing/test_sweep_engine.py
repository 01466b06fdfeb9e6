"""sweep jobs through the real engine in this process (no queue, no worker): the weights the
cached pipeline is left with, batched variants against one call each, reused baseline images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import install_model
from tests.probing.test_sweep import SMALL


@pytest.fixture
def sweep_in_process(service, tiny_models, monkeypatch):
    """Runs a sweep request through the real engine in this process (real Redis, artifacts, files);
    returns (result, context). Settings come from the environment at each call."""
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.probing.sweep_request import SweepRequest
    from mergeprobe.service.kinds import KINDS
    from worker.context import JobContext
    from worker.engines.sweep import run_sweep
    from worker.probing import generation

    for name in ("sd1", "sd1-b", "sd2", "sdxl"):
        install_model(service, tiny_models[name])
    for key, value in service.env.items():
        if key.startswith(("MERGEPROBE_", "REDIS_URL")):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(generation, "_cache", None)

    def sweep(body):
        settings = service.settings()
        ctx = JobContext.local(
            KINDS["sweep"],
            SweepRequest.model_validate(body),
            settings=settings,
            library=ModelLibrary(settings),
        )
        return run_sweep(ctx), ctx

    return sweep


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_are_restored_bit_for_bit(service, sweep_in_process, monkeypatch, dtype):
    """After the sweep the cached pipeline holds model A's weights exactly, and generating again
    reproduces the baseline image, in either CPU precision."""
    from safetensors.torch import load_file

    from worker.checkpoints.param_map import ldm_keys_of
    from worker.probing import generation

    monkeypatch.setenv("MERGEPROBE_GENERATION_DTYPE", dtype)
    sweep = sweep_in_process
    merged = {
        "model_a": "tiny-sd1-a",
        "model_b": "tiny-sd1-b",
        "alpha": "GRAD_V",
        "base_alpha": 0.3,
        "seeds": [5],
        **SMALL,
    }
    first, ctx = sweep({**merged, "variants": {"blocks": "IN00-OUT11(+3)", "alpha": 1, "beta": 0.5}})
    baseline_path = next(a for a in ctx.artifacts if a["name"] == "baseline_s5.png")
    again, ctx2 = sweep({**merged, "variants": {"blocks": "M00", "alpha": 1}})
    baseline_again = next(a for a in ctx2.artifacts if a["name"] == "baseline_s5.png")
    assert baseline_path["sha256"] == baseline_again["sha256"], "a variant left the baseline changed"
    assert again["pipeline_cached"] is True
    assert first["dtype"] == again["dtype"] == dtype

    pipe = next(iter(generation._cache._entries.values()))[0]
    a_file = load_file(service.models_dir / "tiny-sd1-a.safetensors")
    keys = ldm_keys_of(pipe, "sd1")
    for (component, name), key in keys.items():
        if component == "unet":
            param = dict(pipe.unet.named_parameters())[name]
            assert torch.equal(param.detach(), a_file[key].to(param.dtype).view(param.shape)), key


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_batched_variants_match_one_variant_per_call(sweep_in_process, monkeypatch, arch):
    """All the study's variants in one pipeline call give the images they get one call each (up
    to the last bits of float arithmetic at another batch size)."""
    from mergeprobe.checkpoints.archs import get_arch
    from mergeprobe.service.artifacts import ArtifactStore
    from mergeprobe.service.settings import Settings

    blocks = list(get_arch(arch).unet_blocks)
    body = {
        "model_a": f"tiny-{arch}-a",
        "variants": {"blocks": f"{blocks[0]}-{blocks[-1]}", "alpha": 0, "beta": 0.5},
        "seeds": [3, 4],
        **SMALL,
    }
    if arch == "sd1":
        body.update(model_b="tiny-sd1-b", alpha=0.3, variants={**body["variants"], "alpha": 1})
    monkeypatch.setenv("MERGEPROBE_SWEEP_BATCH_PIXELS", "0")
    alone, ctx_alone = sweep_in_process(body)
    monkeypatch.delenv("MERGEPROBE_SWEEP_BATCH_PIXELS")
    batched, ctx_batched = sweep_in_process(body)
    assert (alone["pipeline_calls"], batched["pipeline_calls"]) == (len(blocks) + 1, 2)

    store = ArtifactStore(Settings())

    def pixels(ctx, name):
        image = Image.open(io.BytesIO(store.read_bytes(ctx.job_id, name))).convert("RGB")
        return torch.from_numpy(np.asarray(image, dtype=np.int16))

    changed = 0
    for block in blocks:
        for seed in (3, 4):
            name = f"{block}_s{seed}.png"
            one, many = pixels(ctx_alone, name), pixels(ctx_batched, name)
            assert (one - many).abs().max() <= 2, name
            changed += not torch.equal(one, pixels(ctx_alone, f"baseline_s{seed}.png"))
    assert changed > len(blocks), "the variants should mostly differ from the baseline"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_variant_repeating_a_merged_baselines_ratios_changes_nothing(sweep_in_process, monkeypatch, dtype):
    """Recomputing a block of a merged baseline with the baseline's own α gives its tensors bit for
    bit (A comes from model_a, never from the merged pipeline), so the variants reuse its images."""
    monkeypatch.setenv("MERGEPROBE_GENERATION_DTYPE", dtype)
    result, _ = sweep_in_process(
        {
            "model_a": "tiny-sd1-a",
            "model_b": "tiny-sd1-b",
            "alpha": 0.3,
            "variants": {"blocks": "IN04, M00, OUT11", "alpha": 0.3},
            "seeds": [3],
            **SMALL,
        }
    )
    assert result["pipeline_calls"] == 1
    assert all(r["changed_share"] == 0 and r["mean_abs_diff"] == 0 for r in result["rows"])
