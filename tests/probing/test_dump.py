"""dump jobs on the tiny models: block features, cross-attention, per-block prompts."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from tests.conftest import install_model, run_succeeding, shared_worker_client

SD1_BLOCKS = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]


def _expected_sd1_shapes(height: int, width: int) -> dict[str, tuple[int, int, int]]:
    """(channels, h, w) of every sd1 block output of the tiny U-Net (block_out_channels
    32, 64, 64, 64), derived from the LDM topology: 2 layers per level, a stride-2
    downsampler after levels 1–3 (sizes round up), the mirror on the way up with an
    upsampler closing OUT02, OUT05 and OUT08."""
    channels = [32, 64, 64, 64]
    sizes = [(height // 8, width // 8)]
    for _ in range(3):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    shapes = {"IN00": (32, *sizes[0])}
    index = 1
    for level in range(4):
        for _ in range(2):
            shapes[f"IN{index:02d}"] = (channels[level], *sizes[level])
            index += 1
        if level < 3:
            shapes[f"IN{index:02d}"] = (channels[level], *sizes[level + 1])
            index += 1
    shapes["M00"] = (64, *sizes[3])
    for up in range(4):
        level = 3 - up
        for j in range(3):
            size = sizes[level - 1] if (j == 2 and level > 0) else sizes[level]
            shapes[f"OUT{3 * up + j:02d}"] = (channels[level], *size)
    return shapes


@pytest.fixture(scope="module")
def dump_client(redis_url, tmp_path_factory, tiny_models):
    with shared_worker_client(redis_url, tmp_path_factory, [tiny_models["sd1"], tiny_models["sdxl"]]) as c:
        yield c


def _tensors(client, job):
    return load_safetensors(client.get(f"/v1/jobs/{job['id']}/artifacts/tensors.safetensors").content)


def test_features_and_attention_non_square(dump_client):
    client = dump_client
    body = {
        "model": "tiny-sd1-a",
        "prompt": "a cute girl",
        "steps": 3,
        "width": 64,
        "height": 96,
        "features": {"layers": "IN00-OUT11(+2)", "steps": "1,3", "save_tensors": True},
        "attention": {"layers": "M00, OUT05", "steps": "2", "save_tensors": True},
    }
    job = run_succeeding(client, "dump", body)
    tensors = _tensors(client, job)
    expected = _expected_sd1_shapes(96, 64)
    selected = SD1_BLOCKS[0:12:2] + ["M00"] + SD1_BLOCKS[14::2]
    assert selected == [
        "IN00",
        "IN02",
        "IN04",
        "IN06",
        "IN08",
        "IN10",
        "M00",
        "OUT01",
        "OUT03",
        "OUT05",
        "OUT07",
        "OUT09",
        "OUT11",
    ]
    feature_keys = {k for k in tensors if k.startswith("features/")}
    assert feature_keys == {
        f"features/{b}/step{s:03d}/{h}" for b in selected for s in (1, 3) for h in ("uncond", "cond")
    }
    for block in selected:
        assert tuple(tensors[f"features/{block}/step003/cond"].shape) == (1, *expected[block]), block
    # Attention rows are probabilities over the 77 tokens.
    # OUT05's attention runs before its upsampler, at the size of its level (OUT04's output).
    for block, level_of in (("M00", "M00"), ("OUT05", "OUT04")):
        maps = tensors[f"attention/{block}/step002/cond/t0"]
        c, h, w = expected[level_of]
        assert maps.shape[0] == 1 and maps.shape[2:] == (h, w, 77)
        torch.testing.assert_close(maps.sum(dim=-1), torch.ones(maps.shape[:-1]), rtol=0, atol=1e-5)

    names = {a["name"] for a in job["artifacts"]}
    assert {"image_0.png", "manifest.json", "tensors.safetensors", "attention_M00_step002.png"} <= names
    assert "features_OUT11_step003_cond.png" in names and "features_OUT11_step002_cond.png" not in names
    image = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/artifacts/image_0.png").content))
    assert image.size == (64, 96)
    manifest = client.get(f"/v1/jobs/{job['id']}/artifacts/manifest.json").json()
    kinds = {entry["kind"] for entry in manifest["artifacts"]}
    assert kinds == {"features", "attention", "token_heatmap", "image", "tensors"}
    entry = next(e for e in manifest["artifacts"] if e["name"] == "features_M00_step001_uncond.png")
    assert (entry["block"], entry["step"], entry["half"]) == ("M00", 1, "uncond")
    metadata = json.loads(_safetensors_metadata(client, job)["mergeprobe"])
    assert metadata["halves"] == ["uncond", "cond"] and metadata["features"]["steps"] == [1, 3]


def _safetensors_metadata(client, job) -> dict:
    raw = client.get(f"/v1/jobs/{job['id']}/artifacts/tensors.safetensors").content
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size])["__metadata__"]


def test_per_block_prompt_changes_m00_only_until_it_feeds_back(dump_client):
    client = dump_client
    body = {
        "model": "tiny-sd1-a",
        "prompt": "a cute girl (~: M00: excellent :~)",
        "steps": 2,
        "width": 64,
        "height": 64,
        "features": {"layers": "IN00-OUT11", "save_tensors": True},
        "layer_prompt_diff": True,
    }
    job = run_succeeding(client, "dump", body)
    prompts = job["result"]["prompts"]
    assert prompts["M00"] == "a cute girl excellent"
    assert all(prompts[b] == "a cute girl " for b in SD1_BLOCKS if b != "M00")
    diffs = {k: v for k, v in _tensors(client, job).items() if k.startswith("diff/")}
    # At the first step every block before M00 sees the same latent and the same text: equal.
    for block in SD1_BLOCKS[:12]:
        assert torch.count_nonzero(diffs[f"diff/{block}/step001/cond"]) == 0, block
    assert diffs["diff/M00/step001/cond"].abs().max() > 0
    assert diffs["diff/OUT00/step001/cond"].abs().max() > 0
    assert any(a["name"] == "diff_M00_step001_cond.png" for a in job["artifacts"])


def test_empty_groups_give_exactly_zero_difference(dump_client):
    client = dump_client
    body = {
        "model": "tiny-sd1-a",
        "prompt": "a (~: M00: :~) girl",
        "negative_prompt": "ugly (~: _: :~)",
        "steps": 2,
        "width": 64,
        "height": 64,
        "features": {"layers": "IN01, M00, OUT11", "save_tensors": True},
        "layer_prompt_diff": True,
    }
    job = run_succeeding(client, "dump", body)
    diffs = {k: v for k, v in _tensors(client, job).items() if k.startswith("diff/")}
    assert len(diffs) == 3 * 2 * 2
    assert all(torch.count_nonzero(v) == 0 for v in diffs.values())


def test_sdxl_dump(dump_client):
    client = dump_client
    body = {
        "model": "tiny-sdxl-a",
        "prompt": "a (~: OUT00-OUT05: cute; _: plain :~) cat",
        "steps": 2,
        "sampler": "dpmpp_2m_karras",
        "width": 64,
        "height": 64,
        "features": {"layers": "IN00-OUT08", "steps": "2", "save_tensors": True},
        "attention": {"layers": "IN04-OUT05", "save_tensors": True},
    }
    job = run_succeeding(client, "dump", body)
    tensors = _tensors(client, job)
    assert {k.split("/")[1] for k in tensors if k.startswith("features/")} == {
        *(f"IN{i:02d}" for i in range(9)),
        "M00",
        *(f"OUT{i:02d}" for i in range(9)),
    }
    assert (
        job["result"]["prompts"]["OUT03"] == "a cute cat"
        and job["result"]["prompts"]["IN04"] == "a plain cat"
    )
    # IN07 and IN08 hold two transformers each in the tiny sdxl, like the 10 of the real one.
    assert "attention/IN07/step001/cond/t1" in tensors


@pytest.mark.parametrize("sampler", ["euler_a", "euler", "dpmpp_2m", "ddim"])
def test_samplers_generate(dump_client, sampler):
    client = dump_client
    job = run_succeeding(
        client,
        "dump",
        {"model": "tiny-sd1-a", "prompt": "a cat", "steps": 2, "width": 64, "height": 64, "sampler": sampler},
    )
    assert job["result"]["images"] == ["image_0.png"] and job["progress"]["completed"] == 2


def test_bad_inputs_are_400s(client, service, tiny_models):
    install_model(service, tiny_models["sd1"])
    base = {"model": "tiny-sd1-a", "prompt": "a cat", "steps": 4}
    bad_expr = client.post(
        "/v1/jobs/dump",
        json={**base, "features": {"colorize": {"method": "custom", "h": "__import__('os')"}}},
    )
    assert bad_expr.status_code == 400 and bad_expr.headers["content-type"] == "application/problem+json"
    assert bad_expr.json()["field"] == "features.colorize.h" and bad_expr.json()["position"] == 0
    bad_layers = client.post("/v1/jobs/dump", json={**base, "features": {"layers": "IN00-IN99"}})
    assert bad_layers.status_code == 400 and bad_layers.json()["field"] == "features.layers"
    bad_step = client.post("/v1/jobs/dump", json={**base, "features": {"steps": "1,9"}})
    assert bad_step.status_code == 400 and bad_step.json()["field"] == "features.steps"
    bad_size = client.post("/v1/jobs/dump", json={**base, "width": 500})
    assert bad_size.status_code == 422 and bad_size.json()["field"] == "width"


def test_cached_pipeline_after_a_failed_job_matches_a_fresh_one(service, tiny_models, monkeypatch):
    """In-process, with the real engine and no queue: a job canceled mid-generation leaves the
    cached pipeline unpatched, so the next image equals one from a freshly loaded pipeline."""
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.probing.dump_request import DumpRequest
    from mergeprobe.service.artifacts import ArtifactStore
    from mergeprobe.service.kinds import KINDS
    from worker import engines
    from worker.context import JobCanceled, JobContext, LocalReporter
    from worker.engines import dump as dump_engine
    from worker.probing import generation

    install_model(service, tiny_models["sd1"])
    for key, value in service.env.items():
        if key.startswith(("MERGEPROBE_", "REDIS_URL")):
            monkeypatch.setenv(key, value)
    settings = service.settings()
    library = ModelLibrary(settings)
    artifacts = ArtifactStore(settings)
    monkeypatch.setattr(generation, "_cache", None)
    assert engines is not None

    def run(body, cancel=False):
        reporter = LocalReporter()
        if cancel:
            reporter.cancel()
        ctx = JobContext.local(
            KINDS["dump"],
            DumpRequest.model_validate(body),
            settings=settings,
            library=library,
            artifacts=artifacts,
            reporter=reporter,
        )
        result = dump_engine.run_dump(ctx)
        return artifacts.path_of(ctx.job_id, result["images"][0]).read_bytes(), result

    probe_everything = {
        "model": "tiny-sd1-a",
        "prompt": "a (~: M00: excellent :~) cat",
        "steps": 3,
        "width": 64,
        "height": 64,
        "features": {"save_tensors": True},
        "attention": {"save_tensors": True},
    }
    plain = {"model": "tiny-sd1-a", "prompt": "a cat", "steps": 3, "width": 64, "height": 64}
    with pytest.raises(JobCanceled):
        run(probe_everything, cancel=True)
    cached_image, cached_result = run(plain)
    assert cached_result["pipeline_cached"] is True
    monkeypatch.setattr(generation, "_cache", None)
    fresh_image, fresh_result = run(plain)
    assert fresh_result["pipeline_cached"] is False
    assert cached_image == fresh_image


def test_a_dump_with_a_lora_through_the_worker(dump_client, tiny_models, tmp_path):
    """A LoRA in a dump through the API and a worker process: reported, and the image it gives
    differs from the model's own, which the next dump without it gives again."""
    from tests.probing.test_lora_probing import write_style_lora

    client = dump_client
    lora, modules = write_style_lora(tiny_models["sd1"], tmp_path / "dump-style.safetensors")
    uploaded = client.post("/v1/models", params={"name": lora.name}, content=lora.read_bytes())
    assert uploaded.status_code == 201, uploaded.text
    body = {"model": "tiny-sd1-a", "prompt": "a cat", "steps": 1, "width": 64, "height": 64}

    def image(job):
        return client.get(f"/v1/jobs/{job['id']}/artifacts/image_0.png").content

    plain = run_succeeding(client, "dump", body)
    styled = run_succeeding(client, "dump", {**body, "loras": [{"model": "dump-style"}]})
    again = run_succeeding(client, "dump", body)
    report = styled["result"]["loras"][0]
    assert report["lora"]["name"] == "dump-style.safetensors" and report["matched"] == len(modules)
    assert report["matched_by_component"]["te"] == 4 and report["unmatched"] == []
    assert image(styled) != image(plain) and image(again) == image(plain)
