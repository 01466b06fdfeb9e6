"""The merge plan (headers only) and the streaming engine, on real tiny checkpoint files.

Plans are checked key by key against real sd1/sdxl key names; merged files are checked against
references computed here from `safetensors.torch.load_file` with the block of each key worked
out independently (`sd1_position`), and loaded back with safetensors (in diffusers: test_merge_outputs.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import worker.merging.stream_merge as stream_merge_module
from mergeprobe.checkpoints.library import ModelLibrary, legacy_hash_of, sha256_of
from mergeprobe.merging.merge_metadata import merge_metadata
from mergeprobe.merging.merge_methods import MERGE_METHODS
from mergeprobe.merging.merge_plan import MergeRequest, plan_merge
from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.problems import Problem
from mergeprobe.service.problems import problem_of as as_problem
from mergeprobe.service.settings import Settings
from worker.checkpoints.tiny_models import write_tiny_checkpoint
from worker.merging import merge_executor
from worker.merging.stream_merge import stream_merge

U = "model.diffusion_model."
CONV_IN = U + "input_blocks.0.0.weight"
IN04_TO_K = U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
IN04_TO_Q = U + "input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight"
IN04_ATTN1_Q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
TIME_EMBED = U + "time_embed.0.weight"
MID_Q = U + "middle_block.1.transformer_blocks.0.attn1.to_q.weight"
OUT00 = U + "output_blocks.0.0.in_layers.2.weight"  # the largest tensor: 73 728 elements
OUT11 = U + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
FINAL_OUT = U + "out.2.weight"
VAE_KEY = "first_stage_model.decoder.conv_in.weight"
TEXT_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
CPU = torch.device("cpu")

# name in the test library → key of the conftest `tiny_models` fixture (None: written here)
LIBRARY_FILES = {
    "sd1-a.safetensors": "sd1",  # seed 1, fp16
    "sd1-b.safetensors": "sd1-b",  # seed 2, fp16
    "sd1-c.safetensors": None,  # seed 3, fp16
    "sd1-c32.ckpt": "sd1-ckpt",  # seed 3, fp32, torch.save'd {"state_dict": ...}
    "sdxl-a.safetensors": "sdxl",
}


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-engine-sources")
    paths = {}
    for name, key in LIBRARY_FILES.items():
        paths[name] = (
            tiny_models[key] if key else write_tiny_checkpoint("sd1", root / name, seed=3, dtype="fp16")
        )
    return paths


@pytest.fixture(scope="module")
def tensors(sources):
    """name → state dict (cached), read with safetensors (torch.load for .ckpt)."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def get(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            path = sources[name]
            if name.endswith(".ckpt"):
                cache[name] = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            else:
                cache[name] = load_file(path)
        return cache[name]

    return get


@pytest.fixture
def library(tmp_path, monkeypatch, sources) -> ModelLibrary:
    data = tmp_path / "data"
    models = data / "models"
    models.mkdir(parents=True)
    monkeypatch.setenv("MERGEPROBE_DATA_DIR", str(data))
    monkeypatch.delenv("MERGEPROBE_MODELS_DIR", raising=False)
    for name, source in sources.items():
        try:
            os.link(source, models / name)
        except OSError:
            shutil.copyfile(source, models / name)
    return ModelLibrary(Settings())


# -------------------------------------------------------------------------------------- helpers


def save_model(library: ModelLibrary, name: str, state: dict[str, torch.Tensor]) -> Path:
    path = library.root / name
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    return path


def request(**fields) -> MergeRequest:
    fields.setdefault("model_a", "sd1-a")
    fields.setdefault("model_b", "sd1-b")
    return MergeRequest.model_validate(fields)


def plan_of(library: ModelLibrary, **fields):
    return plan_merge(request(**fields), library)


def by_key(plan) -> dict:
    return {k.key: k for k in plan.keys}


def problem_of(library: ModelLibrary, **fields) -> Problem:
    """The problem the client is shown for the domain error the call raises."""
    with pytest.raises(MergeprobeError) as info:
        plan_of(library, **fields)
    assert as_problem(info.value).status == 400
    return as_problem(info.value)


def run_merge(library: ModelLibrary, req: MergeRequest, out: Path | None = None, *, metadata=None, **kwargs):
    """Plan, build the metadata as the merge job does, stream; → (plan, output path, digest, metadata)."""
    plan = plan_merge(req, library)
    if metadata is None:
        hashes = {slot: library.hashes(path) for slot, path in plan.paths.items()}
        metadata = merge_metadata(plan, req.model_dump(mode="json"), hashes, req.output.metadata)
    out = out or library.root / plan.output_name
    digest = stream_merge(plan, out, metadata, device=CPU, seed=req.seed, threads=2, **kwargs)
    return plan, out, digest, metadata


def read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length)), 8 + length


