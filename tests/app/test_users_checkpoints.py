"""Users' own checkpoints through the API: the detected variant, refusals at upload and at
submission (4xx naming the field and the reason, never a queued job that fails later), and the
prediction-type override."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from tests.app.test_api_inputs import assert_problem, tree
from tests.checkpoints.test_variants import UNET, derive, with_spread
from tests.conftest import install_model


def upload(client, path, name=None):
    return client.post("/v1/models", params={"name": name or path.name}, content=path.read_bytes())


def test_uploads_no_job_could_use_are_refused(service, client, tiny_models, tmp_path):
    before = tree(service.data_dir)
    source = load_file(tiny_models["sd1"])
    cases = []
    for dtype, name in ((torch.complex64, "C64"), (torch.uint16, "U16")):
        odd = dict(source)
        odd["cond_stage_model.extra"] = torch.zeros(4, dtype=dtype)
        save_file(odd, tmp_path / f"{name}.safetensors")
        cases.append((tmp_path / f"{name}.safetensors", "unsupported-dtype", name))
    save_file({}, tmp_path / "empty.safetensors")
    cases.append((tmp_path / "empty.safetensors", "no-tensors", "no tensors"))
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    cases.append((tmp_path / "lora.safetensors", "unknown-architecture", "match none of sd1, sd2, sdxl"))
    label = load_file(tiny_models["sdxl"])[UNET + "label_emb.0.0.weight"]
    refiner = derive(
        tiny_models["sdxl"],
        tmp_path / "refiner.safetensors",
        add={UNET + "label_emb.0.0.weight": torch.zeros(label.shape[0], 2560, dtype=label.dtype)},
    )
    cases.append((refiner, "unsupported-architecture", "SDXL refiner"))
    for path, slug, words in cases:
        body = assert_problem(upload(client, path), 400, "body")
        assert body["type"].endswith(slug) and words in body["detail"] and path.name in body["detail"], body
    assert tree(service.data_dir) == before  # nothing stored, no temp file left


def test_model_info_says_the_variant(service, client, tiny_models, tmp_path):
    vpred = derive(
        tiny_models["sdxl"],
        tmp_path / "xl-v.safetensors",
        add={"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)},
    )
    assert upload(client, vpred).status_code == 201
    variant = client.get("/v1/models/xl-v").json()["variant"]
    assert variant["name"] == "sdxl-v" and variant["prediction_type"] == "v_prediction"
    assert variant["zero_terminal_snr"] is True and variant["resolution"] == 1024
    listed = {m["id"]: m for m in client.get("/v1/models").json()["models"]}
    assert listed["xl-v"]["variant"] == variant


def test_probes_of_models_no_pipeline_can_run_are_refused_at_submission(
    service, client, tiny_models, tmp_path
):
    conv = load_file(tiny_models["sd1"])[UNET + "input_blocks.0.0.weight"]
    inpaint = torch.zeros(conv.shape[0], 9, *conv.shape[2:], dtype=conv.dtype)
    install_model(
        service,
        derive(
            tiny_models["sd1"],
            tmp_path / "inpaint.safetensors",
            add={UNET + "input_blocks.0.0.weight": inpaint},
        ),
    )
    install_model(
        service, derive(tiny_models["sd1"], tmp_path / "pruned.safetensors", drop=("first_stage_model.",))
    )
    install_model(
        service, derive(tiny_models["sd1"], tmp_path / "holed.safetensors", drop=(UNET + "middle_block.",))
    )
    install_model(service, tiny_models["sd1"])
    dump = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}
    cases = [
        ("inpaint", "unsupported-variant", "inpainting model"),
        ("pruned", "unsupported-variant", "no VAE"),
        ("holed", "missing-tensors", "M00"),
    ]
    for model, slug, words in cases:
        body = assert_problem(client.post("/v1/jobs/dump", json={**dump, "model": model}), 400, "model")
        assert body["type"].endswith(slug) and words in body["detail"] and model in body["detail"], body
        sweep = {
            "model_a": model,
            "variants": {"blocks": "IN00", "alpha": 0, "beta": 0.5},
            "prompt": "a cat",
            "seeds": [1],
            "steps": 2,
            "width": 64,
            "height": 64,
        }
        body = assert_problem(client.post("/v1/jobs/sweep", json=sweep), 400, "model_a")
        assert body["type"].endswith(slug), body
    body = assert_problem(
        client.post("/v1/jobs/dump", json={**dump, "model": "tiny-sd1-a", "prediction_type": "x"}),
        422,
        "prediction_type",
    )
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was queued


def test_sd2_statistic_reaches_the_dry_run_of_a_dump(service, client, tiny_models, tmp_path):
    """The dump's inputs carry the scheduler variant decided at submission; a request overrides it."""
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.probing.dump_request import DumpRequest, prepare_dump

    install_model(
        service,
        derive(tiny_models["sd2"], tmp_path / "sd2v.safetensors", add=with_spread(tiny_models["sd2"], 0.2)),
    )
    library = ModelLibrary(service.settings())
    inputs = prepare_dump(DumpRequest(model="sd2v", prompt="a"), library)
    assert inputs.pipeline.prediction_type == "v_prediction" and "ComfyUI" in inputs.pipeline.source
    forced = prepare_dump(DumpRequest(model="sd2v", prompt="a", prediction_type="epsilon"), library)
    assert forced.pipeline.prediction_type == "epsilon" and forced.pipeline.source.startswith("the request")
