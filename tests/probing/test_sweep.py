"""sweep jobs on the tiny models, through the API and a real worker."""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image

from tests.conftest import install_model, run_succeeding, shared_worker_client
from worker.probing.sweep_render import Cell, render_cells, u_geometry, u_layout, xy_geometry

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

    # Each block's cell sits where the study puts it: IN down the left, M00 at the bottom, OUT up the
    # right; it shows the block, its seeds and its changed share (the ranking's), the baseline's its seeds.
    grid = _image(client, job, "grid.png")
    changed = {r["variant"]: r["changed_share"] for r in ranking}
    shown = {
        b: Cell(tuple(_image(client, job, f"{b}_s{s}.png") for s in (1, 2)), b, (1, 2), changed[b])
        for b in SD1_BLOCKS
    }
    shown["baseline"] = Cell(
        tuple(_image(client, job, f"baseline_s{s}.png") for s in (1, 2)), "baseline", (1, 2)
    )
    cells = render_cells(shown)
    geometry = u_geometry(SD1_BLOCKS, cells["IN00"].size)
    assert grid.size == (geometry.width, geometry.height)
    layout = u_layout(SD1_BLOCKS)
    assert layout["IN00"] == (0, 0) and layout["M00"][0] == 12 and layout["OUT11"] == (0, 2)
    for block in ("IN00", "M00", "OUT11", "baseline"):
        cell = cells[block]
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
    changed = {r["variant"]: r["changed_share"] for r in job["result"]["ranking"]}
    shown = Cell((_image(client, job, "x1_y2_s3.png"),), "", (3,), changed["x1_y2"])
    cell = render_cells({"x1_y2": shown})["x1_y2"]
    geometry = xy_geometry(
        cell.size,
        ["alpha=0.25", "alpha=0.75"],
        ["seed=1", "seed=2", "seed=3"],
        x_title="alpha",
        y_title="seed",
    )
    assert (geometry.rows, geometry.cols) == (3, 2) and grid.size == (geometry.width, geometry.height)
    x, y = geometry.origin(2, 1)
    assert grid.crop((x, y, x + cell.width, y + cell.height)).tobytes() == cell.tobytes()


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


def test_a_lora_study_through_the_worker(sweep_client, tiny_models, tmp_path):
    """LoRA variants through the API and a worker process: the LoRA switched off on one block each,
    its match in the result; the job record round trip keeps the variants' strengths."""
    from tests.probing.test_lora_probing import write_style_lora

    client = sweep_client
    lora, modules = write_style_lora(tiny_models["sd1"], tmp_path / "probe-style.safetensors")
    uploaded = client.post("/v1/models", params={"name": lora.name}, content=lora.read_bytes())
    assert uploaded.status_code == 201, uploaded.text
    job = run_succeeding(
        client,
        "sweep",
        {
            "model_a": "tiny-sd1-a",
            "loras": [{"model": "probe-style", "strength": 0.7}],
            "variants": {"lora": 0, "blocks": "IN00, M00, OUT11"},
            "seeds": [1],
            **SMALL,
        },
    )
    result = job["result"]
    assert result["variants"] == ["IN00", "M00", "OUT11"] and len(result["ranking"]) == 3
    assert result["loras"][0]["matched"] == len(modules) and result["loras"][0]["strengths"]["M00"] == 0.7
    assert all(r["mean_abs_diff"] > 0 for r in result["rows"])
    baseline = _image(client, job, "baseline_s1.png").tobytes()
    assert all(_image(client, job, f"{b}_s1.png").tobytes() != baseline for b in ("IN00", "M00", "OUT11"))
