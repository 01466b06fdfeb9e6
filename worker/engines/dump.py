"""dump jobs: generate once (or twice, for layer_prompt_diff) with probes on the U-Net, and
write block features, cross-attention maps, the images and the raw tensors.

With `loras`, the model's cached pipeline gets them added in place for the job (U-Net and text
encoders, each modified tensor computed as a bake computes it in fp32) and its own values back,
bit for bit, when the job ends, whether it succeeds, fails or is canceled."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from mergeprobe.lora.bake_plan import add_request_loras
from mergeprobe.merging.merge_plan import MergeRequest, plan_merge
from mergeprobe.probing.colorize import Colorize
from mergeprobe.probing.dump_request import DumpInputs, DumpRequest
from worker.checkpoints.checkpoint_io import MappedCheckpoint
from worker.context import JobContext
from worker.probing.generation import PromptEncoder, get_pipeline, make_scheduler
from worker.probing.pipeline_weights import PipelineWeights, apply_plan
from worker.probing.probe import Probe, ProbeState
from worker.probing.render import Capture, attention_grid, feature_grid, heatmap_overlay, png_bytes


def _safe(text: str) -> str:
    """A token's text as part of an artifact name."""
    return re.sub(r"[^A-Za-z0-9]+", "", text)[:24] or "x"


DIFF_COLORIZE = Colorize(method="red_blue", transform="auto11")
DIFF_TITLE = "difference: block prompts - plain prompt"