def file_order(path: Path) -> list[str]:
    header, _ = read_header(path)
    entries = [(v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__"]
    return [k for _, k in sorted(entries)]


def sd1_position(key: str) -> int | None:
    """A key's position 0…24 in the sd1 U-Net block list (IN00…IN11, M00, OUT00…OUT11); None for BASE."""
    if not key.startswith(U):
        return None
    rest = key[len(U) :]
    if m := re.match(r"input_blocks\.(\d+)\.", rest):
        return int(m[1])
    if rest.startswith("time_embed."):
        return 0
    if rest.startswith("middle_block."):
        return 12
    if m := re.match(r"output_blocks\.(\d+)\.", rest):
        return 13 + int(m[1])
    if rest.startswith("out."):
        return 24
    raise AssertionError(f"unexpected U-Net key {key}")


def within_ulp(out: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where `out` equals ref32 rounded to `dtype` or is one unit in the last place away from it.

    Near zero (where (1 − α)·A + α·B cancels) the fp32 results themselves differ by a few fp32
    ulps of the operands (~1e-8), more than a bf16 ulp there: 2⁻²⁴ absolute is allowed too.
    """
    assert out.dtype == dtype
    ref = ref32.to(dtype).float()
    mantissa = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    return (out.float() - ref).abs() <= ref.abs() * 2.0**-mantissa + 2.0**-24


def assert_within_ulp(out: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype, key: str) -> None:
    assert within_ulp(out, ref32, dtype).all(), key


def flat(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1) for k in keys])


def first_failing_key(ok: torch.Tensor, keys: list[str], state: dict[str, torch.Tensor]) -> str | None:
    """The key of the first False in `ok` (a mask over `flat(state, keys)`), None when all hold."""
    if ok.all():
        return None
    index = int((~ok).nonzero()[0])
    for key in keys:
        if index < state[key].numel():
            return key
        index -= state[key].numel()
    raise AssertionError("mask longer than the tensors")


# 25 distinct per-block α (IN00 = 0, so IN00 is copied from A)
LIST_ALPHA = [round(0.04 * i, 2) for i in range(25)]


def weighted_reference(a: dict, b: dict, alphas: list[float], base: float) -> dict[str, torch.Tensor]:
    ref = {}
    for key, ta in a.items():
        if not ta.is_floating_point():
            ref[key] = ta
            continue
        pos = sd1_position(key)
        alpha = base if pos is None else alphas[pos]
        ref[key] = (1 - alpha) * ta.float() + alpha * b[key].float()
    return ref


# ============================================================================================ plan


def test_block_weights_by_spec_land_on_keys(library):
    keys = by_key(plan_of(library, alpha="IN00:0.1, IN04:0.4, M00:0.5, OUT11:0.9, _:0.3"))
    expected = {
        IN04_TO_K: ("IN04", 0.4, "1.transformer_blocks.0.attn2.to_k.weight"),
        U + "input_blocks.4.0.in_layers.2.weight": ("IN04", 0.4, "0.in_layers.2.weight"),
        CONV_IN: ("IN00", 0.1, "0.weight"),
        TIME_EMBED: ("IN00", 0.1, "time_embed.0.weight"),
        U + "input_blocks.5.1.proj_in.weight": ("IN05", 0.3, "1.proj_in.weight"),
        MID_Q: ("M00", 0.5, "1.transformer_blocks.0.attn1.to_q.weight"),
        OUT11: ("OUT11", 0.9, "1.transformer_blocks.0.attn2.to_k.weight"),
        FINAL_OUT: ("OUT11", 0.9, "out.2.weight"),
        OUT00: ("OUT00", 0.3, "0.in_layers.2.weight"),
        VAE_KEY: ("BASE", 0.0, VAE_KEY),
        TEXT_KEY: ("BASE", 0.0, TEXT_KEY),
    }
    for key, (block, alpha, element) in expected.items():
        kp = keys[key]
        assert (kp.block, kp.alpha, kp.element) == (block, alpha, element), key
        assert kp.action == ("copy_a" if alpha == 0 else "merge"), key
        assert kp.beta is None


def test_block_weights_by_list(library):
    keys = by_key(plan_of(library, alpha=LIST_ALPHA))
    for key in (IN04_TO_K, CONV_IN, TIME_EMBED, MID_Q, OUT00, OUT11, FINAL_OUT):
        assert keys[key].alpha == LIST_ALPHA[sd1_position(key)], key
    assert keys[IN04_TO_K].alpha == 0.16 and keys[MID_Q].alpha == 0.48 and keys[FINAL_OUT].alpha == 0.96
    assert keys[VAE_KEY].alpha == 0.0  # a list without BASE: BASE 0
    # 26 values: BASE first
    keys = by_key(plan_of(library, alpha=[0.7, *LIST_ALPHA]))
    assert keys[VAE_KEY].alpha == 0.7 and keys[TEXT_KEY].alpha == 0.7
    assert keys[IN04_TO_K].alpha == 0.16


def test_block_weights_by_preset(library):
    keys = by_key(plan_of(library, alpha="GRAD_V"))
    assert keys[IN04_TO_K].alpha == 0.6666666667
    assert keys[MID_Q].alpha == 0.0 and keys[MID_Q].action == "copy_a"  # weighted_sum α 0: A as is
    assert keys[FINAL_OUT].alpha == 1.0 and keys[FINAL_OUT].action == "copy_b"  # α 1: B as is
    assert keys[TIME_EMBED].action == "copy_b"
    assert keys[VAE_KEY].alpha == 0.0 and keys[VAE_KEY].action == "copy_a"


SDXL_MID_K = U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
SDXL_TEXT = "conditioner.embedders.1.model.text_projection"


def test_block_weights_on_sdxl(library):
    plan = plan_of(library, model_a="sdxl-a", model_b="sdxl-a", alpha="GRAD_V")
    keys = by_key(plan)
    # sdxl has 19 U-Net blocks; GRAD_V as SuperMerger's weighttoxl makes it: each block the sd1
    # block of its name (IN03 ← IN03, M00 ← M00, OUT08 ← OUT08), BASE 0 from its preset line
    assert keys[U + "input_blocks.3.0.op.weight"].block == "IN03"
    assert keys[U + "input_blocks.3.0.op.weight"].alpha == 0.75
    assert keys[U + "label_emb.0.0.weight"].block == "IN00"
    assert keys[U + "label_emb.0.0.weight"].alpha == 1.0
    assert keys[SDXL_MID_K].alpha == 0.0
    assert (keys[U + "out.2.weight"].block, keys[U + "out.2.weight"].alpha) == ("OUT08", 0.75)
    assert (keys[SDXL_TEXT].block, keys[SDXL_TEXT].alpha) == ("BASE", 0.0)
    assert plan.warnings == []
    # the curve over U-Net depth on request: IN03 ← sd1 IN04, OUT08 ← OUT11
    keys = by_key(plan_of(library, model_a="sdxl-a", model_b="sdxl-a", alpha="GRAD_V@depth"))
    assert keys[U + "input_blocks.3.0.op.weight"].alpha == 0.6666666667
    assert keys[U + "out.2.weight"].alpha == 1.0 and keys[SDXL_MID_K].alpha == 0.0


def test_sd1_list_on_sdxl_is_converted_with_a_warning(library):
    # SuperMerger's format (BASE first, sd1's 25 blocks), once as a list, once as beta's string
    sd1 = [round(i / 24, 4) for i in range(25)]
    plan = plan_of(
        library,
        model_a="sdxl-a",
        model_b="sdxl-a",
        mode="triple_sum",
        model_c="sdxl-a",
        alpha=[0.1, *sd1],
        beta=",".join(str(v) for v in [0.2, *sd1]),
    )
    keys = by_key(plan)
    assert keys[SDXL_TEXT].alpha == 0.1 and keys[SDXL_TEXT].beta == 0.2
    assert keys[U + "input_blocks.8.0.in_layers.0.weight"].alpha == sd1[8]  # sd1 IN08
    assert keys[SDXL_MID_K].alpha == sd1[12] == 0.5  # sd1 M00
    assert keys[U + "out.2.weight"].alpha == keys[U + "out.2.weight"].beta == sd1[21]  # sd1 OUT08
    assert [w.split(":")[0] for w in plan.warnings] == ["alpha", "beta"]
    assert plan.warnings[0].startswith(
        "alpha: 26 sd1 values (BASE first) converted to sdxl as SuperMerger's weighttoxl does"
    )
    assert "dropped IN09=0.375, IN10=0.4167, IN11=0.4583, OUT09=0.9167" in plan.warnings[0]
    # the same list on sd1 needs no conversion
    assert plan_of(library, alpha=[0.1, *sd1]).warnings == []


def test_preset_base_and_base_alpha_precedence(library):
    # the preset's BASE (SuperMerger: ALL_B's line starts with 1) unless base_alpha is given
    assert by_key(plan_of(library, alpha="ALL_B"))[VAE_KEY].alpha == 1.0
    assert by_key(plan_of(library, alpha="ALL_B", base_alpha=0.2))[VAE_KEY].alpha == 0.2
    assert by_key(plan_of(library, alpha="ALL_B", base_alpha=0))[TEXT_KEY].alpha == 0.0
    assert by_key(plan_of(library, alpha="all_b@depth"))[TEXT_KEY].alpha == 1.0
    # β: the preset's BASE over the mode's default (0), base_beta over both
    triple = {"mode": "triple_sum", "model_c": "sd1-c", "alpha": 0}
    assert by_key(plan_of(library, beta="ALL_B", **triple))[VAE_KEY].beta == 1.0
    assert by_key(plan_of(library, beta="ALL_B", base_beta=0.3, **triple))[VAE_KEY].beta == 0.3
    assert by_key(plan_of(library, beta="IN00-OUT11:0.4", **triple))[VAE_KEY].beta == 0.0


def test_elemental_entries_that_supermerger_reads_otherwise_warn(library):
    plan = plan_of(library, alpha=0.5, elemental="OUT05:attn2:0.1, OUT05:ff:0.3, OUT05:NOT attn proj:0.2")
    assert len(plan.warnings) == 1
    warning = plan.warnings[0]
    assert warning.startswith("elemental entry 2 (`OUT05:ff:0.3`) would select other keys in SuperMerger:")
    assert "e.g. `model.diffusion_model.output_blocks.5." in warning and "`ff` occurs in the key" in warning
    # the ratios are mergeprobe's: relative to the block, `ff` selects the feed-forward layers only
    keys = by_key(plan)
    assert keys[U + "output_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight"].alpha == 0.3
    assert keys[U + "output_blocks.5.0.in_layers.0.weight"].alpha == 0.2
    # sdxl: SuperMerger's M00 is sdxl's OUT02
    plan = plan_of(library, model_a="sdxl-a", model_b="sdxl-a", alpha=0.5, elemental_beta="M00:attn2:0.2",
                   mode="triple_sum", model_c="sdxl-a", beta=0.1)  # fmt: skip
    [warning] = plan.warnings
    assert warning.startswith("elemental_beta entry 1 (`M00:attn2:0.2`) would select other keys")
    assert "where this M00 key is IN09" in warning
    assert by_key(plan)[SDXL_MID_K].beta == 0.2


def test_number_alpha_everywhere(library):
    plan = plan_of(library, alpha=0.3)
    assert plan.arch.name == "sd1" and plan.method.name == "weighted_sum"
    assert {k.alpha for k in plan.keys if k.action == "merge"} == {0.3}
    assert by_key(plan)[VAE_KEY].alpha == 0.3  # a number: BASE too


def test_base_alpha_defaults(library):
    spec = "IN00-IN11:0.2, M00:0.5, OUT00-OUT11:0.8"
    assert by_key(plan_of(library, alpha=spec))[VAE_KEY].alpha == 0.0
    assert by_key(plan_of(library, alpha="GRAD_A"))[VAE_KEY].alpha == 0.0
    assert by_key(plan_of(library, alpha=0.35))[TEXT_KEY].alpha == 0.35
    # an explicit base_alpha wins over everything
    assert by_key(plan_of(library, alpha=spec, base_alpha=0.6))[VAE_KEY].alpha == 0.6
    assert by_key(plan_of(library, alpha=0.35, base_alpha=0.6))[TEXT_KEY].alpha == 0.6
    assert by_key(plan_of(library, alpha=[0.7, *LIST_ALPHA], base_alpha=0.6))[TEXT_KEY].alpha == 0.6
    keys = by_key(plan_of(library, alpha="BASE:0.4, _:0.5", base_alpha=0.6))
    assert keys[VAE_KEY].alpha == 0.6 and keys[IN04_TO_K].alpha == 0.5
    assert by_key(plan_of(library, alpha="BASE:0.4, _:0.5"))[VAE_KEY].alpha == 0.4


def test_elemental_overrides_last_and_later_entries_win(library):
    plan = plan_of(
        library,
        alpha="IN04:0.7, _:0.3",
        base_alpha=0.6,
        elemental="IN04:attn2:0.1\nIN04:attn2.to_k:0.2, BASE:first_stage_model:0.05, OUT11::0",
    )
    keys = by_key(plan)
    assert keys[IN04_TO_K].alpha == 0.2  # both IN04 entries match; the later one wins
    assert keys[IN04_TO_Q].alpha == 0.1
    assert keys[IN04_ATTN1_Q].alpha == 0.7  # no entry: the block weight
    assert keys[VAE_KEY].alpha == 0.05  # over base_alpha
    assert keys[TEXT_KEY].alpha == 0.6
    assert keys[FINAL_OUT].alpha == 0.0 and keys[FINAL_OUT].action == "copy_a"  # then the shortcut
    assert keys[OUT11].action == "copy_a"
    assert plan.warnings == []


def test_elemental_beta(library):
    keys = by_key(plan_of(library, mode="triple_sum", model_c="sd1-c", beta=0.2, elemental_beta="M00::0.4"))
    assert keys[MID_Q].beta == 0.4 and keys[IN04_TO_K].beta == 0.2 and keys[VAE_KEY].beta == 0.2
    problem = problem_of(library, elemental_beta="M00::0.4")
    assert problem.field == "elemental_beta"


def test_unmatched_elemental_entry_warns(library):
    plan = plan_of(
        library, alpha=0.5, elemental="IN04:attn2:0.1, OUT11:no_such_element:0.9, M00:NOT attn:0.2"
    )
    assert len(plan.warnings) == 1
    assert "elemental entry 2" in plan.warnings[0] and "no_such_element" in plan.warnings[0]
    assert "matches no key" in plan.warnings[0]


def test_int_tensors_and_position_ids_keep_a_and_one_sided_keys(library, tensors):
    a, b = dict(tensors("sd1-a.safetensors")), dict(tensors("sd1-b.safetensors"))
    a["cond_stage_model.only_a.weight"] = torch.ones(3, dtype=torch.float16)
    a["cond_stage_model.step_counter"] = torch.tensor([1, 2, 3], dtype=torch.int32)
    b["cond_stage_model.only_b.weight"] = torch.full((2, 2), 0.5)
    b["cond_stage_model.step_counter"] = torch.tensor([7, 8, 9], dtype=torch.int32)
    save_model(library, "a-extra.safetensors", a)
    save_model(library, "b-extra.safetensors", b)
    keys = by_key(plan_of(library, model_a="a-extra", model_b="b-extra", alpha=0.5))
    assert (keys[POSITION_IDS].action, keys[POSITION_IDS].dtype) == ("keep_a", "I64")
    assert (keys["cond_stage_model.step_counter"].action, keys["cond_stage_model.step_counter"].dtype) == (
        "keep_a",
        "I32",
    )
    assert keys["cond_stage_model.only_a.weight"].action == "copy_a"
    only_b = keys["cond_stage_model.only_b.weight"]
    assert (only_b.action, only_b.dtype, only_b.shape) == ("copy_b", "F16", (2, 2))
    for kp in (keys[POSITION_IDS], keys["cond_stage_model.only_a.weight"], only_b):
        assert kp.alpha is None and kp.beta is None


def test_alpha_zero_copies_a_and_alpha_one_copies_b(library):
    plan = plan_of(library, alpha=0.0)
    assert {k.action for k in plan.keys} == {"copy_a", "keep_a"}
    plan = plan_of(library, alpha=1.0)
    assert {k.action for k in plan.keys} == {"copy_b", "keep_a"}
    # other methods with α 0 merge (only exact shortcuts are taken)
    assert {k.action for k in plan_of(library, mode="slerp", alpha=0.0).keys} == {"merge", "keep_a"}
    assert {k.action for k in plan_of(library, mode="add_difference", model_c="sd1-c", alpha=0.0).keys} == {
        "copy_a",
        "keep_a",
    }


def test_architecture_mismatch(library):
    problem = problem_of(library, model_b="sdxl-a")
    assert (problem.slug, problem.field) == ("architecture-mismatch", "model_b")
    assert "model_b is sdxl" in problem.detail
    problem = problem_of(library, model_a="sdxl-a")
    assert (problem.slug, problem.field) == ("architecture-mismatch", "model_b")
    problem = problem_of(library, mode="add_difference", model_c="sdxl-a")
    assert (problem.slug, problem.field) == ("architecture-mismatch", "model_c")


def test_shape_mismatch_names_the_key(library, tensors):
    b = dict(tensors("sd1-b.safetensors"))
    b[IN04_TO_K] = b[IN04_TO_K].reshape(32, 64)
    save_model(library, "b-reshaped.safetensors", b)
    problem = problem_of(library, model_b="b-reshaped")
    assert (problem.slug, problem.field) == ("shape-mismatch", "model_b")
    assert IN04_TO_K in problem.detail and "[64, 32]" in problem.detail and "[32, 64]" in problem.detail
    problem = problem_of(library, mode="add_difference", model_c="b-reshaped")
    assert (problem.slug, problem.field) == ("shape-mismatch", "model_c")
    assert IN04_TO_K in problem.detail


def inpainting_variant(a: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A's tensors with a 9-channel conv_in (an inpainting model): A's 4 channels + 5 new ones."""
    variant = dict(a)
    extra = torch.randn(32, 5, 3, 3, generator=torch.Generator().manual_seed(9)).to(a[CONV_IN].dtype)
    variant[CONV_IN] = torch.cat([a[CONV_IN], extra], dim=1)
    return variant


def test_conv_in_channel_mismatch_needs_the_inpainting_model_in_a(library, tensors):
    save_model(library, "a-inpaint.safetensors", inpainting_variant(tensors("sd1-a.safetensors")))
    kp = by_key(plan_of(library, model_a="a-inpaint"))[CONV_IN]
    assert (kp.action, kp.shape) == ("merge", (32, 9, 3, 3))
    # the other way round B's extra channels would be lost (SuperMerger refuses it too)
    problem = problem_of(library, model_b="a-inpaint")
    assert (problem.slug, problem.field) == ("inpainting-model-not-a", "model_b")
    assert "reads 9 input channels" in problem.detail and "in model_a" in problem.detail
    problem = problem_of(library, mode="add_difference", model_c="a-inpaint")
    assert (problem.slug, problem.field) == ("inpainting-model-not-a", "model_c")


def test_prune_drops_keys_outside_the_sd_prefixes(library, tensors):
    a, b = dict(tensors("sd1-a.safetensors")), dict(tensors("sd1-b.safetensors"))
    for state in (a, b):
        state["model_ema.foo"] = torch.zeros(4, dtype=torch.float16)
        state["model_ema.decay"] = torch.tensor(0.999)
    save_model(library, "a-ema.safetensors", a)
    save_model(library, "b-ema.safetensors", b)
    kept = by_key(plan_of(library, model_a="a-ema", model_b="b-ema"))
    assert kept["model_ema.foo"].block == "BASE" and kept["model_ema.foo"].action == "merge"
    pruned = by_key(plan_of(library, model_a="a-ema", model_b="b-ema", output={"prune": True}))
    assert set(kept) - set(pruned) == {"model_ema.foo", "model_ema.decay"}
    assert all(k.startswith((U, "first_stage_model.", "cond_stage_model.")) for k in pruned)


def test_bake_vae_full_checkpoint_and_standalone(library, tensors):
    plan = plan_of(library, output={"bake_vae": "sd1-c32"})
    assert plan.paths["vae"].name == "sd1-c32.ckpt"
    for kp in plan.keys:
        if kp.key.startswith("first_stage_model."):
            assert (kp.action, kp.alpha, kp.dtype) == ("copy_vae", None, "F16"), kp.key
        else:
            assert kp.action in ("merge", "keep_a"), kp.key
    # a standalone VAE: keys without the first_stage_model. prefix, here in fp32
    c = tensors("sd1-c.safetensors")
    vae = {
        k.removeprefix("first_stage_model."): v.float()
        for k, v in c.items()
        if k.startswith("first_stage_model.")
    }
    save_model(library, "vae-c.safetensors", vae)
    keys = by_key(plan_of(library, output={"bake_vae": "vae-c", "dtype": "keep"}))
    vae_plans = [kp for kp in keys.values() if kp.key.startswith("first_stage_model.")]
    assert len(vae_plans) == len(vae)
    assert {(kp.action, kp.dtype) for kp in vae_plans} == {("copy_vae", "F32")}
    assert keys[TEXT_KEY].dtype == "F16"
    # no VAE keys at all
    save_model(library, "not-a-vae.safetensors", {"foo.weight": torch.zeros(2)})
    problem = problem_of(library, output={"bake_vae": "not-a-vae"})
    assert (problem.slug, problem.field) == ("not-a-vae", "output.bake_vae")


def test_missing_beta_and_model_c(library):
    for mode in ("triple_sum", "sum_twice"):
        problem = problem_of(library, mode=mode, model_c="sd1-c")
        assert (problem.slug, problem.field) == ("missing-beta", "beta")
    for mode in ("ties", "dare", "ties_sd_mecha", "dare_sd_mecha"):
        assert problem_of(library, mode=mode).field == "beta"
    for mode in ("add_difference", "triple_sum", "train_difference"):
        assert problem_of(library, mode=mode, beta=0.5).field == "model_c"
    assert problem_of(library, model_c="sd1-c").field == "model_c"  # weighted_sum uses no C
    assert problem_of(library, beta=0.5).field == "beta"  # weighted_sum uses no β
    assert problem_of(library, mode="dare", beta=1.0).slug == "invalid-beta"
    # ties and dare take an optional C, in both conventions
    for mode in ("ties", "dare", "ties_sd_mecha", "dare_sd_mecha"):
        assert "c" in plan_of(library, mode=mode, model_c="sd1-c", beta=0.5).paths
    assert problem_of(library, mode="slerp_sd_mecha", model_c="sd1-c").field == "model_c"
    # sd-mecha's dropout takes probability 1: every key is A's, copied
    keys = plan_of(library, mode="dare_sd_mecha", model_c="sd1-c", beta=1.0).keys
    assert {k.action for k in keys} <= {"copy_a", "keep_a"}


def test_scaled_sum_beta_defaults(library):
    keys = by_key(plan_of(library, mode="scaled_sum", alpha=0.25))
    assert keys[IN04_TO_K].beta is None and keys[VAE_KEY].beta is None  # 1 − α in the method
    keys = by_key(plan_of(library, mode="scaled_sum", alpha=0.25, beta="M00:0.75, _:1"))
    assert keys[MID_Q].beta == 0.75 and keys[IN04_TO_K].beta == 1.0 and keys[VAE_KEY].beta is None


def test_scaled_sum_base_beta_only_leaves_unet_beta_default(library):
    keys = by_key(plan_of(library, mode="scaled_sum", alpha=0.25, base_beta=1.0))
    assert keys[VAE_KEY].beta == 1.0
    assert keys[IN04_TO_K].beta is None  # actual: 0.0 → result 0·A + 0.25·B


def test_unknown_mode_is_a_validation_error():
    with pytest.raises(ValidationError) as info:
        MergeRequest.model_validate({"model_a": "a", "model_b": "b", "mode": "average"})
    assert info.value.errors()[0]["loc"] == ("mode",)


# ========================================================================================== engine


def test_weighted_sum_per_block_fp32_fp16_bf16(library, tensors):
    a, b = tensors("sd1-a.safetensors"), tensors("sd1-b.safetensors")
    ref = weighted_reference(a, b, LIST_ALPHA, base=0.25)
    outs = {}
    for dtype in ("fp32", "fp16", "bf16"):
        req = request(
            alpha=LIST_ALPHA, base_alpha=0.25, output={"dtype": dtype, "name": f"ws-{dtype}.safetensors"}
        )
        _, path, _, _ = run_merge(library, req)
        outs[dtype] = load_file(path)
        assert set(outs[dtype]) == set(a)
        assert torch.equal(outs[dtype][POSITION_IDS], a[POSITION_IDS])
    floats = [k for k, v in ref.items() if v.is_floating_point()]
    assert len(floats) == len(ref) - 1
    expected = flat(ref, floats)
    out32, out16, out_bf16 = (flat(outs[d], floats) for d in ("fp32", "fp16", "bf16"))
    assert (out32.dtype, out16.dtype, out_bf16.dtype) == (torch.float32, torch.float16, torch.bfloat16)
    close = (out32 - expected).abs() <= 1e-6 + 1e-6 * expected.abs()
    assert first_failing_key(close, floats, ref) is None
    assert first_failing_key(within_ulp(out16, expected, torch.float16), floats, ref) is None
    assert first_failing_key(within_ulp(out_bf16, expected, torch.bfloat16), floats, ref) is None
    # each lower precision is the fp32 result rounded
    assert torch.equal(out16, out32.half()) and torch.equal(out_bf16, out32.bfloat16())
    # IN00 has α 0: copied from A bit for bit
    assert torch.equal(outs["fp16"][CONV_IN], a[CONV_IN]) and torch.equal(
        outs["fp16"][TIME_EMBED], a[TIME_EMBED]
    )


def test_add_difference_with_a_ckpt_c(library, tensors):
    a, b, c = tensors("sd1-a.safetensors"), tensors("sd1-b.safetensors"), tensors("sd1-c32.ckpt")
    req = request(mode="add_difference", model_c="sd1-c32", alpha=0.7, output={"dtype": "fp32"})
    _, path, _, _ = run_merge(library, req)
    out = load_file(path)
    assert set(out) == set(a) and torch.equal(out[POSITION_IDS], a[POSITION_IDS])
    floats = [k for k, v in a.items() if v.is_floating_point()]
    ref = {k: a[k].float() + 0.7 * (b[k].float() - c[k].float()) for k in floats}
    expected, actual = flat(ref, floats), flat(out, floats)
    assert actual.dtype == torch.float32
    assert first_failing_key((actual - expected).abs() <= 1e-6 + 1e-6 * expected.abs(), floats, ref) is None


def test_ties_and_slerp_whole_tensors(library, tensors, monkeypatch):
    a, b, c = tensors("sd1-a.safetensors"), tensors("sd1-b.safetensors"), tensors("sd1-c.safetensors")
    # A chunk size far below the tensor sizes: non-elementwise methods must still see whole tensors.
    monkeypatch.setattr(merge_executor, "CHUNK_ELEMENTS", 1000)
    req = request(mode="ties", model_c="sd1-c", alpha="M00:0.9, _:0.6", beta=0.3, output={"dtype": "fp32"})
    plan, path, _, _ = run_merge(library, req)
    out = load_file(path)
    ties = MERGE_METHODS["ties"].fn
    for kp in plan.keys:
        if kp.action == "merge":
            expected = ties(a[kp.key].float(), b[kp.key].float(), c[kp.key].float(), kp.alpha, 0.3, None)
            assert torch.equal(out[kp.key], expected), kp.key
    assert by_key(plan)[MID_Q].alpha == 0.9

    req = request(mode="slerp", alpha=0.3, output={"dtype": "fp32"})
    _, path, _, _ = run_merge(library, req)
    out = load_file(path)
    for key in (OUT00, IN04_TO_K, MID_Q, VAE_KEY, TEXT_KEY):
        va, vb = a[key].double().flatten(), b[key].double().flatten()
        omega = torch.arccos((va @ vb) / (va.norm() * vb.norm()))
        expected = (torch.sin(0.7 * omega) * va + torch.sin(0.3 * omega) * vb) / torch.sin(omega)
        torch.testing.assert_close(out[key].double().flatten(), expected, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("mode", ["ties_sd_mecha", "dare_sd_mecha", "slerp_sd_mecha"])
def test_sd_mecha_modes_in_the_engine(library, tensors, monkeypatch, mode):
    """Each key is the method on the key's inputs, in the executor's ranges (whole tensors for
    ties and slerp, seeded chunks for dare), and shows its sd-mecha convention at full scale."""
    a, b, c = tensors("sd1-a.safetensors"), tensors("sd1-b.safetensors"), tensors("sd1-c.safetensors")
    monkeypatch.setattr(merge_executor, "CHUNK_ELEMENTS", 1000)  # far below the tensor sizes
    method = MERGE_METHODS[mode]
    fields = {"mode": mode, "alpha": "M00:0.9, _:0.6", "seed": 11, "output": {"dtype": "fp32"}}
    if method.accepts("c"):
        # ties: sd-mecha's default k = 1 (no trim), so the sign vote alone decides below
        fields |= {"model_c": "sd1-c", "beta": 1.0 if mode == "ties_sd_mecha" else 0.3}
    plan, path, _, _ = run_merge(library, request(**fields))
    out = load_file(path)
    merged = [kp for kp in plan.keys if kp.action == "merge"]
    assert len(merged) > 100 and by_key(plan)[MID_Q].alpha == 0.9
    chunked = 0
    for kp in merged:
        flat_a, flat_b = a[kp.key].float().flatten(), b[kp.key].float().flatten()
        flat_c = c[kp.key].float().flatten() if method.accepts("c") else None
        ranges = merge_executor.chunk_ranges(method, kp.key, flat_a.numel(), plan.arch.conv_in)
        chunked += len(ranges) > 1
        expected = torch.cat(
            [
                method.fn(
                    flat_a[start:stop].clone(),
                    flat_b[start:stop].clone(),
                    None if flat_c is None else flat_c[start:stop].clone(),
                    kp.alpha,
                    kp.beta,
                    merge_executor.chunk_rng(11, kp.key, start),
                )
                for start, stop in ranges
            ]
        )
        result = out[kp.key].flatten()
        assert torch.equal(result, expected), kp.key
        if mode == "ties_sd_mecha":  # one vote per model: where B and C pull apart, A stays
            opposite = (flat_b - flat_a) * (flat_c - flat_a) < 0
            assert torch.equal(result[opposite], flat_a[opposite]), kp.key
        if mode == "slerp_sd_mecha":  # on the interpolated norm
            norm = (1 - kp.alpha) * flat_a.norm() + kp.alpha * flat_b.norm()
            torch.testing.assert_close(result.norm(), norm, rtol=1e-5, atol=1e-6, msg=kp.key)
    # dare draws per chunk; ties and slerp must see whole tensors
    assert (chunked > 0) == method.elementwise


def test_keep_dtype(library, tensors):
    # A is the fp32 .ckpt, B an fp16 safetensors file: `keep` keeps A's dtypes
    a, b = tensors("sd1-c32.ckpt"), tensors("sd1-b.safetensors")
    req = request(model_a="sd1-c32", alpha=0.5, output={"dtype": "keep"})
    _, path, _, _ = run_merge(library, req)
    out = load_file(path)
    assert {v.dtype for v in out.values()} == {torch.float32, torch.int64}
    assert out[POSITION_IDS].dtype == torch.int64
    torch.testing.assert_close(out[OUT00], 0.5 * a[OUT00] + 0.5 * b[OUT00].float(), rtol=1e-6, atol=1e-6)
    # A fp16: keep → fp16
    _, path, _, _ = run_merge(
        library, request(alpha=0.5, output={"dtype": "keep", "name": "keep16.safetensors"})
    )
    assert {v.dtype for v in load_file(path).values()} == {torch.float16, torch.int64}


def test_one_sided_and_int_keys_in_the_output(library, tensors):
    a, b = dict(tensors("sd1-a.safetensors")), dict(tensors("sd1-b.safetensors"))
    a["cond_stage_model.only_a.weight"] = torch.ones(3, dtype=torch.float16)
    a["cond_stage_model.step_counter"] = torch.tensor([1, 2, 3], dtype=torch.int32)
    b["cond_stage_model.only_b.weight"] = torch.full((2, 2), 0.3)
    b["cond_stage_model.step_counter"] = torch.tensor([7, 8, 9], dtype=torch.int32)
    a_path = save_model(library, "a-extra.safetensors", a)
    save_model(library, "b-extra.safetensors", b)
    _, path, _, _ = run_merge(library, request(model_a="a-extra", model_b="b-extra", alpha=0.5))
    out = load_file(path)
    assert file_order(path) == file_order(a_path) + ["cond_stage_model.only_b.weight"]
    assert torch.equal(out["cond_stage_model.step_counter"], a["cond_stage_model.step_counter"])
    assert torch.equal(out["cond_stage_model.only_a.weight"], a["cond_stage_model.only_a.weight"])
    assert torch.equal(out["cond_stage_model.only_b.weight"], torch.full((2, 2), 0.3).half())
    assert torch.equal(out[POSITION_IDS], a[POSITION_IDS])


def test_output_header_metadata_and_hash(library, tensors, sources):
    req = request(
        alpha="IN00-IN11:0.25, M00:0.5, OUT00-OUT11:0.75",
        output={"name": "blend.safetensors", "metadata": {"author": "tests"}},
    )
    plan, path, digest, _ = run_merge(library, req)
    header, data_start = read_header(path)
    # tensors in plan order (A's file order), back to back from 0, 8-byte aligned start
    assert file_order(path) == [k.key for k in plan.keys] == file_order(sources["sd1-a.safetensors"])
    assert [k for k in header if k != "__metadata__"] == [k.key for k in plan.keys]
    assert data_start % 8 == 0
    position = 0
    for kp in plan.keys:
        entry = header[kp.key]
        assert (entry["dtype"], tuple(entry["shape"])) == (kp.dtype, kp.shape)
        assert entry["data_offsets"][0] == position
        position = entry["data_offsets"][1]
    raw = path.read_bytes()
    assert position == len(raw) - data_start
    assert set(load_file(path)) == set(tensors("sd1-a.safetensors"))

    meta = header["__metadata__"]
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format"] == "pt" and meta["author"] == "tests"
    assert digest == hashlib.sha256(raw[data_start:]).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + digest
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "blend"
    assert meta["modelspec.merged_from"] == "sd1-a.safetensors, sd1-b.safetensors"
    assert meta["modelspec.date"] == datetime.now(UTC).date().isoformat()
    assert meta["modelspec.implementation"].startswith("https://")

    sha = {n: sha256_of(library.root / n) for n in ("sd1-a.safetensors", "sd1-b.safetensors")}
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["type"] == "mergeprobe" and recipe["arch"] == "sd1"
    assert recipe["request"] == req.model_dump(mode="json")
    assert recipe["models"] == {
        "a": {"name": "sd1-a.safetensors", "sha256": sha["sd1-a.safetensors"]},
        "b": {"name": "sd1-b.safetensors", "sha256": sha["sd1-b.safetensors"]},
    }
    lineage = json.loads(meta["sd_merge_models"])
    assert lineage == {
        sha[n]: {"name": n, "legacy_hash": legacy_hash_of(library.root / n), "sd_merge_models": {}}
        for n in sha
    }

    # merge the merge: its entry carries its own parents
    req2 = request(model_a="blend", model_b="sd1-c", alpha=0.5, output={"name": "blend2.safetensors"})
    _, path2, digest2, _ = run_merge(library, req2)
    header2, start2 = read_header(path2)
    meta2 = header2["__metadata__"]
    assert meta2["modelspec.hash_sha256"] == "0x" + digest2
    assert digest2 == hashlib.sha256(path2.read_bytes()[start2:]).hexdigest()
    lineage2 = json.loads(meta2["sd_merge_models"])
    blend_sha = sha256_of(path)
    assert set(lineage2) == {blend_sha, sha256_of(library.root / "sd1-c.safetensors")}
    assert lineage2[blend_sha]["name"] == "blend.safetensors"
    assert lineage2[blend_sha]["legacy_hash"] == legacy_hash_of(path)
    assert lineage2[blend_sha]["sd_merge_models"] == lineage
    assert json.loads(meta2["sd_merge_recipe"])["models"]["a"] == {
        "name": "blend.safetensors",
        "sha256": blend_sha,
    }


def test_chunked_weighted_sum_is_byte_identical(library, monkeypatch, tmp_path):
    req = request(alpha=LIST_ALPHA, output={"dtype": "fp32", "name": "chunks.safetensors"})
    plan, whole, digest, metadata = run_merge(library, req, tmp_path / "whole.safetensors")
    executor = merge_executor.PlanExecutor(plan, {}, torch.device("cpu"), seed=0)
    assert len(list(stream_merge_module._tasks(executor))) == len(plan.keys)
    monkeypatch.setattr(merge_executor, "CHUNK_ELEMENTS", 1000)
    assert len(list(stream_merge_module._tasks(executor))) > 3 * len(plan.keys)
    _, chunked, digest_chunked, _ = run_merge(
        library, req, tmp_path / "chunked.safetensors", metadata=metadata
    )
    assert digest_chunked == digest
    assert chunked.read_bytes() == whole.read_bytes()


def test_chunked_dare_is_seeded(library, monkeypatch, tmp_path, tensors):
    monkeypatch.setattr(merge_executor, "CHUNK_ELEMENTS", 1000)
    a, b = tensors("sd1-a.safetensors"), tensors("sd1-b.safetensors")
    runs = {}
    for label, seed in (("first", 7), ("again", 7), ("other", 8)):
        req = request(
            mode="dare", alpha=0.5, beta=0.5, seed=seed, output={"dtype": "fp32", "name": "dare.safetensors"}
        )
        runs[label] = run_merge(library, req, tmp_path / f"{label}.safetensors", metadata={"format": "pt"})[1]
    assert runs["first"].read_bytes() == runs["again"].read_bytes()
    assert runs["first"].read_bytes() != runs["other"].read_bytes()
    # α = β = 0.5: every element is A (dropped) or A + (B − A) = B (kept), about half of each
    out = load_file(runs["first"])
    kept = total = 0
    for key in (OUT00, IN04_TO_K, VAE_KEY):
        va, vb = a[key].float(), b[key].float()
        is_b = (out[key] - vb).abs() <= 1e-6
        assert ((out[key] - va).abs() <= 1e-6)[~is_b].all(), key
        kept, total = kept + int(is_b.sum()), total + is_b.numel()
    assert 0.45 < kept / total < 0.55


def test_cancel_propagates(library):
    class Cancelled(Exception):
        pass

    calls = []

    def check_cancel():
        calls.append(1)
        if len(calls) > 20:
            raise Cancelled

    done = []
    with pytest.raises(Cancelled):
        run_merge(
            library, request(alpha=0.5), check_cancel=check_cancel, progress=lambda d, t: done.append(d)
        )
    assert len(calls) == 21
    assert max(done, default=0) <= 20


def test_progress_reaches_the_total(library, monkeypatch):
    monkeypatch.setattr(merge_executor, "CHUNK_ELEMENTS", 10_000)
    seen = []
    plan, _, _, _ = run_merge(library, request(alpha=0.5), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(plan.keys), len(plan.keys))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(seen) == len(plan.keys)  # once per key, not per chunk


def test_conv_in_nine_channels_with_four(library, tensors, monkeypatch):
    monkeypatch.setattr(merge_executor, "CHUNK_ELEMENTS", 1000)  # conv_in (2 592 elements) stays whole
    a9 = inpainting_variant(tensors("sd1-a.safetensors"))
    b = tensors("sd1-b.safetensors")
    save_model(library, "a-inpaint.safetensors", a9)
    _, path, _, _ = run_merge(library, request(model_a="a-inpaint", alpha=0.5, output={"dtype": "fp32"}))
    conv = load_file(path)[CONV_IN]
    assert conv.shape == (32, 9, 3, 3)
    torch.testing.assert_close(conv[:, :4], 0.5 * a9[CONV_IN][:, :4].float() + 0.5 * b[CONV_IN].float())
    assert torch.equal(conv[:, 4:], a9[CONV_IN][:, 4:].float())  # A's other 5 channels exactly


def test_conv_in_nine_channels_alpha_one(library, tensors):
    a9 = inpainting_variant(tensors("sd1-a.safetensors"))
    b = tensors("sd1-b.safetensors")
    save_model(library, "a-inpaint.safetensors", a9)
    _, path, _, _ = run_merge(
        library, request(model_a="a-inpaint", alpha="IN00:1, _:0.5", output={"dtype": "fp16"})
    )
    out = load_file(path)  # actual: SafetensorError (incomplete metadata, file not fully covered)
    assert torch.equal(out[CONV_IN][:, :4], b[CONV_IN])
    assert torch.equal(out[CONV_IN][:, 4:], a9[CONV_IN][:, 4:])


@pytest.mark.parametrize("mode", ["ties", "dare", "ties_sd_mecha", "dare_sd_mecha"])
def test_optional_model_c_missing_a_key(library, tensors, mode):
    c = dict(tensors("sd1-c.safetensors"))
    del c[FINAL_OUT]
    save_model(library, "c-partial.safetensors", c)
    req = request(mode=mode, model_c="c-partial", alpha=0.5, beta=0.5, output={"dtype": "fp32"})
    _, path, _, _ = run_merge(library, req)  # actual: KeyError: 'model.diffusion_model.out.2.weight'
    assert FINAL_OUT in load_file(path)


def test_bake_vae_in_the_output(library, tensors):
    c32 = tensors("sd1-c32.ckpt")
    _, path, _, _ = run_merge(library, request(alpha=0.5, output={"bake_vae": "sd1-c32", "dtype": "fp16"}))
    out = load_file(path)
    vae_keys = [k for k in out if k.startswith("first_stage_model.")]
    assert vae_keys
    for key in vae_keys:
        assert torch.equal(out[key], c32[key].half()), key
    # standalone fp16 VAE, fp16 output: the bytes as they are
    c = tensors("sd1-c.safetensors")
    save_model(library, "vae-c.safetensors", {k.removeprefix("first_stage_model."): c[k] for k in vae_keys})
    _, path, _, _ = run_merge(
        library, request(alpha=0.5, output={"bake_vae": "vae-c", "name": "baked2.safetensors"})
    )
    out = load_file(path)
    for key in vae_keys:
        assert torch.equal(out[key], c[key]), key
