"""sweep jobs on the tiny models, through the API and a real worker."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from PIL import Image

from tests.conftest import install_model, run_succeeding, shared_worker_client
from worker.probing.sweep_render import label_cell, u_geometry, u_layout, xy_geometry

SD1_BLOCKS = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
SMALL = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def sweep_client(redis_url, tmp_path_factory, tiny_models):
    with shared_worker_client(redis_url, tmp_path_factory, [tiny_models["sd1"], tiny_models["sd1-b"]]) as c:
        yield c


def _image(client, job, name) -> Image.Image:
    return Image.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/artifacts/{name}").content)).convert("RGB")


def test_layer_influence_study_u_grid(sweep_client):
    client = sweep_client
    job = run_succeeding(
        client,
        "sweep",
        {
            "model_a": "tiny-sd1-a",
            "variants": {"blocks": "IN00-OUT11", "alpha": 0, "beta": 0.75},
            "seeds": [1, 2],
            **SMALL,
        },
    )
    names = {a["name"] for a in job["artifacts"]}
    pngs = [n for n in names if n.endswith(".png") and not n.startswith(("diff_", "grid"))]
    assert len(pngs) == (25 + 1) * 2
    assert {f"flip_{b}_s{s}.gif" for b in SD1_BLOCKS for s in (1, 2)} <= names
    rows = list(csv.DictReader(io.StringIO(client.get(f"/v1/jobs/{job['id']}/artifacts/influence.csv").text)))
    assert len(rows) == 25 * 2 and {r["variant"] for r in rows} == set(SD1_BLOCKS)
    assert all(0 <= float(r["changed_share"]) <= 1 and float(r["ssim"]) <= 1 for r in rows)
    ranking = job["result"]["ranking"]
    assert len(ranking) == 25
    result = job["result"]
    assert 0 < result["seconds_switching"] and 0 < result["seconds_generating"]
    assert result["seconds_switching"] + result["seconds_generating"] <= result["seconds"]
    assert [r["changed_share"] for r in ranking] == sorted(
        (r["changed_share"] for r in ranking), reverse=True
    )

    # Each block's cell sits where the study puts it: IN down the left, M00 at the bottom, OUT up the right.
    grid = _image(client, job, "grid.png")
    cells = {
        b: label_cell([_image(client, job, f"{b}_s{s}.png") for s in (1, 2)], b)
        for b in ("IN00", "M00", "OUT11")
    }
    geometry = u_geometry(SD1_BLOCKS, cells["IN00"].size)
    assert grid.size == (geometry.width, geometry.height)
    layout = u_layout(SD1_BLOCKS)
    assert layout["IN00"] == (0, 0) and layout["M00"][0] == 12 and layout["OUT11"] == (0, 2)
    for block, cell in cells.items():
        row, col = layout[block]
        x, y = geometry.origin(row, col)
        assert grid.crop((x, y, x + cell.width, y + cell.height)).tobytes() == cell.tobytes(), block


def test_variant_that_changes_nothing_is_the_baseline(sweep_client):
    client = sweep_client
    job = run_succeeding(
        client,
        "sweep",
        {
            "model_a": "tiny-sd1-a",
            "variants": {"blocks": "IN04, M00, OUT11", "alpha": 0, "beta": 1},
            "seeds": [3],
            **SMALL,
        },
    )
    baseline = _image(client, job, "baseline_s3.png").tobytes()
    for block in ("IN04", "M00", "OUT11"):
        assert _image(client, job, f"{block}_s3.png").tobytes() == baseline
    assert all(
        r["changed_share"] == 0 and r["mean_abs_diff"] == 0 and r["ssim"] == 1.0
        for r in job["result"]["rows"]
    )


def test_xy_sweep_grid_is_2_by_3(sweep_client):
    client = sweep_client
    body = {
        "model_a": "tiny-sd1-a",
        "model_b": "tiny-sd1-b",
        "alpha": 0.5,
        "base_alpha": 0,
        "variants": {
            "x": {"kind": "alpha", "values": [0.25, 0.75]},
            "y": {"kind": "seed", "values": [1, 2, 3]},
        },
        **SMALL,
    }
    job = run_succeeding(client, "sweep", body)
    assert len(job["result"]["variants"]) == 6
    grid = _image(client, job, "grid.png")
    cell = label_cell([_image(client, job, "x1_y2_s3.png")], "alpha=0.75 | seed=3")
    geometry = xy_geometry(
        cell.size,
        ["alpha=0.25", "alpha=0.75"],
        ["seed=1", "seed=2", "seed=3"],
        x_title="alpha",
        y_title="seed",
    )
    assert (geometry.rows, geometry.cols) == (3, 2) and grid.size == (geometry.width, geometry.height)


def test_per_element_sweep_rows(sweep_client):
    client = sweep_client
    body = {
        "model_a": "tiny-sd1-a",
        "model_b": "tiny-sd1-b",
        "alpha": 0.5,
        "variants": {"elements": ["OUT05:attn2:0", "IN04::1"]},
        "seeds": [1],
        **SMALL,
    }
    job = run_succeeding(client, "sweep", body)
    assert [r["label"] for r in job["result"]["rows"]] == ["OUT05:attn2:0", "IN04::1"]
    assert all(r["mean_abs_diff"] > 0 and r["ssim"] < 1 for r in job["result"]["rows"])


def test_sweep_validation(client, service, tiny_models):
    install_model(service, tiny_models["sd1"])
    base = {"model_a": "tiny-sd1-a", **SMALL}
    only_base = client.post(
        "/v1/jobs/sweep", json={**base, "variants": {"elements": ["BASE:first_stage_model:0"]}}
    )
    assert only_base.status_code == 400 and only_base.json()["field"] == "variants.elements[0]"
    same_axes = client.post(
        "/v1/jobs/sweep",
        json={
            **base,
            "variants": {"x": {"kind": "seed", "values": [1]}, "y": {"kind": "seed", "values": [2]}},
        },
    )
    assert same_axes.status_code == 400 and same_axes.json()["field"] == "variants.y.kind"
    bad_blocks = client.post("/v1/jobs/sweep", json={**base, "variants": {"blocks": "IN00-OUT99"}})
    assert bad_blocks.status_code == 400 and bad_blocks.json()["field"] == "variants.blocks"
    needs_c = client.post(
        "/v1/jobs/sweep", json={**base, "variants": {"blocks": "IN00", "mode": "add_difference"}}
    )
    assert needs_c.status_code == 400 and needs_c.json()["field"] == "variants.mode"


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
        return torch.tensor(list(image.getdata()), dtype=torch.int16)

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
