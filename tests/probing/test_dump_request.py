"""The dump request: schema defaults and limits, and `prepare_dump` against a real (tiny) model library."""

from __future__ import annotations

import os
import shutil

import pytest
from pydantic import ValidationError

from mergeprobe.checkpoints.archs import SD1, SDXL
from mergeprobe.checkpoints.library import ModelLibrary
from mergeprobe.checkpoints.safetensors_layout import build_header
from mergeprobe.probing.dump_request import Capture, DumpRequest, DumpResult, prepare_dump
from mergeprobe.service.errors import MergeprobeError
from mergeprobe.service.problems import Problem
from mergeprobe.service.problems import problem_of as as_problem
from mergeprobe.service.settings import Settings

SD1_ATTENTION = [b for b in SD1.unet_blocks if b not in SD1.textless_blocks]


@pytest.fixture
def library(tmp_path, monkeypatch, tiny_models) -> ModelLibrary:
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    for arch in ("sd1", "sdxl"):
        target = models / tiny_models[arch].name
        try:
            os.link(tiny_models[arch], target)
        except OSError:
            shutil.copyfile(tiny_models[arch], target)
    header, offsets = build_header([("something.else.weight", "F16", (2, 2))], {})
    size = max(end for _, end in offsets.values())
    (models / "not-sd.safetensors").write_bytes(header + bytes(size))
    monkeypatch.setenv("MERGEPROBE_DATA_DIR", str(tmp_path / "data"))
    return ModelLibrary(Settings())


def dump(library: ModelLibrary, **fields) -> dict:
    """The inputs a dump job would carry, as the job record stores them (JSON)."""
    fields.setdefault("model", "tiny-sd1-a")
    fields.setdefault("prompt", "a cute girl")
    return prepare_dump(DumpRequest.model_validate(fields), library).model_dump(mode="json")


def problem_of(library: ModelLibrary, **fields) -> Problem:
    """The problem the client is shown for the domain error the call raises."""
    with pytest.raises(MergeprobeError) as info:
        dump(library, **fields)
    return as_problem(info.value)


def test_pure_python_no_torch():
    import mergeprobe.probing.dump_request as module

    source = open(module.__file__, encoding="utf-8").read()
    assert "import torch" not in source and "from torch" not in source


# --- schema --------------------------------------------------------------------------------------------


def test_defaults():
    r = DumpRequest(model="m", prompt="p")
    assert (r.negative_prompt, r.seed, r.steps, r.sampler, r.cfg_scale) == ("", 0, 20, "euler_a", 7.0)
    assert (r.width, r.height, r.batch_size) == (512, 512, 1)
    assert r.features is None and r.attention is None and r.layer_prompt_diff is False
    c = Capture()
    assert (c.layers, c.steps, c.save_tensors) == (None, "", False)
    assert c.colorize is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 500),
        ("height", 1001),
        ("width", 56),
        ("width", 2056),
        ("steps", 0),
        ("steps", 151),
        ("seed", -1),
        ("seed", 2**32),
        ("cfg_scale", 31),
        ("batch_size", 9),
        ("sampler", "plms"),
        ("prompt", "x" * 2001),
        ("negative_prompt", "x" * 2001),
    ],
)
def test_schema_limits_name_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        DumpRequest.model_validate({"model": "m", "prompt": "p", field: value})
    (error,) = info.value.errors()
    assert error["loc"] == (field,)


def test_width_not_multiple_of_8_message():
    with pytest.raises(ValidationError) as info:
        DumpRequest(model="m", prompt="p", width=500)
    assert "width must be a multiple of 8, got 500 (try 496 or 504)" in str(info.value)


def test_extra_fields_forbidden():
    with pytest.raises(ValidationError):
        DumpRequest.model_validate({"model": "m", "prompt": "p", "cfg": 7})
    with pytest.raises(ValidationError):
        DumpRequest.model_validate({"model": "m", "prompt": "p", "features": {"layer": "M00"}})


