"""Probing with LoRAs (issue 13): dump and sweep baselines take `loras` (added in memory, never
written), sweeps vary a LoRA per block and by strength, and the cached pipeline gets its own
weights back bit for bit. The engines run in this process on the tiny sd1 model with a real kohya
LoRA file whose module names are read off the loaded diffusers pipeline (not from the code under
test) and whose factors are random."""

from __future__ import annotations

import csv
import io
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from tests.probing.test_sweep import SD1_BLOCKS, SMALL

RANK = 2
ALPHA = 1.0
PROBLEM = "application/problem+json"
# The modules of OUT11 (output_blocks.11 = up_blocks.3's last resnet and attention), written out.
OUT11_MODULES = {
    "up_blocks.3.resnets.2.conv1",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
    "up_blocks.3.attentions.2.proj_out",
}


def _wanted(component: str, name: str, module: nn.Module) -> bool:
    """At least one module in every U-Net block (conv_in is IN00, the down/upsamplers' convs the
    blocks that hold only them) and q/v of the text encoder's attention."""
    if component == "text_encoder":
        return isinstance(module, nn.Linear) and name.endswith(("self_attn.q_proj", "self_attn.v_proj"))
    if not isinstance(module, nn.Linear | nn.Conv2d):
        return False
    return (
        name == "conv_in"
        or "samplers.0.conv" in name
        or (".resnets." in name and name.endswith("conv1"))
        or name.endswith(("attn2.to_k", "proj_out"))
    )


