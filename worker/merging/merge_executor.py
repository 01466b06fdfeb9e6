"""The one executor of merge plans: what each planned key's tensor is, computed from the mapped inputs.

Two sinks use it: ``worker.merging.stream_merge`` writes the keys of a plan to a file, and the sweep engine
(``worker.engines.sweep``) puts a baseline's keys, and each variant's, into a loaded pipeline. Both
take the same decisions from here (which input a copied key comes from, the ranges a key is merged
in and their random draws, inpainting conv_in, the lerp fast path), so a sweep's baseline is bit for
bit the merge a merge job writes, in fp32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from mergeprobe.lora.bake_plan import ModuleApplication
from mergeprobe.merging.merge_methods import MergeMethod
from mergeprobe.merging.merge_plan import KeyPlan, MergePlan
from worker.checkpoints.checkpoint_io import MappedCheckpoint
from worker.lora.lora_delta import lora_delta

CHUNK_ELEMENTS = 1 << 21  # 2 M elements: 8 MB per fp32 operand
MERGE_SLOTS = ("a", "b", "c")

# Loads one input's range as a fresh fp32 tensor the method may overwrite: (slot, key, start, stop)
# → tensor, or None where that input lacks the key (an optional third model).
RangeLoader = Callable[[str, str, int, int], "torch.Tensor | None"]
# lora_formats' role names → lora_delta's tensor names (the others are the same).
_DELTA_ROLES = {
    "down": "lora_down.weight",
    "up": "lora_up.weight",
    "mid": "lora_mid.weight",
    "magnitude": "dora_scale",  # PEFT's DoRA magnitude, always per output channel: see module_factors
}


def chunk_ranges(method: MergeMethod, key: str, numel: int, conv_in: str) -> list[tuple[int, int]]:
    """The element ranges of the flat tensor `key` is merged in: CHUNK_ELEMENTS at a time for
    element-wise methods, else (and for conv_in, whose channels may differ) the whole tensor.
    Random methods draw per range (`chunk_rng`), so every sink merges in these same ranges."""
    if not method.elementwise or key == conv_in or numel <= CHUNK_ELEMENTS:
        return [(0, numel)]
    return [(start, min(start + CHUNK_ELEMENTS, numel)) for start in range(0, numel, CHUNK_ELEMENTS)]


def chunk_rng(seed: int, key: str, start: int) -> torch.Generator:
    """The generator of one range's random draws (dare): from the merge seed, the key and the range."""
    digest = hashlib.sha256(f"{seed}:{key}:{start}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def module_factors(
    source: MappedCheckpoint, module: ModuleApplication, device: torch.device
) -> tuple[dict[str, torch.Tensor], float | None]:
    """A LoRA module's tensors by lora_delta's role names, on `device`, and its alpha (the PEFT
    metadata's, else the file's `alpha` tensor, else None: alpha = rank)."""
    factors = {
        _DELTA_ROLES.get(role, role): source.get(key).to(device)
        for role, key in module.tensors.items()
        if role != "alpha"
    }
    if "magnitude" in module.tensors:
        # PEFT's magnitude is one value per output channel whatever its shape: (out,) on a linear
        # layer, (1, out, 1, 1) on a conv (its _DoraConvNdLayer keeps the norm transposed), which
        # lora_delta would read as LyCORIS's per-input-channel (1, in, 1, 1). Flat, it is (out,).
        factors["dora_scale"] = factors["dora_scale"].reshape(-1)
    alpha = module.alpha
    if alpha is None and "alpha" in module.tensors:
        alpha = float(source.get(module.tensors["alpha"]).float().item())
    return factors, alpha


def _plain_low_rank(algorithm: str, factors: dict[str, torch.Tensor]) -> bool:
    """A LoRA / LoCon module without a mid (Tucker) factor or DoRA: ΔW is one matrix product."""
    return algorithm in ("lora", "locon") and set(factors) == {"lora_down.weight", "lora_up.weight"}