class _Recorder:
    """Receives captures during generation; renders and stores them."""

    def __init__(self, ctx: JobContext, request: DumpRequest, halves: list[str], batch: int) -> None:
        self.ctx = ctx
        self.request = request
        self.halves = halves
        self.batch = batch
        self.tensors: dict[str, torch.Tensor] = {}
        self.manifest: list[dict[str, Any]] = []
        self.baseline: dict[tuple[str, int], torch.Tensor] | None = None  # plain run, for diffs
        self.keep_baseline = False
        self.attention_sum: dict[int, torch.Tensor] = {}  # token → summed map at latent size
        self.attention_count = 0
        self.token_labels: dict[str, list[str]] = {}
        self.latent_size = (request.height // 8, request.width // 8)
        self.shapes: dict[str, list[int]] = {}
        self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dump-render")
        self._pending: list[Future] = []

    def _artifact(self, name: str, data: bytes, media_type: str, **facts: Any) -> None:
        record = self.ctx.write_artifact(name, data, media_type)
        self.manifest.append({"name": name, "url": record["url"], **facts})

    def _image_later(self, name: str, render: Callable[[], Any], **facts: Any) -> None:
        """Render and write a PNG on the recorder's own thread, so that it overlaps with the
        U-Net's next blocks; one thread keeps the manifest in capture order."""
        self._pending.append(
            self._renderer.submit(lambda: self._artifact(name, png_bytes(render()), "image/png", **facts))
        )

    def flush(self) -> None:
        """Wait for every pending PNG (re-raising a rendering error)."""
        for future in self._pending:
            future.result()
        self._pending.clear()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._renderer.shutdown(wait=True)

    def _split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch of the U-Net call → {half: tensor}; diffusers batches [uncond, cond]."""
        parts = tensor.chunk(len(self.halves), dim=0)
        return dict(zip(self.halves, parts, strict=True))

    def feature(self, block: str, step: int, output: torch.Tensor) -> None:
        data = output.detach().to(device="cpu", dtype=torch.float32, copy=True)
        if self.keep_baseline:
            self.baseline[(block, step)] = data.clone()
            return
        spec = self.request.features
        for half, part in self._split(data).items():
            name = f"features/{block}/step{step:03d}/{half}"
            if spec.save_tensors:
                self.tensors[name] = part.clone().contiguous()
                self.shapes[name] = list(part.shape)
            for b in range(part.shape[0]):
                suffix = f"_b{b}" if self.batch > 1 else ""
                capture = Capture(block, step, half, b if self.batch > 1 else None)
                self._image_later(
                    f"features_{block}_step{step:03d}_{half}{suffix}.png",
                    partial(feature_grid, part[b].numpy(), spec.colorize, capture),
                    kind="features",
                    block=block,
                    step=step,
                    half=half,
                    batch_index=b,
                )
            if self.baseline is not None and (block, step) in self.baseline:
                base = self._split(self.baseline[(block, step)])[half]
                diff = part - base
                if spec.save_tensors:
                    self.tensors[f"diff/{block}/step{step:03d}/{half}"] = diff.contiguous()
                for b in range(diff.shape[0]):
                    suffix = f"_b{b}" if self.batch > 1 else ""
                    capture = Capture(block, step, half, b if self.batch > 1 else None, DIFF_TITLE)
                    self._image_later(
                        f"diff_{block}_step{step:03d}_{half}{suffix}.png",
                        partial(feature_grid, diff[b].numpy(), DIFF_COLORIZE, capture),
                        kind="layer_prompt_diff",
                        block=block,
                        step=step,
                        half=half,
                        batch_index=b,
                        max_abs=float(diff[b].abs().max()),
                    )

    def attention(self, block: str, step: int, index: int, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        if self.keep_baseline:
            return
        spec = self.request.attention
        h, w = hw
        data = probs.detach().float().cpu()  # (batch, heads, queries, tokens)
        for half, part in self._split(data).items():
            maps = part.reshape(part.shape[0], part.shape[1], h, w, part.shape[-1])
            if spec.save_tensors:
                name = f"attention/{block}/step{step:03d}/{half}/t{index}"
                self.tensors[name] = maps.contiguous()
                self.shapes[name] = list(maps.shape)
            if half != "cond":
                continue
            labels = self.token_labels[block]
            per_token = maps[0, :, :, :, : len(labels)].permute(0, 3, 1, 2)  # heads, tokens, h, w
            if index == 0:
                self._image_later(
                    f"attention_{block}_step{step:03d}.png",
                    partial(
                        attention_grid, per_token.numpy(), labels, spec.colorize, Capture(block, step, half)
                    ),
                    kind="attention",
                    block=block,
                    step=step,
                    half=half,
                    tokens=labels,
                )
            averaged = per_token.mean(dim=0, keepdim=True)  # over heads
            upsampled = torch.nn.functional.interpolate(averaged, size=self.latent_size, mode="bilinear")[0]
            for token in range(upsampled.shape[0]):
                self.attention_sum[token] = self.attention_sum.get(token, 0) + upsampled[token]
            self.attention_count += 1


LORA_PLAN_NAME = "dump-loras.safetensors"  # the plan's output name; nothing is written


class _Loras:
    """The request's LoRAs added to the pipeline's weights in place, and taken out again: the model
    with itself at α = 0 (every key the model's) plus the LoRA modules, as a bake plans it."""

    def __init__(self) -> None:
        self.weights: PipelineWeights | None = None
        self.sources: dict[str, MappedCheckpoint] = {}
        self.reports: list[dict[str, Any]] = []

    def apply(self, ctx: JobContext, pipe: Any, arch: str) -> None:
        request: DumpRequest = ctx.request
        inputs: DumpInputs = ctx.inputs
        model = inputs.model
        plan = plan_merge(
            MergeRequest(model_a=model.name, model_b=model.name, alpha=0),
            ctx.library,
            output_name=LORA_PLAN_NAME,
            pinned={"a": model, "b": model},
        )
        # its warnings were the submission's (inputs.warnings)
        self.reports = add_request_loras(plan, request.loras, ctx.library, inputs.loras)
        self.sources = {
            slot: MappedCheckpoint(path, plan.headers[slot], read_delay=ctx.settings.debug_tensor_delay)
            for slot, path in plan.paths.items()
            if slot != "b"  # the model again: read as "a"
        }
        self.weights = PipelineWeights(pipe, arch, self.sources)
        apply_plan(self.weights, plan, 0)  # no random method: every key is a copy plus its modules

    def restore(self) -> None:
        if self.weights is not None:
            self.weights.restore_a()
        for source in self.sources.values():
            source.close()


def _token_labels(pipe, text: str) -> list[str]:
    tokenizer = pipe.tokenizer
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in ids]


def run_dump(ctx: JobContext) -> dict[str, Any]:
    started = time.monotonic()
    request: DumpRequest = ctx.request
    inputs: DumpInputs = ctx.inputs
    arch = inputs.arch
    library = ctx.library
    path = library.open_pinned(inputs.model)
    header = library.header(path)
    sha256 = inputs.model.sha256
    ctx.progress(0, 1, "loading pipeline")
    pipe, cached, device = get_pipeline(ctx.settings, path, header, arch, sha256, inputs.pipeline)
    pipe.scheduler = make_scheduler(request.sampler, pipe.scheduler.config)
    sdxl = arch == "sdxl"
    encode = PromptEncoder(pipe, sdxl, device)
    cfg = request.cfg_scale > 1.0
    halves = ["uncond", "cond"] if cfg else ["cond"]
    batch = request.batch_size
    recorder = _Recorder(ctx, request, halves, batch)
    feature_steps = {b: set(inputs.features.steps) for b in inputs.features.layers} if inputs.features else {}
    attention_steps = (
        {b: set(inputs.attention.steps) for b in inputs.attention.layers} if inputs.attention else {}
    )
    runs = 2 if request.layer_prompt_diff else 1
    total = runs * request.steps
    done_steps = 0

    def contexts(prompts: dict[str, str], negatives: dict[str, str]) -> dict[str, torch.Tensor]:
        result = {}
        for block in prompts:
            pos = encode(prompts[block])[0].repeat(batch, 1, 1)
            if cfg:
                neg = encode(negatives[block], negative=True)[0].repeat(batch, 1, 1)
                pos = torch.cat([neg, pos])
            result[block] = pos
        return result

    def generate(prompts: dict[str, str], negatives: dict[str, str]):
        nonlocal done_steps
        base_block = "IN00"  # where the time (and SDXL pooled text) embedding lives
        state = ProbeState(
            latent_size=recorder.latent_size,
            contexts=contexts(prompts, negatives),
            feature_steps=feature_steps,
            attention_steps=attention_steps,
            on_feature=recorder.feature,
            on_attention=recorder.attention,
        )
        for block, text in prompts.items():
            recorder.token_labels[block] = _token_labels(pipe, text)
        pos, pooled = encode(prompts[base_block])
        neg, neg_pooled = encode(negatives[base_block], negative=True)
        kwargs: dict[str, Any] = {"prompt_embeds": pos, "negative_prompt_embeds": neg}
        if sdxl:
            kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)

        def on_step_end(_pipe, index, _timestep, callback_kwargs):
            nonlocal done_steps
            state.step = index + 2
            done_steps += 1
            ctx.progress(done_steps, total, "generating")
            ctx.check_cancel()
            return callback_kwargs

        with Probe(pipe.unet, state), torch.no_grad():
            return pipe(
                **kwargs,
                num_inference_steps=request.steps,
                guidance_scale=request.cfg_scale,
                width=request.width,
                height=request.height,
                num_images_per_prompt=batch,
                generator=torch.Generator(device="cpu").manual_seed(request.seed),
                callback_on_step_end=on_step_end,
                output_type="pil",
            ).images

    loras = _Loras()
    try:
        if request.loras:
            ctx.progress(0, total, "adding the LoRAs")
            loras.apply(ctx, pipe, arch)
        if request.layer_prompt_diff:
            plain = dict.fromkeys(inputs.prompts, inputs.plain_prompt)
            plain_neg = dict.fromkeys(inputs.prompts, inputs.plain_negative_prompt)
            recorder.baseline, recorder.keep_baseline = {}, True
            generate(plain, plain_neg)
            recorder.keep_baseline = False
        images = generate(inputs.prompts, inputs.negative_prompts)
        recorder.flush()
    finally:
        try:
            recorder.close()
        finally:
            loras.restore()  # the cached pipeline is the model's again, also after a failure or cancel

    image_names = []
    for index, image in enumerate(images):
        name = f"image_{index}.png"
        recorder._artifact(name, png_bytes(image), "image/png", kind="image", batch_index=index)
        image_names.append(name)
    if recorder.attention_count:
        labels = recorder.token_labels[next(iter(attention_steps))]
        for token, summed in recorder.attention_sum.items():
            heat = (summed / recorder.attention_count).numpy()
            overlay = heatmap_overlay(images[0], heat)
            recorder._artifact(
                f"heatmap_t{token:02d}_{_safe(labels[token])}.png",
                png_bytes(overlay),
                "image/png",
                kind="token_heatmap",
                token=token,
                token_text=labels[token],
            )
    if recorder.tensors:
        metadata = {
            "mergeprobe": json.dumps(
                {
                    "shapes": recorder.shapes,
                    "halves": halves,
                    "features": inputs.features.model_dump() if inputs.features else None,
                    "attention": inputs.attention.model_dump() if inputs.attention else None,
                    "request": request.model_dump(mode="json"),
                    "layout": {
                        "features": "features/<block>/step<NNN>/<half>: (batch, channels, h, w)",
                        "attention": "attention/<block>/step<NNN>/<half>/t<i>: (batch, heads, h, w, 77 tokens), "
                        "probabilities of transformer i of the block",
                        "diff": "diff/<block>/step<NNN>/<half>: with groups − without",
                    },
                },
                sort_keys=True,
            )
        }
        recorder._artifact(
            "tensors.safetensors",
            save_safetensors(recorder.tensors, metadata),
            "application/octet-stream",
            kind="tensors",
        )
    manifest = {"arch": arch, "halves": halves, "artifacts": recorder.manifest}
    ctx.write_artifact("manifest.json", json.dumps(manifest, indent=1).encode(), "application/json")
    for warning in inputs.warnings:
        ctx.warn(warning)
    return {
        "model": path.name,
        "arch": arch,
        "images": image_names,
        "prompts": inputs.prompts,
        "negative_prompts": inputs.negative_prompts,
        "warnings": inputs.warnings,
        "captures": len(recorder.manifest),
        "pipeline_cached": cached,
        "pipeline": inputs.pipeline.model_dump(),
        "device": str(device),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "seconds": round(time.monotonic() - started, 3),
        "loras": loras.reports,
    }