def test_schema_has_examples():
    schema = DumpRequest.model_json_schema()
    assert schema["examples"]
    assert all("description" in p for p in schema["properties"].values())
    assert DumpResult.model_json_schema()["properties"]["prompts"]


# --- prepare_dump --------------------------------------------------------------------------------------


def test_plain_generation(library):
    inputs = dump(library)
    assert inputs["model"]["name"] == "tiny-sd1-a.safetensors" and len(inputs["model"]["sha256"]) == 64
    assert inputs["arch"] == "sd1"
    assert inputs["features"] is None and inputs["attention"] is None
    assert inputs["prompts"] == dict.fromkeys(SD1.unet_blocks, "a cute girl")
    assert inputs["negative_prompts"] == dict.fromkeys(SD1.unet_blocks, "")
    assert (inputs["plain_prompt"], inputs["plain_negative_prompt"]) == ("a cute girl", "")
    assert inputs["has_groups"] is False
    assert inputs["warnings"] == []


def test_features_and_attention_resolved(library):
    inputs = dump(
        library,
        steps=20,
        features={"layers": "IN00-OUT11(+2)", "steps": "1,5-20(+5)", "save_tensors": True},
        attention={},
    )
    assert inputs["features"]["layers"] == [
        "IN00", "IN02", "IN04", "IN06", "IN08", "IN10", "M00",
        "OUT01", "OUT03", "OUT05", "OUT07", "OUT09", "OUT11",
    ]  # fmt: skip
    assert inputs["features"]["steps"] == [1, 5, 10, 15, 20]
    assert inputs["features"]["save_tensors"] is True
    assert isinstance(inputs["features"]["colorize"], dict)
    # default attention layers: every block with cross-attention; default steps: every step
    assert inputs["attention"]["layers"] == SD1_ATTENTION
    assert inputs["attention"]["steps"] == list(range(1, 21))


def test_default_layers_follow_the_arch(library):
    inputs = dump(library, model="tiny-sdxl-a", features={}, attention={})
    assert inputs["arch"] == "sdxl"
    assert inputs["features"]["layers"] == list(SDXL.unet_blocks)
    assert inputs["attention"]["layers"] == [b for b in SDXL.unet_blocks if b not in SDXL.textless_blocks]
    assert len(inputs["prompts"]) == len(SDXL.unet_blocks) == 19


def test_attention_drops_textless_blocks_with_a_warning(library):
    inputs = dump(library, attention={"layers": "IN00-IN02"})
    assert inputs["attention"]["layers"] == ["IN01", "IN02"]
    assert inputs["warnings"] == ["attention.layers: IN00 have no cross-attention and are skipped"]
    p = problem_of(library, attention={"layers": "  IN00, OUT00-OUT02"})
    assert (p.status, p.field, p.position) == (400, "attention.layers", 2)


@pytest.mark.parametrize(
    ("capture", "spec", "position", "needle"),
    [
        ("features", "IN00-IN99", 5, "unknown block IN99"),
        ("attention", "M00, IN00-IN99", 10, "unknown block IN99"),
        ("features", "IN00-OUT11(+0)", 10, "step"),
        ("features", "", 0, "empty block list"),
        ("features", "OUT11-IN00", 0, "reversed range"),
    ],
)
def test_bad_layers(library, capture, spec, position, needle):
    p = problem_of(library, **{capture: {"layers": spec}})
    assert (p.status, p.slug, p.field, p.position) == (400, "invalid-spec", f"{capture}.layers", position)
    assert needle in p.detail


def test_sdxl_has_no_in09(library):
    p = problem_of(library, model="tiny-sdxl-a", features={"layers": "IN09"})
    assert (p.field, p.position) == ("features.layers", 0)
    assert "sdxl has no block IN09" in p.detail
    p = problem_of(library, model="tiny-sdxl-a", prompt="a (~: IN09: x :~)")
    assert (p.field, p.position) == ("prompt", 6)