def _kohya_lora(pipe, seed: int = 7) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, str]]]:
    """A kohya LoRA / LoCon of random factors on the pipeline's modules: (tensors, kohya module name
    → (component, diffusers module name)). LoCon k×k down + 1×1 up on k×k convs, linear factors on
    linears and 1×1 convs, as kohya writes them."""
    generator = torch.Generator().manual_seed(seed)
    tensors, modules = {}, {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for name, module in getattr(pipe, component).named_modules():
            if not _wanted(component, name, module):
                continue
            out, inp, *kernel = module.weight.shape
            down = (RANK, inp, *kernel) if kernel and kernel[0] > 1 else (RANK, inp)
            up = (out, RANK, 1, 1) if len(down) == 4 else (out, RANK)
            kohya = prefix + name.replace(".", "_")
            tensors[f"{kohya}.lora_down.weight"] = torch.randn(down, generator=generator) * 0.3
            tensors[f"{kohya}.lora_up.weight"] = torch.randn(up, generator=generator) * 0.3
            tensors[f"{kohya}.alpha"] = torch.tensor(ALPHA)
            modules[kohya] = (component, name)
    return tensors, modules


def write_style_lora(checkpoint, path):
    """The module's LoRA for a tiny sd1 checkpoint, written to `path` (for the tests through a worker)."""
    from worker.checkpoints.tiny_models import tiny_config_dir
    from worker.probing.pipelines import load_pipeline

    pipe = load_pipeline(checkpoint, "sd1", tiny_config_dir("sd1"), torch.device("cpu"), torch.float32)
    tensors, modules = _kohya_lora(pipe)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path, modules


def _delta(tensors, kohya: str, shape) -> torch.Tensor:
    """ΔW = up · down · alpha / rank, written out."""
    down, up = tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"]
    return (up.reshape(up.shape[0], -1) @ down.reshape(RANK, -1)).reshape(shape) * (ALPHA / RANK)


class Setup:
    """The module's library (tiny sd1 and sdxl, the LoRA `style`), the LoRA's tensors and modules,
    and the tiny sd1 model's parameters as a freshly loaded pipeline holds them."""

    def __init__(self, root, tiny_models) -> None:
        from worker.checkpoints.tiny_models import tiny_config_dir
        from worker.probing.pipelines import load_pipeline

        self.root = root
        self.models = root / "models"
        self.models.mkdir()
        for name in ("sd1", "sdxl"):
            try:
                os.link(tiny_models[name], self.models / tiny_models[name].name)
            except OSError:
                shutil.copyfile(tiny_models[name], self.models / tiny_models[name].name)
        self.pipe = load_pipeline(
            tiny_models["sd1"], "sd1", tiny_config_dir("sd1"), torch.device("cpu"), torch.float32
        )
        self.reference = self.parameters(self.pipe, clone=True)
        self.tensors, self.modules = _kohya_lora(self.pipe)
        self.lora_path = root / "style.safetensors"
        save_file(self.tensors, str(self.lora_path), metadata={"ss_base_model_version": "sd_v1"})
        shutil.copyfile(self.lora_path, self.models / "style.safetensors")

    @staticmethod
    def parameters(pipe, clone: bool = False) -> dict[tuple[str, str], torch.Tensor]:
        return {
            (component, name): p.detach().clone() if clone else p.detach()
            for component in ("unet", "text_encoder", "vae")
            for name, p in getattr(pipe, component).named_parameters()
        }

    def settings(self, **overrides):
        from mergeprobe.service.settings import Settings

        # float32 wherever it runs: the comparisons are with a float32 pipeline's parameters.
        return Settings(
            data_dir=self.root / "data", models_dir=self.models, generation_dtype="float32", **overrides
        )

    def run(self, kind: str, body: dict, *, reporter=None, **settings):
        """(result, context) of a job run through its real engine in this process."""
        from mergeprobe.checkpoints.library import ModelLibrary
        from mergeprobe.service.kinds import KINDS
        from worker.context import JobContext
        from worker.engines.dump import run_dump
        from worker.engines.sweep import run_sweep

        job_kind = KINDS[kind]
        config = self.settings(**settings)
        ctx = JobContext.local(
            job_kind,
            job_kind.request_model.model_validate(body),
            settings=config,
            library=ModelLibrary(config),
            reporter=reporter,
        )
        result = (run_sweep if kind == "sweep" else run_dump)(ctx)
        job_kind.result_model.model_validate(result)  # as run_job checks it
        return result, ctx

    def image(self, ctx, name: str) -> bytes:
        from mergeprobe.service.artifacts import ArtifactStore

        data = ArtifactStore(self.settings()).read_bytes(ctx.job_id, name)
        return Image.open(io.BytesIO(data)).convert("RGB").tobytes()

    def artifact(self, ctx, name: str) -> bytes:
        from mergeprobe.service.artifacts import ArtifactStore

        return ArtifactStore(self.settings()).read_bytes(ctx.job_id, name)

    def assert_cached_pipeline_is_the_model(self) -> None:
        """Every U-Net, text-encoder and VAE parameter of the worker's cached pipeline equals the
        freshly loaded model's, bit for bit."""
        from worker.probing import generation

        (pipe, _size), *others = generation._cache._entries.values()
        assert not others
        cached = self.parameters(pipe)
        assert cached.keys() == self.reference.keys()
        for param_id, value in self.reference.items():
            assert torch.equal(cached[param_id].cpu(), value), param_id


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    """One Setup per module, and a pipeline cache of its own (so the module's jobs share the cached
    pipeline, and each one's successor would see what it left)."""
    from worker.probing import generation

    saved = generation._cache
    generation._cache = None
    yield Setup(tmp_path_factory.mktemp("lora-probing"), tiny_models)
    generation._cache = saved


def test_a_lora_study_gives_the_u_and_leaves_the_cached_pipeline_as_loaded(setup):
    """The done-when of issue 13's probing part: 25 variants (the LoRA off on one block each) + the
    baseline per seed, the U layout, influence.csv and the ranking; then the cached pipeline holds
    the tiny model's weights bit for bit, also after a canceled sweep."""
    from worker.context import LocalReporter
    from worker.probing.sweep_render import Cell, render_cells, u_geometry, u_layout

    body = {
        "model_a": "tiny-sd1-a",
        "loras": [{"model": "style", "strength": 0.8}],
        "variants": {"lora": 0, "blocks": "IN00-OUT11"},
        "seeds": [1],
        **SMALL,
        "steps": 1,
    }
    result, ctx = setup.run("sweep", body)
    assert result["variants"] == SD1_BLOCKS
    names = {a["name"] for a in ctx.artifacts}
    images = {n for n in names if n.endswith(".png") and not n.startswith(("diff_", "grid"))}
    assert images == {f"{b}_s1.png" for b in SD1_BLOCKS} | {"baseline_s1.png"}
    rows = list(csv.DictReader(io.StringIO(setup.artifact(ctx, "influence.csv").decode())))
    assert [r["variant"] for r in rows] == SD1_BLOCKS
    assert len(result["ranking"]) == 25
    # The LoRA has modules in every block: switched off there, every block changes something.
    assert sum(float(r["mean_abs_diff"]) > 0 for r in rows) >= 20, rows
    report = result["loras"][0]
    assert report["lora"]["name"] == "style.safetensors"
    assert report["matched"] == report["modules"] == len(setup.modules) and report["unmatched"] == []
    assert set(report["matched_by_block"]) == {"BASE", *SD1_BLOCKS}
    assert report["matched_by_component"] == {"te": 4, "unet": len(setup.modules) - 4}
    assert report["strengths"]["OUT11"] == pytest.approx(0.8)
    assert ctx.warnings == []

    grid = Image.open(io.BytesIO(setup.artifact(ctx, "grid.png"))).convert("RGB")
    changed = {r["variant"]: r["changed_share"] for r in result["ranking"]}
    shown = {
        name: Cell(
            (Image.open(io.BytesIO(setup.artifact(ctx, f"{name}_s1.png"))).convert("RGB"),), name, (1,), share
        )
        for name, share in [("OUT11", changed["OUT11"]), ("baseline", None)]
    }
    cell = render_cells(shown)["OUT11"]  # the block, its changed share, its seed
    geometry = u_geometry(SD1_BLOCKS, cell.size)
    assert grid.size == (geometry.width, geometry.height)
    row, col = u_layout(SD1_BLOCKS)["OUT11"]
    x, y = geometry.origin(row, col)
    assert grid.crop((x, y, x + cell.width, y + cell.height)).tobytes() == cell.tobytes()

    setup.assert_cached_pipeline_is_the_model()
    reporter = LocalReporter()
    reporter.cancel()
    from worker.context import JobCanceled

    with pytest.raises(JobCanceled):
        setup.run("sweep", body, reporter=reporter)
    setup.assert_cached_pipeline_is_the_model()


def test_a_lora_at_strength_0_is_the_model_bit_for_bit(setup):
    """The LoRA changes the baseline; a variant that sets its U-Net strength to 0 (its text-encoder
    strength being 0 too, by its BASE weight) gives the image without any LoRA, bit for bit, and
    one at the baseline's strength reuses the baseline's images."""
    plain, plain_ctx = setup.run(
        "sweep", {"model_a": "tiny-sd1-a", "variants": {"blocks": "M00", "beta": 1}, "seeds": [4], **SMALL}
    )
    styled, ctx = setup.run(
        "sweep",
        {
            "model_a": "tiny-sd1-a",
            "loras": [{"model": "style", "blocks": "BASE:0, _:1"}],
            "variants": {
                "x": {"kind": "lora_strength", "values": [0, 0.5, 1]},
                "y": {"kind": "seed", "values": [4]},
            },
            **SMALL,
        },
        sweep_batch_pixels=0,  # one variant per call: the batch of the baseline's call
    )
    without = setup.image(plain_ctx, "baseline_s4.png")
    baseline = setup.image(ctx, "baseline_s4.png")
    assert baseline != without, "the LoRA changes nothing"
    assert setup.image(ctx, "x0_y0_s4.png") == without
    assert setup.image(ctx, "x1_y0_s4.png") not in (without, baseline)
    assert setup.image(ctx, "x2_y0_s4.png") == baseline
    assert styled["pipeline_calls"] == 3  # the baseline, strength 0 and 0.5; strength 1 is the baseline
    assert styled["loras"][0]["strengths"]["BASE"] == 0
    assert any("its 4 text-encoder modules keep the baseline's strength" in w for w in ctx.warnings)
    assert [r["label"] for r in styled["rows"]] == [
        "lora0=0 | seed=4",
        "lora0=0.5 | seed=4",
        "lora0=1 | seed=4",
    ]
    setup.assert_cached_pipeline_is_the_model()


def test_variant_tensors_are_the_model_plus_the_lora_at_the_variant_strength(setup):
    """The baseline adds strength × ΔW to every module's tensor (text encoder included); a block's
    variant at weight 0 recomputes exactly that block's modules, to the model's own values; a
    strength variant gives model + strength' × ΔW on every U-Net module and leaves the text
    encoder; restoring gives the loaded values back."""
    from mergeprobe.checkpoints.archs import get_arch
    from mergeprobe.checkpoints.library import ModelLibrary
    from mergeprobe.lora.bake_plan import attach_loras, match_loras
    from mergeprobe.merging.merge_plan import change_plan, plan_merge
    from mergeprobe.probing.sweep_request import BASELINE_NAME, SweepRequest, Variant, prepare_sweep
    from worker.checkpoints.checkpoint_io import MappedCheckpoint
    from worker.engines.sweep import _apply_baseline, _variant_patch, _Weights

    library = ModelLibrary(setup.settings())
    strength = 0.6

    def prepared(variants):
        request = SweepRequest.model_validate(
            {
                "model_a": "tiny-sd1-a",
                "loras": [{"model": "style", "strength": strength}],
                "variants": variants,
                **SMALL,
            }
        )
        return request, prepare_sweep(request, library)

    request, inputs = prepared({"lora": 0, "blocks": "OUT11, IN00"})
    _, xy = prepared({"x": {"kind": "lora_strength", "values": [0.25]}, "y": {"kind": "seed", "values": [1]}})
    plan = plan_merge(request.baseline_merge(), library, output_name=BASELINE_NAME, pinned=inputs.models)
    matching = match_loras(
        "sd1", plan.headers["a"], "tiny-sd1-a", request.loras, library, pinned=inputs.loras
    )
    attach_loras(plan, matching)
    sources = {slot: MappedCheckpoint(path, plan.headers[slot]) for slot, path in plan.paths.items()}
    weights = _Weights(setup.pipe, "sd1", sources)
    params = {(component, f"{name}.weight") for component, name in setup.modules.values()}
    try:
        _apply_baseline(weights, plan, 0)
        for (component, name), value in setup.parameters(setup.pipe).items():
            reference = setup.reference[(component, name)]
            if (component, name) not in params:
                assert torch.equal(value, reference), (component, name)
        for kohya, (component, name) in setup.modules.items():
            value = getattr(setup.pipe, component).get_submodule(name).weight.detach()
            expected = setup.reference[(component, f"{name}.weight")] + strength * _delta(
                setup.tensors, kohya, value.shape
            )
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-5)

        unet = get_arch("sd1").unet_blocks
        variants = [Variant.from_json(v) for v in inputs.variants]
        assert [v.name for v in variants] == ["IN00", "OUT11"]
        assert variants[1].lora_strengths == {0: {"OUT11": 0.0}}
        patch = _variant_patch(weights, change_plan(plan, variants[1].change(), unet), 0)
        assert set(patch) == {f"{name}.weight" for name in OUT11_MODULES}
        for name, value in patch.items():
            assert torch.equal(value, setup.reference[("unet", name)]), name
        assert set(_variant_patch(weights, change_plan(plan, variants[0].change(), unet), 0)) == {
            "conv_in.weight"
        }

        (variant,) = [Variant.from_json(v) for v in xy.variants]
        assert variant.lora_strengths[0] == dict.fromkeys(unet, 0.25)
        patch = _variant_patch(weights, change_plan(plan, variant.change(), unet), 0)
        unet_modules = {
            kohya: name for kohya, (component, name) in setup.modules.items() if component == "unet"
        }
        assert set(patch) == {f"{name}.weight" for name in unet_modules.values()}
        for kohya, name in unet_modules.items():
            reference = setup.reference[("unet", f"{name}.weight")]
            expected = reference + 0.25 * _delta(setup.tensors, kohya, reference.shape)
            torch.testing.assert_close(patch[f"{name}.weight"], expected, rtol=0, atol=1e-5)
    finally:
        weights.restore_a()
        for source in sources.values():
            source.close()
    for param_id, value in setup.parameters(setup.pipe).items():
        assert torch.equal(value, setup.reference[param_id]), param_id


