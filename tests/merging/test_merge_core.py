"""One merge core: one plan for merges, elemental merges, dry runs and sweep baselines; methods
that carry their own rules; a method added in one place works everywhere."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergeprobe.checkpoints.library import ModelLibrary
from mergeprobe.merging.merge_methods import MERGE_METHODS, Ratio, merge_method
from mergeprobe.merging.merge_plan import ElementalRequest, MergeRequest, plan_merge
from mergeprobe.probing.sweep_request import SweepRequest, prepare_sweep
from mergeprobe.service.artifacts import ArtifactStore
from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.kinds import KINDS
from mergeprobe.service.settings import Settings
from tests.conftest import REPO, install_model
from worker.checkpoints.tiny_models import write_tiny_checkpoint

RECIPE = {
    "alpha": "IN00-IN05:0.2, M00:0.5, _:0.7",
    "base_alpha": 0.3,
    "elemental": "OUT05:attn2:0.9\nIN04::0",
}


@pytest.fixture(scope="module")
def b_models(tiny_models, tmp_path_factory):
    """tiny-{arch}-b for every architecture, written once per module (the tests only read them)."""
    root = tmp_path_factory.mktemp("b-models")
    paths = {"sd1": tiny_models["sd1-b"]}
    for arch in ("sd2", "sdxl"):
        paths[arch] = write_tiny_checkpoint(arch, root / f"tiny-{arch}-b.safetensors", seed=2, dtype="fp16")
    return paths


@pytest.fixture
def models(service, tiny_models, b_models):
    """tiny-{arch}-a and tiny-{arch}-b for every architecture, in the service's library."""
    for arch in ("sd1", "sd2", "sdxl"):
        install_model(service, tiny_models[arch])
        install_model(service, b_models[arch])
    return ModelLibrary(service.settings())


def _keys(plan) -> list[dict]:
    return [k.to_json() for k in plan.keys]


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_merge_elemental_dry_run_and_sweep_baseline_share_one_plan(client, models, arch):
    fields = {"model_a": f"tiny-{arch}-a", "model_b": f"tiny-{arch}-b", **RECIPE}
    merge = plan_merge(MergeRequest(**fields), models)
    elemental = plan_merge(ElementalRequest(**fields), models)
    dry_run = client.post("/v1/plans/merge", json=fields)
    assert dry_run.status_code == 200, dry_run.text
    sweep_request = SweepRequest(**fields, variants={"blocks": "IN00-IN01"}, prompt="a cat")
    pinned = prepare_sweep(sweep_request, models).models
    sweep = plan_merge(sweep_request.baseline_merge(), models, pinned=pinned)
    assert _keys(merge) == _keys(elemental) == dry_run.json()["keys"] == _keys(sweep)
    assert {k["action"] for k in _keys(merge)} >= {"merge", "copy_a"}  # IN04 at 0 is copied
    assert any(k["alpha"] == 0.9 for k in _keys(merge))  # the elemental entry took part


def test_sweep_baseline_keeps_every_recipe_field(models):
    recipe = {
        "model_a": "tiny-sd1-a",
        "model_b": "tiny-sd1-b",
        "mode": "dare",
        "alpha": 0.6,
        "beta": "IN00-IN05:0.2, _:0.4",
        "base_beta": 0.1,
        "elemental_beta": "OUT01::0.3",
        "seed": 1234,
    }
    sweep = SweepRequest(**recipe, variants={"blocks": "IN00-IN01", "beta": 0.5}, prompt="a cat")
    baseline = sweep.baseline_merge()
    assert baseline == MergeRequest(**recipe)
    plan = plan_merge(baseline, models)
    by_block = {k.block: k for k in plan.keys}
    assert by_block["BASE"].beta == 0.1 and by_block["OUT01"].beta == 0.3 and by_block["IN00"].beta == 0.2