@pytest.mark.parametrize(
    ("capture", "spec", "position", "needle"),
    [
        ("features", "1,25", 2, "beyond total_steps 20"),
        ("attention", "0", 0, "count from 1"),
        ("features", "5-30(+5)", 2, "beyond total_steps 20"),
        ("attention", "10-5", 0, "reversed range"),
    ],
)
def test_bad_steps(library, capture, spec, position, needle):
    p = problem_of(library, steps=20, **{capture: {"steps": spec}})
    assert (p.status, p.slug, p.field, p.position) == (400, "invalid-spec", f"{capture}.steps", position)
    assert needle in p.detail


def test_steps_bound_follows_request_steps(library):
    assert dump(library, steps=30, features={"steps": "30"})["features"]["steps"] == [30]


def test_layer_prompts(library):
    inputs = dump(
        library,
        prompt="a (~: IN00-OUT11: cute; M00: excellent :~) girl",
        negative_prompt="lowres (~: IN00: blurry :~)",
    )
    assert inputs["prompts"]["M00"] == "a excellent girl"
    assert inputs["prompts"]["IN05"] == "a cute girl"
    assert inputs["plain_prompt"] == "a  girl"
    assert inputs["negative_prompts"]["IN00"] == "lowres blurry"
    assert inputs["negative_prompts"]["IN01"] == "lowres " == inputs["plain_negative_prompt"]
    assert inputs["has_groups"] is True
    assert inputs["warnings"] == [
        "negative_prompt: (~: IN00: blurry :~) at position 11 names only blocks without cross-attention "
        "(IN00); they read no prompt"
    ]


def test_prompt_errors_name_their_field(library):
    p = problem_of(library, prompt="a (~: M00: x")
    assert (p.field, p.position) == ("prompt", 2)
    p = problem_of(library, negative_prompt="bad :~)")
    assert (p.field, p.position) == ("negative_prompt", 4)


def test_layer_prompt_diff(library):
    p = problem_of(library, prompt="a cute girl", layer_prompt_diff=True)
    assert (p.status, p.field) == (400, "layer_prompt_diff")
    inputs = dump(library, prompt="a (~: M00: cute :~) girl", layer_prompt_diff=True)
    assert inputs["has_groups"] and inputs["warnings"] == []
    # a group in the negative prompt alone is enough
    assert dump(library, negative_prompt="(~: M00: blurry :~)", layer_prompt_diff=True)["has_groups"]


def test_layer_prompt_diff_with_empty_groups_is_exactly_plain(library):
    inputs = dump(library, prompt="a (~: IN00-OUT11: ; M00: :~) girl", layer_prompt_diff=True)
    assert set(inputs["prompts"].values()) == {inputs["plain_prompt"]}
    assert inputs["warnings"] == [
        "layer_prompt_diff: the groups give every block the prompt without them; the difference maps will be zero"
    ]


def test_model_errors(library):
    p = problem_of(library, model="nope")
    assert (p.status, p.slug, p.field) == (404, "unknown-model", "model")
    p = problem_of(library, model="not-sd")
    assert (p.status, p.slug, p.field) == (400, "unknown-architecture", "model")


def test_colorize_is_passed_through_and_checked_by_the_schema(library):
    inputs = dump(library, features={"colorize": {"method": "red_blue", "transform": "auto11"}})
    assert inputs["features"]["colorize"]["method"] == "red_blue"
    assert inputs["features"]["colorize"]["transform"] == "auto11"
    with pytest.raises(ValidationError) as info:
        DumpRequest.model_validate(
            {"model": "m", "prompt": "p", "attention": {"colorize": {"method": "rainbow"}}}
        )
    assert info.value.errors()[0]["loc"][:3] == ("attention", "colorize", "method")