def test_a_dump_with_a_lora_and_the_pipeline_after_it(setup):
    """A LoRA on the text encoder alone leaves IN00's first-step features (the latent through
    conv_in, no text yet) and changes M00's (cross-attention reads the text); the whole LoRA
    changes IN00's too. The result reports the match; the cached pipeline is the model's again
    after each dump, a canceled one included."""
    from safetensors.torch import load as load_safetensors

    from worker.context import JobCanceled, LocalReporter

    def dump(loras, **extra):
        body = {
            "model": "tiny-sd1-a",
            "prompt": "a cute cat",
            "steps": 1,
            "width": 64,
            "height": 64,
            "features": {"layers": "IN00, M00", "steps": "1", "save_tensors": True},
            "loras": loras,
        }
        result, ctx = setup.run("dump", body, **extra)
        tensors = load_safetensors(setup.artifact(ctx, "tensors.safetensors"))
        return result, {k: v for k, v in tensors.items() if k.endswith("/cond")}

    plain_result, plain = dump([])
    assert plain_result["loras"] == []
    text_only, text = dump([{"model": "style", "blocks": "BASE:1, _:0"}])
    setup.assert_cached_pipeline_is_the_model()
    report = text_only["loras"][0]
    assert report["matched"] == len(setup.modules) and report["matched_by_component"]["te"] == 4
    assert report["strengths"]["BASE"] == 1 and report["strengths"]["IN00"] == 0
    assert torch.equal(text["features/IN00/step001/cond"], plain["features/IN00/step001/cond"])
    assert not torch.equal(text["features/M00/step001/cond"], plain["features/M00/step001/cond"])
    _, styled = dump([{"model": "style", "strength": 0.5}])
    assert not torch.equal(styled["features/IN00/step001/cond"], plain["features/IN00/step001/cond"])
    setup.assert_cached_pipeline_is_the_model()
    _, again = dump([])
    assert all(torch.equal(again[k], plain[k]) for k in plain)

    reporter = LocalReporter()
    reporter.cancel()
    with pytest.raises(JobCanceled):
        setup.run(
            "dump",
            {
                "model": "tiny-sd1-a",
                "prompt": "a cat",
                "steps": 2,
                "width": 64,
                "height": 64,
                "loras": [{"model": "style"}],
            },
            reporter=reporter,
        )
    setup.assert_cached_pipeline_is_the_model()


