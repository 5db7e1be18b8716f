"""LoRA adapters: low-rank updates next to chosen projection kernels, in either tower.

A target kernel W ([in..., out...], stacked over layers) gets lora_a [L, in..., r] (random,
std 1/r as in PEFT's default init scale) and lora_b [L, r, out...] (zeros), so the adapted
model starts exactly equal to the base model; the forward pass adds (x A) B * alpha / r
(vlm_jax.models.layers), and only A and B train. `merge_lora` folds the update into W for
export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from vlm_jax.models import params as P

# projection names per tower (the kernels a LoRA can adapt)
LORA_TARGETS = {
    "text": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj"),
    "projector": ("linear_1", "linear_2"),
}
_TOWER_ROOT = {"text": "language_model", "vision": "vision_tower", "projector": "multi_modal_projector"}


class UnknownParametersError(ValueError):
    """A parameter subset or LoRA target that the model does not have."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    towers: tuple[str, ...] = ("text",)
    init_seed: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _n_input_axes(path: tuple) -> int:
    """How many of a kernel's (non-layer) axes are inputs: o_proj/out_proj [H, E, D] have 2;
    q/k/v [D, H, E] and dense [in, out] kernels have 1."""
    return 2 if path[-2] in ("o_proj", "out_proj") else 1


def _split(path: tuple, kernel) -> tuple[tuple, tuple, tuple]:
    """(layer axes, input axes, output axes) of a target kernel's shape."""
    stacked = path[0] in ("language_model", "vision_tower") and "layers" in path
    lead = kernel.shape[:1] if stacked else ()
    axes = kernel.shape[len(lead):]
    n_in = _n_input_axes(path)
    return lead, axes[:n_in], axes[n_in:]


def target_paths(params: dict, config: LoraConfig) -> list[tuple]:
    """Kernel paths a LoRA config adapts (error listing the valid names if a target is unknown)."""
    for tower in config.towers:
        if tower not in LORA_TARGETS:
            raise UnknownParametersError(f"LoRA tower {tower!r} does not exist; choose from {sorted(LORA_TARGETS)}")
    valid = sorted({t for tower in config.towers for t in LORA_TARGETS[tower]})
    unknown = [t for t in config.targets if t not in valid]
    if unknown:
        raise UnknownParametersError(f"LoRA target(s) {unknown} do not exist in towers {list(config.towers)}; "
                                     f"valid targets: {valid}")
    if config.rank < 1:
        raise UnknownParametersError("LoRA rank must be >= 1")
    roots = {_TOWER_ROOT[t] for t in config.towers}
    paths = [path for path in P.flatten(params)
             if path[0] in roots and path[-1] == "kernel" and len(path) >= 2 and path[-2] in config.targets]
    if not paths:
        raise UnknownParametersError(f"no kernel named {list(config.targets)} in towers {list(config.towers)}")
    return sorted(paths)


def add_lora(params: dict, config: LoraConfig) -> tuple[dict, list[tuple]]:
    """params with lora_a / lora_b / lora_scale next to every target kernel; the trainable paths."""
    flat = P.flatten(params)
    key = jax.random.key(config.init_seed)
    trainable = []
    for path in target_paths(params, config):
        kernel = flat[path]
        lead, in_shape, out_shape = _split(path, kernel)
        key, sub = jax.random.split(key)
        base = path[:-1]
        flat[base + ("lora_a",)] = (jax.random.normal(sub, (*lead, *in_shape, config.rank), jnp.float32)
                                    / config.rank).astype(kernel.dtype)
        flat[base + ("lora_b",)] = jnp.zeros((*lead, config.rank, *out_shape), kernel.dtype)
        flat[base + ("lora_scale",)] = jnp.full(lead, config.scale, kernel.dtype)
        trainable += [base + ("lora_a",), base + ("lora_b",)]
    return P.unflatten(flat), trainable


def lora_parameter_count(params: dict, config: LoraConfig) -> int:
    """rank * (in + out) per target kernel and layer: the trainable size of a LoRA."""
    flat = P.flatten(params)
    total = 0
    for path in target_paths(params, config):
        lead, in_shape, out_shape = _split(path, flat[path])
        total += math.prod(lead) * config.rank * (math.prod(in_shape) + math.prod(out_shape))
    return total


def merge_lora(params: dict) -> dict:
    """Folds every LoRA update (x A) B * scale into its kernel and removes the adapter leaves."""
    flat = P.flatten(params)
    out = {}
    for path, value in flat.items():
        if path[-1] in ("lora_a", "lora_b", "lora_scale"):
            continue
        base = path[:-1]
        if path[-1] == "kernel" and base + ("lora_a",) in flat:
            lead, in_shape, out_shape = _split(path, value)
            a = flat[base + ("lora_a",)].astype(jnp.float32).reshape(*lead, math.prod(in_shape), -1)
            b = flat[base + ("lora_b",)].astype(jnp.float32).reshape(*lead, -1, math.prod(out_shape))
            scale = flat[base + ("lora_scale",)].astype(jnp.float32)
            delta = jnp.einsum("...ir,...ro->...io", a, b) * scale[..., None, None]
            value = (value.astype(jnp.float32) + delta.reshape(value.shape)).astype(value.dtype)
        out[path] = value
    return P.unflatten(out)
