"""A sweep's in-memory baseline is the merge a merge job writes: same inputs, same ranges, same
random draws, OpenCLIP's fused q/k/v and transposed projection merged as the file stores them."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from mergeprobe.checkpoints.checkpoint_headers import read_checkpoint_header
from mergeprobe.checkpoints.library import ModelLibrary
from mergeprobe.merging.merge_methods import MERGE_METHODS
from mergeprobe.merging.merge_plan import MergeRequest, plan_merge
from mergeprobe.service.settings import Settings
from worker.checkpoints.checkpoint_io import MappedCheckpoint
from worker.checkpoints.param_map import ldm_groups_of
from worker.checkpoints.tiny_models import tiny_config_dir, write_tiny_checkpoint
from worker.engines.sweep import _apply_baseline, _Weights
from worker.merging import merge_executor
from worker.merging import stream_merge as stream_merge_module
from worker.probing.pipelines import load_pipeline


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """arch → (tiny-{arch}-b, tiny-{arch}-c), written once per module on first use (only read)."""
    root = tmp_path_factory.mktemp("sweep-baseline-sources")
    written: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in written:
            written[arch] = tuple(
                write_tiny_checkpoint(arch, root / f"tiny-{arch}-{name}.safetensors", seed=seed, dtype="fp16")
                for name, seed in (("b", 2), ("c", 3))
            )
        return written[arch]

    return get


@pytest.mark.parametrize(
    ("arch", "mode", "beta"),
    [
        ("sdxl", "dare", 0.3),  # random draws per range
        ("sd2", "ties", 0.5),  # top-k over the whole (fused) tensor
        ("sdxl", "slerp", None),  # norms over the whole tensor
        ("sdxl", "dare_sd_mecha", 0.3),  # sd-mecha's conventions: the same rules, asked of the method
        ("sd2", "ties_sd_mecha", 0.5),
        ("sdxl", "slerp_sd_mecha", None),
        ("sd2", "add_difference", None),
        ("sd1", "weighted_sum", None),
        ("sd1", "scaled_sum", 0.8),
        ("sd1", "triple_sum", 0.2),
        ("sd1", "sum_twice", 0.3),
        ("sd1", "train_difference", None),
    ],
)
def test_baseline_equals_the_written_merge(tmp_path, tiny_models, others, monkeypatch, arch, mode, beta):
    """Every method (each is checked on one architecture; the fused text-encoder cases on sd2/sdxl)."""
    monkeypatch.setattr(merge_executor, "CHUNK_ELEMENTS", 1000)  # tiny tensors span many ranges
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_models[arch], models / f"tiny-{arch}-a.safetensors")
    for source in others(arch):
        shutil.copy(source, models / source.name)
    library = ModelLibrary(Settings(data_dir=tmp_path))
    request = MergeRequest(
        model_a=f"tiny-{arch}-a",
        model_b=f"tiny-{arch}-b",
        model_c=f"tiny-{arch}-c" if MERGE_METHODS[mode].needs_c else None,
        mode=mode,
        alpha="IN00-IN03:0.3, _:0.7",
        beta=beta,
        base_alpha=0.6,
        output={"name": "written.safetensors", "dtype": "fp32"},
    )
    plan = plan_merge(request, library)
    written_path = tmp_path / "written.safetensors"
    stream_merge_module.stream_merge(
        plan, written_path, {"format": "pt"}, device=torch.device("cpu"), seed=request.seed
    )
    written = load_file(written_path)

    pipe = load_pipeline(plan.paths["a"], arch, tiny_config_dir(arch), torch.device("cpu"), torch.float32)
    sources = {slot: MappedCheckpoint(path, plan.headers[slot]) for slot, path in plan.paths.items()}
    weights = _Weights(pipe, arch, sources)
    _apply_baseline(weights, plan, request.seed)

    fused = [key for key, group in weights.groups.items() if len(group) > 1]
    assert (len(fused) > 0) == (arch in ("sd2", "sdxl"))
    compared = 0
    for key in weights.groups:
        for param_id, expected in weights.to_params(key, written[key]).items():
            assert torch.equal(weights.params[param_id].detach(), expected), (key, param_id)
            compared += 1
    assert compared == len(weights.params)
    assert any(plan_key.block == "BASE" and plan_key.action == "merge" for plan_key in plan.keys)


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_fused_in_proj_groups_q_k_v_in_order(tiny_models, arch):
    pipe = load_pipeline(tiny_models[arch], arch, tiny_config_dir(arch), torch.device("cpu"), torch.float32)
    groups = ldm_groups_of(pipe, arch)
    in_proj = [key for key in groups if key.endswith("attn.in_proj_weight")]
    assert in_proj
    for key in in_proj:
        names = [name.rsplit(".", 2)[-2] for _, name in groups[key]]
        assert names == ["q_proj", "k_proj", "v_proj"], key
    every = [param_id for group in groups.values() for param_id in group]
    assert len(every) == len(set(every))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_ldm_tensors_cut_into_parameters_as_diffusers_loads_them(tiny_models, arch):
    """to_params (fused q/k/v split, OpenCLIP's transposed projection) agrees with diffusers' own
    single-file loader on every parameter of every component."""
    path = tiny_models[arch]
    pipe = load_pipeline(path, arch, tiny_config_dir(arch), torch.device("cpu"), torch.float32)
    weights = _Weights(pipe, arch, {"a": MappedCheckpoint(path, read_checkpoint_header(path))})
    file = load_file(path)
    checked = 0
    for key in weights.groups:
        for param_id, value in weights.to_params(key, file[key].float()).items():
            assert torch.equal(weights.params[param_id].detach(), value), (key, param_id)
            checked += 1
    assert checked == len(weights.params)