def _nowhere_lora(path):
    """A LoRA whose only module names a block the tiny model does not have."""
    generator = torch.Generator().manual_seed(1)
    module = "lora_unet_down_blocks_9_attentions_0_proj_in"
    save_file(
        {
            f"{module}.lora_down.weight": torch.randn(RANK, 32, generator=generator),
            f"{module}.lora_up.weight": torch.randn(32, RANK, generator=generator),
            f"{module}.alpha": torch.tensor(ALPHA),
        },
        str(path),
        metadata={"ss_base_model_version": "sd_v1"},
    )
    return module


def test_loras_that_cannot_apply_and_lora_variants_that_make_no_sense_are_400s(
    setup, service, client, tiny_models
):
    from tests.conftest import install_model

    install_model(service, tiny_models["sd1"])
    install_model(service, tiny_models["sdxl"])
    nowhere = _nowhere_lora(setup.root / "nowhere.safetensors")
    for path in (setup.lora_path, setup.root / "nowhere.safetensors"):
        response = client.post("/v1/models", params={"name": path.name}, content=path.read_bytes())
        assert response.status_code == 201, response.text
    sweep = {"model_a": "tiny-sd1-a", "variants": {"blocks": "M00"}, **SMALL}
    dump = {"model": "tiny-sd1-a", "prompt": "a cat", "steps": 1, "width": 64, "height": 64}
    style = [{"model": "style"}]
    xy_seed = {"kind": "seed", "values": [1]}
    cases = [
        (
            "sweep",
            {**sweep, "loras": [{"model": "nowhere"}]},
            "loras[0].model",
            "lora-matches-nothing",
            nowhere,
        ),
        (
            "dump",
            {**dump, "loras": [*style, {"model": "nowhere"}]},
            "loras[1].model",
            "lora-matches-nothing",
            nowhere,
        ),
        (
            "sweep",
            {**sweep, "model_a": "tiny-sdxl-a", "loras": style},
            "loras[0].model",
            "lora-architecture-mismatch",
            "style.safetensors",
        ),
        (
            "dump",
            {**dump, "model": "tiny-sdxl-a", "loras": style},
            "loras[0].model",
            "lora-architecture-mismatch",
            "style.safetensors",
        ),
        (
            "dump",
            {**dump, "loras": [{"model": "tiny-sd1-a"}]},
            "loras[0].model",
            "wrong-model-kind",
            "tiny-sd1-a",
        ),
        (
            "sweep",
            {**sweep, "loras": style, "variants": {"lora": 1}},
            "variants.lora",
            "invalid-variant",
            "no LoRA 1",
        ),
        ("sweep", {**sweep, "variants": {"lora": 0}}, "variants.lora", "invalid-variant", "has none"),
        (
            "sweep",
            {
                **sweep,
                "loras": style,
                "variants": {"x": {"kind": "lora_strength", "lora": 2, "values": [0]}, "y": xy_seed},
            },
            "variants.x.lora",
            "invalid-variant",
            "no LoRA 2",
        ),
        (
            "sweep",
            {**sweep, "loras": style, "variants": {"lora": 0, "blocks": "IN00, BASE"}},
            "variants.blocks",
            "invalid-variant",
            "BASE",
        ),
        (
            "sweep",
            {
                **sweep,
                "loras": style,
                "variants": {"x": {"kind": "lora_block", "block": "BASE", "values": [0]}, "y": xy_seed},
            },
            "variants.x.block",
            "invalid-variant",
            "BASE",
        ),
        (
            "sweep",
            {
                **sweep,
                "loras": style,
                "variants": {"x": xy_seed, "y": {"kind": "lora_strength", "values": [0, 5000]}},
            },
            "variants.y.values[1]",
            "invalid-strength",
            "5000",
        ),
    ]
    for kind, body, field, slug, named in cases:
        response = client.post(f"/v1/jobs/{kind}", json=body)
        assert response.status_code == 400 and response.headers["content-type"] == PROBLEM, (
            body,
            response.text,
        )
        problem = response.json()
        assert problem["type"].endswith(slug) and problem["field"] == field, (body, problem)
        assert named in problem["detail"], problem
    # And what passes: the study of a LoRA, a strength axis; their warnings say what they leave alone.
    ok = client.post(
        "/v1/jobs/sweep", json={**sweep, "loras": style, "variants": {"lora": 0, "blocks": "IN00-IN02"}}
    )
    assert ok.status_code == 202, ok.text