def test_a_dare_variant_with_beta_1_is_refused_like_a_merge(client, models):
    merge = {"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "mode": "dare", "alpha": 0.5, "beta": 0.3}
    refused = client.post("/v1/plans/merge", json={**merge, "beta": 1.0})
    assert refused.status_code == 400 and refused.json()["field"] == "beta"
    sweep = {**merge, "prompt": "a cat", "steps": 1, "width": 64, "height": 64}
    variant = client.post(
        "/v1/jobs/sweep", json={**sweep, "variants": {"blocks": "IN00-IN01", "alpha": 0.3, "beta": 1.0}}
    )
    assert variant.status_code == 400, variant.text
    problem = variant.json()
    assert problem["field"] == "variants.beta" and "[0, 1)" in problem["detail"]
    xy = {"x": {"kind": "beta", "values": [0.5, 1.0]}, "y": {"kind": "seed", "values": [1]}}
    assert client.post("/v1/jobs/sweep", json={**sweep, "variants": xy}).status_code == 400
    fine = {"blocks": "IN00-IN01", "alpha": 0.3, "beta": 0.99}
    assert client.post("/v1/jobs/sweep", json={**sweep, "variants": fine}).status_code == 202


def test_ties_density_must_be_a_share(models):
    request = MergeRequest(model_a="tiny-sd1-a", model_b="tiny-sd1-b", mode="ties", beta=1.5)
    with pytest.raises(MergeprobeError) as caught:
        plan_merge(request, models)
    assert (caught.value.slug, caught.value.field) == ("invalid-beta", "beta")


@pytest.fixture
def throwaway_method():
    """A method registered here only: the test shows nothing else needs to know it."""

    def shortcut(alpha, beta):
        return "copy_a" if alpha == 0.0 else None

    @merge_method(
        "test_towards_b",
        formula="A + α·(B − A)·β (a test's own method)",
        beta=Ratio("how far towards B", low=0.0, high=2.0, required=True),
        shortcut=shortcut,
    )
    def towards_b(a, b, c, alpha, beta, rng):
        return a.add_(b.sub_(a), alpha=alpha * beta)

    yield MERGE_METHODS["test_towards_b"]
    del MERGE_METHODS["test_towards_b"]


def test_a_method_added_in_one_place_works_everywhere(service, client, models, throwaway_method):
    from worker.context import JobContext
    from worker.engines.merge import run_merge
    from worker.engines.sweep import run_sweep

    fields = {"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "mode": "test_towards_b", "beta": 0.5}
    # The API (dry run) and the plan: its ranges and shortcut are the method's own.
    dry_run = client.post("/v1/plans/merge", json={**fields, "alpha": "IN00:0, _:0.8"})
    assert dry_run.status_code == 200, dry_run.text
    actions = {(k["block"], k["action"]) for k in dry_run.json()["keys"]}
    assert ("IN00", "copy_a") in actions and ("IN01", "merge") in actions
    too_far = client.post("/v1/plans/merge", json={**fields, "beta": 3.0})
    assert too_far.status_code == 400 and too_far.json()["field"] == "beta"

    # The merge engine, in-process with a plain context (no Redis).
    settings = service.settings()
    request = MergeRequest(**fields, alpha=0.8, output={"name": "towards.safetensors", "dtype": "fp32"})
    ctx = JobContext.local(KINDS["merge"], request, settings=settings, library=models)
    result = run_merge(ctx)
    assert result["mode"] == "test_towards_b"
    out = load_file(service.models_dir / "towards.safetensors")
    a = load_file(service.models_dir / "tiny-sd1-a.safetensors")
    b = load_file(service.models_dir / "tiny-sd1-b.safetensors")
    key = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"
    expected = a[key].float() + (b[key].float() - a[key].float()) * 0.4
    torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6)

    # The sweep: as the baseline's method and as a variant's.
    sweep = SweepRequest(
        model_a="tiny-sd1-a",
        model_b="tiny-sd1-b",
        mode="test_towards_b",
        alpha=0.5,
        beta=1.0,
        variants={"blocks": "IN04, OUT05", "alpha": 1.0, "beta": 2.0, "mode": "test_towards_b"},
        prompt="a cat",
        seeds=[1],
        steps=1,
        width=64,
        height=64,
    )
    ctx = JobContext.local(
        KINDS["sweep"], sweep, settings=settings, library=models, artifacts=ArtifactStore(settings)
    )
    swept = run_sweep(ctx)
    assert swept["variants"] == ["IN04", "OUT05"] and len(swept["rows"]) == 2
    assert all(row["mean_abs_diff"] > 0 for row in swept["rows"])  # each variant changed its block


@pytest.mark.parametrize("mode", ["ties_sd_mecha", "dare_sd_mecha", "slerp_sd_mecha"])
def test_sd_mecha_modes_through_the_api_and_a_merge_job(service, client, models, mode):
    """The sd-mecha conventions are modes like any other: listed, validated and merged."""
    from worker.context import JobContext
    from worker.engines.merge import run_merge
    from worker.merging.merge_executor import chunk_rng

    method = MERGE_METHODS[mode]
    modes = client.get("/openapi.json").json()["components"]["schemas"]["MergeRequest"]["properties"]["mode"]
    assert mode in modes["enum"]
    fields = {"model_a": "tiny-sd1-a", "model_b": "tiny-sd1-b", "mode": mode, "alpha": "IN00:0, _:0.8"}
    if method.beta is not None:
        missing = client.post("/v1/plans/merge", json=fields)
        assert missing.status_code == 400 and missing.json()["field"] == "beta"
        fields["beta"] = 0.5
    dry_run = client.post("/v1/plans/merge", json=fields)
    assert dry_run.status_code == 200, dry_run.text
    actions = {(k["block"], k["action"]) for k in dry_run.json()["keys"]}
    at_alpha_0 = "copy_a" if method.shortcut(0.0, fields.get("beta")) else "merge"  # the method's own
    assert ("IN00", at_alpha_0) in actions and ("IN04", "merge") in actions

    request = MergeRequest(**fields, seed=5, output={"name": f"{mode}.safetensors", "dtype": "fp32"})
    ctx = JobContext.local(KINDS["merge"], request, settings=service.settings(), library=models)
    assert run_merge(ctx)["mode"] == mode
    out = load_file(service.models_dir / f"{mode}.safetensors")
    a = load_file(service.models_dir / "tiny-sd1-a.safetensors")
    b = load_file(service.models_dir / "tiny-sd1-b.safetensors")
    key = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"  # small: one range
    flat_a, flat_b = a[key].float().flatten(), b[key].float().flatten()
    expected = method.fn(flat_a.clone(), flat_b, None, 0.8, fields.get("beta"), chunk_rng(5, key, 0))
    assert torch.equal(out[key].flatten(), expected)
    assert not torch.equal(out[key].flatten(), flat_a)


def test_no_method_name_is_compared_outside_the_registry():
    """Code asks a method about itself; only the registry knows names (docs and defaults aside)."""
    import re

    root = REPO
    names = "|".join(MERGE_METHODS)
    compared = re.compile(r"""(==|!=|\bin\b|\bis\b)\s*\(?\s*["'](""" + names + r""")["']""")
    offenders = []
    for folder in ("app", "worker", "mergeprobe"):
        for path in (root / folder).rglob("*.py"):
            if path.name == "merge_methods.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if compared.search(line) or "fn is weighted_sum" in line:
                    offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []


def test_engines_run_in_process_without_redis(tmp_path, tiny_models):
    """A plain context: settings, a library and an artifact store on disk, no Redis anywhere."""
    from worker.context import JobContext, LocalReporter
    from worker.engines.inspect import run_inspect

    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")  # never connected
    settings.ensure_dirs()
    install = settings.models_path / "tiny-sd2-a.safetensors"
    install.write_bytes(tiny_models["sd2"].read_bytes())
    reporter = LocalReporter()
    ctx = JobContext.local(
        KINDS["inspect"],
        KINDS["inspect"].request_model(model="tiny-sd2-a"),
        settings=settings,
        library=ModelLibrary(settings),
        reporter=reporter,
    )
    result = run_inspect(ctx)
    assert result["arch"] == "sd2" and reporter.progress is not None
    assert reporter.progress[0] == reporter.progress[1]
    assert [a["name"] for a in ctx.artifacts] == ["blocks.csv"]
