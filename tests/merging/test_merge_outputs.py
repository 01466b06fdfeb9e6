"""Merge outputs the ecosystem accepts: buffers as model A has them, modelspec keys from model A's
variant, a bounded lineage, no file left by a failed job, refusals of inputs a result cannot be
made from, and outputs of every architecture loading in diffusers' single-file loader.

Real tiny checkpoints, merged by the merge engine in-process (``JobContext.local``: the request is
prepared as the API prepares it), read back with safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergeprobe.checkpoints.library import ModelLibrary
from mergeprobe.merging import merge_metadata as merge_metadata_module
from mergeprobe.merging.merge_metadata import DROPPED, LINEAGE_GENERATIONS, capped_lineage
from mergeprobe.merging.merge_plan import MergeRequest, plan_merge
from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.kinds import KINDS
from mergeprobe.service.problems import problem_of
from mergeprobe.service.settings import Settings
from tests.checkpoints.test_variants import derive
from worker.checkpoints.tiny_models import tiny_config_dir, write_tiny_checkpoint
from worker.context import JobContext
from worker.engines.merge import run_merge

U = "model.diffusion_model."
CONV_IN = U + "input_blocks.0.0.weight"
IN04_TO_K = U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
MID_Q = U + "middle_block.1.transformer_blocks.0.attn1.to_q.weight"
POSITION_IDS = {
    "sd1": ["cond_stage_model.transformer.text_model.embeddings.position_ids"],
    "sd2": [],  # OpenCLIP keeps no position ids
    "sdxl": ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"],
}
LOGIT_SCALE = {
    "sd1": [],
    "sd2": ["cond_stage_model.model.logit_scale"],
    "sdxl": ["conditioner.embedders.1.model.logit_scale"],
}
TEXT_Q = {
    "sd1": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    "sdxl": "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
}
RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024"}


def schedule_buffers(seed: int) -> dict[str, torch.Tensor]:
    """An LDM checkpoint's schedule buffers and EMA bookkeeping (fp32, as the released files hold
    them), with values that differ per seed so that merging them would show."""
    betas = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64) * (1 + seed / 100)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    state = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "posterior_variance": betas * 0.5,
        "model_ema.decay": torch.tensor(0.999 - seed / 1000, dtype=torch.float64),
    }
    state = {k: v.float() for k, v in state.items()}
    state["model_ema.num_updates"] = torch.tensor(1000 * seed, dtype=torch.int32)
    return state


@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory) -> Path:
    """{arch}-a (tiny-{arch}-a with schedule buffers), {arch}-b for every architecture, sd1-c;
    written once per module."""
    root = tmp_path_factory.mktemp("merge-output-sources")
    for arch in ("sd1", "sd2", "sdxl"):
        derive(tiny_models[arch], root / f"{arch}-a.safetensors", add=schedule_buffers(1))
    os.link(tiny_models["sd1-b"], root / "sd1-b.safetensors")
    for arch in ("sd2", "sdxl"):
        write_tiny_checkpoint(arch, root / f"{arch}-b.safetensors", seed=2, dtype="fp16")
    write_tiny_checkpoint("sd1", root / "sd1-c.safetensors", seed=3, dtype="fp16")
    return root


@pytest.fixture
def library(tmp_path, sources) -> ModelLibrary:
    """A library of its own per test, holding the sources (hard links)."""
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    for source in sources.iterdir():
        os.link(source, models / source.name)
    return ModelLibrary(Settings(data_dir=tmp_path / "data", models_dir=models))


def merge(library: ModelLibrary, **fields) -> tuple[dict, Path, JobContext]:
    """Run a merge job in-process; → (result, output path, context)."""
    fields.setdefault("model_a", "sd1-a")
    fields.setdefault("model_b", "sd1-b")
    request = MergeRequest.model_validate(fields)
    ctx = JobContext.local(KINDS["merge"], request, settings=library.settings, library=library)
    result = run_merge(ctx)
    return result, library.root / result["model"]["name"], ctx


def refusal(library: ModelLibrary, **fields):
    """The problem plan_merge's domain error shows the client (merge jobs, dry runs and sweeps plan
    alike)."""
    fields.setdefault("model_a", "sd1-a")
    fields.setdefault("model_b", "sd1-b")
    with pytest.raises(MergeprobeError) as caught:
        plan_merge(MergeRequest.model_validate(fields), library)
    problem = problem_of(caught.value)
    assert problem.status == 400
    return problem


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as fh:
        return fh.metadata()


def leftovers(library: ModelLibrary) -> list[str]:
    return sorted(p.name for p in library.root.iterdir() if p.name.startswith(".partial-"))


# ========================================================================================= buffers


def test_buffers_come_from_a_unmerged_with_a_reason(library, tiny_models):
    a = {**schedule_buffers(1), "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    derive(tiny_models["sd1"], library.root / "v-a.safetensors", add=a)
    derive(  # B: other values for every buffer, its own EDM marker A lacks
        tiny_models["sd1-b"],
        library.root / "v-b.safetensors",
        add={**schedule_buffers(2), "v_pred": torch.tensor([]), "edm_mean": torch.ones(1, 4, 1, 1)},
    )
    plan = plan_merge(MergeRequest(model_a="v-a", model_b="v-b", alpha=0.5), library)
    keys = {k.key: k for k in plan.keys}
    buffers = [*a, *POSITION_IDS["sd1"]]
    for key in buffers:
        kp = keys[key]
        assert (kp.action, kp.alpha, kp.beta) == ("keep_a", None, None), key
        assert kp.reason and kp.to_json()["reason"] == kp.reason, key
    assert keys["betas"].dtype == "F32"  # A's dtype, not the fp16 output's
    assert "v_pred" in keys["v_pred"].reason and "int64" in keys[POSITION_IDS["sd1"][0]].reason
    assert "EMA" in keys["model_ema.num_updates"].reason
    assert "edm_mean" not in keys  # a buffer only B has is not written: A's prediction type stays
    assert any("edm_mean" in w and "model_b" in w for w in plan.warnings)
    assert all(k.reason is None for k in plan.keys if k.action != "keep_a")

    result, path, _ = merge(library, model_a="v-a", model_b="v-b", alpha=0.5, output={"dtype": "fp16"})
    assert result["actions"]["keep_a"] == len(buffers)
    out, source = load_file(path), load_file(library.root / "v-a.safetensors")
    assert "edm_mean" not in out
    for key in buffers:
        assert out[key].dtype == source[key].dtype and torch.equal(out[key], source[key]), key
    assert out[POSITION_IDS["sd1"][0]].dtype == torch.int64
    assert out[POSITION_IDS["sd1"][0]].tolist() == [list(range(77))]
    meta = metadata_of(path)
    assert (meta["modelspec.prediction_type"], meta["modelspec.resolution"]) == ("v", "512x512")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"

    # pruned: the prediction markers stay (loaders read them), schedule and EMA buffers go
    pruned = plan_merge(
        MergeRequest(model_a="v-a", model_b="v-b", output={"prune": True, "name": "p.safetensors"}), library
    )
    pruned_keys = {k.key for k in pruned.keys}
    assert {"v_pred", "ztsnr"} <= pruned_keys and not pruned_keys & set(schedule_buffers(1))


def test_a_float_position_ids_stay_as_a_has_them(library, tiny_models):
    ids = POSITION_IDS["sd1"][0]
    derive(tiny_models["sd1"], library.root / "f-a.safetensors", add={ids: torch.arange(77.0)[None]})
    kp = {k.key: k for k in plan_merge(MergeRequest(model_a="f-a", model_b="sd1-b"), library).keys}[ids]
    assert (kp.action, kp.dtype) == ("keep_a", "F32")  # not cast to the fp16 output, not merged with B's


@pytest.mark.parametrize(
    ("arch", "architecture", "resolution"),
    [
        ("sd2", "stable-diffusion-v2-768-v", "768x768"),
        # sd-scripts has no v id for sdxl: the base id, and "v" in prediction_type
        ("sdxl", "stable-diffusion-xl-v1-base", "1024x1024"),
    ],
)
def test_modelspec_of_a_v_prediction_model_a(library, tiny_models, arch, architecture, resolution):
    derive(tiny_models[arch], library.root / f"{arch}-v.safetensors", add={"v_pred": torch.tensor([])})
    _, path, ctx = merge(library, model_a=f"{arch}-v", model_b=f"{arch}-b")
    meta = metadata_of(path)
    assert meta["modelspec.architecture"] == architecture
    assert (meta["modelspec.prediction_type"], meta["modelspec.resolution"]) == ("v", resolution)
    assert any("model_b is epsilon and model_a v_prediction" in w for w in ctx.warnings)


# ======================================================================================== refusals


def test_an_input_missing_unet_tensors_is_refused(library, tiny_models):
    derive(tiny_models["sd1-b"], library.root / "no-out03.safetensors", drop=(U + "output_blocks.3.",))
    problem = refusal(library, model_b="no-out03")
    assert (problem.slug, problem.field) == ("missing-tensors", "model_b")
    assert "OUT03" in problem.detail
    problem = refusal(library, mode="add_difference", model_c="no-out03")
    assert (problem.slug, problem.field) == ("missing-tensors", "model_c")


def test_inputs_without_a_component_model_a_has(library, tiny_models):
    derive(tiny_models["sd1-b"], library.root / "b-no-vae.safetensors", drop=("first_stage_model.",))
    derive(tiny_models["sd1-b"], library.root / "b-no-text.safetensors", drop=("cond_stage_model.",))
    # α 0.5 everywhere asks for B's VAE in the mix: refused, not silently A's
    problem = refusal(library, model_b="b-no-vae", alpha=0.5)
    assert (problem.slug, problem.field) == ("missing-component", "model_b")
    assert "no VAE" in problem.detail and "base_alpha" in problem.detail
    problem = refusal(library, model_b="b-no-text", alpha=0.5)
    assert (problem.field, "no text encoder" in problem.detail) == ("model_b", True)
    # BASE at 0 keeps A's on purpose; a baked VAE replaces it
    plan = plan_merge(MergeRequest(model_a="sd1-a", model_b="b-no-vae", alpha=0.5, base_alpha=0), library)
    assert {k.action for k in plan.keys if k.key.startswith("first_stage_model.")} == {"copy_a"}
    plan_merge(
        MergeRequest(model_a="sd1-a", model_b="b-no-vae", alpha=0.5, output={"bake_vae": "sd1-c"}), library
    )
    # model_c of add_difference likewise
    problem = refusal(library, mode="add_difference", model_c="b-no-text", alpha=0.5)
    assert problem.field == "model_c"
    plan_merge(
        MergeRequest(
            model_a="sd1-a", model_b="sd1-b", model_c="b-no-text", mode="add_difference", base_alpha=0
        ),
        library,
    )


def test_model_a_without_a_component_the_others_have(library, tiny_models):
    derive(tiny_models["sd1"], library.root / "a-no-vae.safetensors", drop=("first_stage_model.",))
    problem = refusal(library, model_a="a-no-vae", alpha=0.5, base_alpha=0)
    assert (problem.slug, problem.field) == ("missing-component", "model_a")
    assert "model_b's VAE whole" in problem.detail and "bake_vae" in problem.detail
    # weighted_sum at BASE α 1 is exactly B's VAE: what the request asks
    plan = plan_merge(MergeRequest(model_a="a-no-vae", model_b="sd1-b", alpha=0.5, base_alpha=1), library)
    assert {k.action for k in plan.keys if k.key.startswith("first_stage_model.")} == {"copy_b"}


def test_inpainting_directions_through_the_api(client, service, tiny_models):
    """The refusal reaches a dry run as a 400 problem naming the field; A = inpainting merges."""
    from tests.conftest import install_model

    state = load_file(tiny_models["sd1"])
    extra = torch.randn(32, 5, 3, 3, generator=torch.Generator().manual_seed(9)).half()
    inpaint = {CONV_IN: torch.cat([state[CONV_IN], extra], dim=1)}
    derive(tiny_models["sd1"], service.models_dir / "inpaint.safetensors", add=inpaint)
    install_model(service, tiny_models["sd1-b"])
    refused = client.post("/v1/plans/merge", json={"model_a": "tiny-sd1-b", "model_b": "inpaint"})
    assert refused.status_code == 400, refused.text
    problem = refused.json()
    assert (problem["field"], problem["type"].rsplit("/", 1)[-1]) == ("model_b", "inpainting-model-not-a")
    assert "Put the inpainting model in model_a" in problem["detail"]
    fine = client.post("/v1/plans/merge", json={"model_a": "inpaint", "model_b": "tiny-sd1-b"})
    assert fine.status_code == 200, fine.text
    conv = next(k for k in fine.json()["keys"] if k["key"] == CONV_IN)
    assert conv["action"] == "merge"
    buffer = next(k for k in fine.json()["keys"] if k["key"] == POSITION_IDS["sd1"][0])
    assert buffer["action"] == "keep_a" and "int64" in buffer["reason"]


# ========================================================================================= lineage


def full_count(lineage_of: dict[str, list[str]], name: str) -> int:
    """Entries an uncapped nested lineage of `name` holds: each input, and its own, recursively."""
    return sum(1 + full_count(lineage_of, parent) for parent in lineage_of.get(name, []))


def kept_and_dropped(lineage: dict, depth: int = 1) -> tuple[int, int, int]:
    """(entries kept, entries counted as dropped, deepest kept generation)."""
    kept = dropped = 0
    deepest = depth if lineage else depth - 1
    for entry in lineage.values():
        kept += 1
        dropped += entry.get(DROPPED, {}).get("models", 0)
        sub_kept, sub_dropped, sub_deepest = kept_and_dropped(entry["sd_merge_models"], depth + 1)
        kept, dropped, deepest = kept + sub_kept, dropped + sub_dropped, max(deepest, sub_deepest)
    return kept, dropped, deepest


def test_a_chain_of_three_input_merges_keeps_the_lineage_bounded(library):
    """Each merge is add_difference of the three previous outputs: uncapped, its nested lineage
    grows ~1.84× a merge (21 such merges made a 173 MB header)."""
    names = ["sd1-a", "sd1-b", "sd1-c"]
    parents: dict[str, list[str]] = {}
    sizes = []
    for step in range(8):
        a, b, c = names[-3:]
        name = f"chain{step}"
        _, path, _ = merge(
            library,
            model_a=a,
            model_b=b,
            model_c=c,
            mode="add_difference",
            alpha=0.3,
            output={"name": name + ".safetensors"},
        )
        names.append(name)
        parents[name] = [a, b, c]
        text = metadata_of(path)["sd_merge_models"]
        sizes.append(len(text))
        kept, dropped, deepest = kept_and_dropped(json.loads(text))
        assert kept + dropped == full_count(parents, name), step  # nothing lost without a count
        assert deepest == min(LINEAGE_GENERATIONS, step + 1), step
        assert kept <= 3 + 9 + 27 + 81, step  # LINEAGE_GENERATIONS of three inputs each
    assert full_count(parents, "chain7") == 288  # what nesting every lineage would hold
    assert max(sizes) <= merge_metadata_module.LINEAGE_MAX_BYTES


def test_lineage_byte_cap_keeps_fewer_generations(monkeypatch):
    def tree(depth: int, tag: str) -> dict:
        if depth == 0:
            return {}
        return {
            f"{tag}{i}": {
                "name": "n" * 180 + f"{tag}{i}",
                "legacy_hash": "0",
                "sd_merge_models": tree(depth - 1, f"{tag}{i}."),
            }
            for i in range(4)
        }

    lineage = tree(6, "m")  # 4 + 16 + 64 + 256 entries in the first four generations: > 64 KiB
    capped = json.loads(capped_lineage(lineage))
    kept, dropped, deepest = kept_and_dropped(capped)
    assert deepest == LINEAGE_GENERATIONS - 1 and kept == 4 + 16 + 64
    assert kept + dropped == sum(4**d for d in range(1, 7))
    assert len(capped_lineage(lineage).encode()) <= merge_metadata_module.LINEAGE_MAX_BYTES
    assert next(iter(next(iter(capped.values()))["sd_merge_models"].values()))  # nested, not flat
    # a lineage already capped by an earlier merge adds its counts to the new ones
    again = json.loads(capped_lineage({"x": {"name": "x", "legacy_hash": "0", "sd_merge_models": capped}}))
    kept2, dropped2, _ = kept_and_dropped(again)
    assert kept2 + dropped2 == 1 + kept + dropped


# ================================================================================ no file left behind


def test_a_header_readers_refuse_is_never_written(library):
    huge = {"note": "x" * 100_000_001}  # over safetensors' 100 000 000-byte header limit
    with pytest.raises(MergeprobeError) as caught:
        merge(library, alpha=0.5, output={"name": "huge.safetensors", "metadata": huge})
    assert caught.value.slug == "output-header-too-large"
    assert problem_of(caught.value).status == 413
    assert not (library.root / "huge.safetensors").exists() and leftovers(library) == []


def test_a_job_failing_after_commit_leaves_no_model(library, monkeypatch):
    def broken_hash_cache(self, path, sha256, legacy):
        raise OSError("disk went away")

    # The step after the file took its final name.
    monkeypatch.setattr(ModelLibrary, "_store_hashes", broken_hash_cache)
    with pytest.raises(OSError):
        merge(library, alpha=0.5, output={"name": "gone.safetensors"})
    assert not (library.root / "gone.safetensors").exists() and leftovers(library) == []


# =================================================================================== loads in diffusers


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_merge_outputs_load_in_diffusers(library, arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    result, path, _ = merge(
        library,
        model_a=f"{arch}-a",
        model_b=f"{arch}-b",
        alpha="IN00-IN05:0.2, M00:0.5, _:0.7",
        base_alpha=0.3,
        output={"dtype": "fp16"},
    )
    out, a = load_file(path), load_file(library.root / f"{arch}-a.safetensors")
    buffers = [*schedule_buffers(1), *POSITION_IDS[arch], *LOGIT_SCALE[arch]]
    assert result["actions"]["keep_a"] == len(buffers)
    for key in buffers:
        assert out[key].dtype == a[key].dtype and torch.equal(out[key], a[key]), key
    for key in POSITION_IDS[arch]:
        assert out[key].dtype == torch.int64 and out[key].tolist() == [list(range(77))]
    meta = metadata_of(path)
    assert (meta["modelspec.prediction_type"], meta["modelspec.resolution"]) == ("epsilon", RESOLUTION[arch])

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(tiny_config_dir(arch)), local_files_only=True)
    unet = pipe.unet.state_dict()
    for diffusers_key, key in (
        ("conv_in.weight", CONV_IN),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", IN04_TO_K),
        ("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", MID_Q),
    ):
        assert torch.equal(unet[diffusers_key].float(), out[key].float()), key
    # the text encoder's first query (state-dict names differ between transformers versions: by
    # suffix; OpenCLIP's fused in_proj holds it as its first third)
    q_proj = [
        v
        for k, v in pipe.text_encoder.state_dict().items()
        if k.endswith("encoder.layers.0.self_attn.q_proj.weight")
    ]
    expected = out[TEXT_Q[arch]]
    expected = expected[: expected.shape[0] // 3] if arch == "sd2" else expected
    assert len(q_proj) == 1 and torch.equal(q_proj[0].float(), expected.float())