def test_lora_variants_expand_to_strengths_per_block():
    """No models: the LoRA forms of a sweep's variants resolved against the request's LoRAs."""
    from mergeprobe.checkpoints.archs import get_arch
    from mergeprobe.probing.sweep_request import LoraBlockVariants, SweepRequest, Variant, expand_variants

    sd1 = get_arch("sd1")
    lbw = "IN00-IN11:0.5, M00:1, OUT00-OUT11:2, BASE:1"
    request = SweepRequest.model_validate(
        {
            "model_a": "a",
            "prompt": "a cat",
            "loras": [{"model": "x", "strength": 0.5, "blocks": lbw}, {"model": "y"}],
            "variants": {
                "x": {"kind": "lora_strength", "lora": 0, "values": [1, "0.25"]},
                "y": {"kind": "lora_block", "lora": 0, "block": "OUT11", "values": [0, 3]},
            },
        }
    )
    variants = expand_variants(request, sd1)
    assert [v.label for v in variants] == [
        "lora0=1 | OUT11 lora0=0",
        "lora0=0.25 | OUT11 lora0=0",
        "lora0=1 | OUT11 lora0=3",
        "lora0=0.25 | OUT11 lora0=3",
    ]
    # Strength × block weight: the axis's strength with the LoRA's weights, OUT11's from y.
    last = variants[3].lora_strengths[0]
    assert last["IN05"] == 0.25 * 0.5 and last["M00"] == 0.25 and last["OUT10"] == 0.25 * 2
    assert last["OUT11"] == 0.25 * 3 and "BASE" not in last
    assert variants[0].lora_strengths[0]["OUT11"] == 0
    assert Variant.from_json(variants[3].to_json()) == variants[3]
    change = variants[3].change()
    assert (0, "OUT11", 0.75) in change.lora_strengths and len(change.lora_strengths) == 25

    study = request.model_copy(
        update={"variants": LoraBlockVariants(lora=1, blocks="OUT11, M00", weight=0.5)}
    )
    variants = expand_variants(study, sd1)
    assert [(v.name, v.lora_strengths) for v in variants] == [
        ("M00", {1: {"M00": 0.5}}),
        ("OUT11", {1: {"OUT11": 0.5}}),
    ]