class PlanExecutor:
    """Computes the keys of one plan from its mapped inputs (`sources`, by slot) on `device`."""

    def __init__(
        self, plan: MergePlan, sources: dict[str, MappedCheckpoint], device: torch.device, seed: int
    ) -> None:
        self.plan = plan
        self.sources = sources
        self.device = device
        self.seed = seed

    def ranges(self, kp: KeyPlan) -> list[tuple[int, int]]:
        """The ranges a key is merged in, LoRAs or not (random methods draw per range: a LoRA must
        not change the merge it is added to)."""
        return chunk_ranges(self.plan.method, kp.key, numel_of(kp.shape), self.plan.arch.conv_in)

    def with_loras(self, kp: KeyPlan, held: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """A key LoRA modules modify: its merged (or copied) value in fp32, shaped as planned, plus
        strength × ΔW of each module in order (a DoRA module rescales what is there by then).
        `held` as for `merged`: inputs' flat tensors already in memory (a copied key's too)."""
        copied = self.plan.copied_from(kp)
        if copied is not None:
            slot, key = copied
            source = held[slot] if held and slot in held and key == kp.key else self.sources[slot].get(key)
            value = source.to(device=self.device, dtype=torch.float32, copy=True)
        else:
            value = self.merged(kp, held=held)
        value = value.reshape(kp.shape)
        for module in self.plan.loras[kp.key]:
            factors, alpha = module_factors(self.sources[module.slot], module, self.device)
            rows = module.target.rows
            part = value if rows is None else value[rows[0] : rows[1]]
            if _plain_low_rank(module.algorithm, factors):
                # up @ down added in place (addmm_): no ΔW of the tensor's size is ever allocated.
                # The same value as lora_delta's, which the tests compare against the formula.
                down, up = factors["lora_down.weight"].float(), factors["lora_up.weight"].float()
                rank = down.shape[0]
                scale = module.strength * ((alpha / rank) if alpha else 1.0)
                part.view(part.shape[0], -1).addmm_(
                    up.reshape(up.shape[0], rank), down.reshape(rank, -1), alpha=scale
                )
                continue
            delta = lora_delta(
                module.algorithm,
                factors,
                tuple(part.shape),
                alpha=alpha,
                base=part if "dora_scale" in factors else None,
            )
            part += module.strength * delta  # in place: `part` is `value` or a view of its rows
        return value

    def lerp_in_place(self, kp: KeyPlan) -> bool:
        """A method that is torch.lerp, of A and B stored in the output dtype, on the CPU: the result
        can be computed from the stored views without fp32 copies (see stream_merge's `_lerp`)."""
        if not self.plan.method.lerp or self.device.type != "cpu" or "c" in self.sources:
            return False
        return all(self.sources[s].header.tensors[kp.key].dtype == kp.dtype for s in ("a", "b"))

    def channels_differ(self, key: str) -> bool:
        """Whether the inputs' shapes of `key` differ: the plan allows that only for conv_in."""
        if key != self.plan.arch.conv_in:
            return False
        shapes = {
            src.header.tensors[key].shape
            for slot, src in self.sources.items()
            if slot in MERGE_SLOTS and key in src.header.tensors
        }
        return len(shapes) > 1

    def merge_range(self, kp: KeyPlan, start: int, stop: int, load: RangeLoader) -> torch.Tensor:
        """The fp32 result of elements [start, stop) of a merged key."""
        a, b, c = (load(slot, kp.key, start, stop) for slot in MERGE_SLOTS)
        return self._apply(kp, a, b, c, start)

    def merge_shared_channels(self, kp: KeyPlan) -> torch.Tensor:
        """conv_in of an inpainting model (9 input channels) with a normal one (4), in fp32: the
        shared channels merge, A's others stay."""
        tensors = {
            s: src.get(kp.key)
            for s, src in self.sources.items()
            if s in MERGE_SLOTS and kp.key in src.header.tensors
        }
        shared = min(t.shape[1] for t in tensors.values())
        result = tensors["a"].to(device=self.device, dtype=torch.float32, copy=True)
        parts = {
            s: t[:, :shared].to(device=self.device, dtype=torch.float32, copy=True)
            for s, t in tensors.items()
        }
        result[:, :shared] = self._apply(kp, parts["a"], parts["b"], parts.get("c"), 0)
        return result

    def merged(self, kp: KeyPlan, held: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """A whole merged key in fp32, shaped as planned, computed range by range like a written
        merge. `held` gives inputs' flat tensors already in memory (exactly the files' values)."""
        if self.channels_differ(kp.key):
            return self.merge_shared_channels(kp)
        flat = {
            slot: src.get(kp.key).reshape(-1)
            for slot, src in self.sources.items()
            if slot in MERGE_SLOTS and kp.key in src.header.tensors
        }
        flat.update(held or {})

        def load(slot: str, key: str, start: int, stop: int) -> torch.Tensor | None:
            tensor = flat.get(slot)
            if tensor is None:
                return None
            return tensor[start:stop].to(device=self.device, dtype=torch.float32, copy=True)

        out = torch.empty(numel_of(kp.shape), dtype=torch.float32, device=self.device)
        for start, stop in self.ranges(kp):
            out[start:stop] = self.merge_range(kp, start, stop, load)
        return out.reshape(kp.shape)

    def _apply(self, kp: KeyPlan, a, b, c, start: int) -> torch.Tensor:
        return self.plan.method.fn(a, b, c, kp.alpha, kp.beta, chunk_rng(self.seed, kp.key, start))


def numel_of(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
