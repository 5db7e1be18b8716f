"""Device meshes and partition rules: the whole model, sharded with JAX's own machinery.

A mesh has three axes:

    data    pure data parallelism (parameters replicated, batch split)
    fsdp    fully sharded data parallelism (batch split, parameters split on their width)
    tensor  tensor (Megatron-style) parallelism (heads, MLP width and vocabulary split)

Parameters carry logical axis names (vlm_jax.models.params.ParamSpec.axes: 'layers',
'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'vocab', 'vision_embed', ...). A rule table
maps each logical name to a mesh axis, so the model code never mentions devices:

    plan = vj.sharding.ShardingPlan(vj.sharding.make_mesh(fsdp=4, tensor=2))
    model = vj.load("llava-hf/llava-1.5-13b-hf", dtype=jnp.bfloat16, sharding=plan)
    out = model.run(batch, capture=("text.resid_post",))     # runs sharded; same API

Activations are constrained with the same vocabulary (`constrain(x, ("batch", "length",
"act_embed"))`) inside the model; that is a no-op unless a mesh is set with jax.set_mesh,
which every sharded Model method does (and which is part of jit's cache key, so sharded and
unsharded traces never mix). A dimension that the mesh axis does not divide is replicated
instead (e.g. 8 KV heads on tensor=16); `plan.describe(config)` lists every such fallback.

Multi-host (TPU pods): call `initialize_distributed()` (jax.distributed.initialize) first
in every process; `jax.devices()` then spans all hosts, the mesh is built over all of them,
and loading reads on each host only the tensors its own devices hold. See docs/sharding.md.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical parameter axis -> mesh axis (None: replicated). First matching rule wins.
DEFAULT_PARAM_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("head_dim", None),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("projector_mlp", "tensor"),
    # LoRA ranks and soft-prompt rows are small: replicated
    ("lora_rank", None),
)

# logical activation axis -> mesh axes. Activations are split over the batch on data and
# fsdp, and over heads / MLP width / vocabulary on tensor (matching the parameter rules).
ACTIVATION_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all, across hosts).

    data=None takes whatever the other two leave: make_mesh(fsdp=4) on 8 devices is 2x4x1.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or tensor < 1 or (data is not None and data < 1):
        raise ValueError(f"mesh axis sizes must be >= 1 (got data={data}, fsdp={fsdp}, tensor={tensor})")
    if data is None:
        if n % (fsdp * tensor):
            raise ValueError(f"{n} devices cannot be split into fsdp={fsdp} x tensor={tensor}. "
                             f"Fix: choose fsdp*tensor dividing {n}.")
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, "
                         f"but {n} are available. Fix: make the product {n} (or pass devices=...).")
    # Auto axes: GSPMD propagates shardings between the constraints we place.
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _axis_size(mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh,
             rules: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> tuple[PartitionSpec, list[str]]:
    """PartitionSpec for one array with logical `axes`, plus the reasons for any fallback.

    A mesh axis is used at most once per array, and only on a dimension it divides; otherwise
    that dimension is replicated (and the reason is reported).
    """
    table = dict(rules) if not isinstance(rules, Mapping) else rules
    used: set[str] = set()
    parts, notes = [], []
    for dim, name in zip(shape, axes):
        target = table.get(name) if name is not None else None
        if target is None:
            parts.append(None)
            continue
        target = (target,) if isinstance(target, str) else tuple(target)
        target = tuple(a for a in target if a in mesh.shape and mesh.shape[a] > 1)
        if not target:
            parts.append(None)
            continue
        if used & set(target):
            notes.append(f"'{name}' replicated: mesh axis {target} already splits another dimension")
            parts.append(None)
            continue
        size = _axis_size(mesh, target)
        if dim % size:
            notes.append(f"'{name}' ({dim}) replicated: not divisible by {'x'.join(target)}={size}")
            parts.append(None)
            continue
        used |= set(target)
        parts.append(target[0] if len(target) == 1 else target)
    return PartitionSpec(*parts), notes


def _current_mesh():
    """The abstract mesh set by jax.set_mesh when it has our ('data', 'fsdp', 'tensor') axes,
    else None (unsharded runs, or a mesh of someone else's making)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def splits(axis: str) -> bool:
    """Whether the current mesh (jax.set_mesh) splits the logical activation `axis` over more
    than one device. False outside a mesh."""
    mesh = _current_mesh()
    return mesh is not None and math.prod(mesh.shape[a] for a in ACTIVATION_RULES.get(axis) or ()) > 1


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pins activation `x` to the shards its logical `axes` name, under the current mesh.

    A no-op outside `jax.set_mesh` (unsharded runs trace exactly as before).
    """
    mesh = _current_mesh()
    if mesh is None:
        return x
    spec, _ = spec_for(x.shape, axes, mesh, ACTIVATION_RULES)
    return jax.lax.with_sharding_constraint(x, spec)


@dataclass(frozen=True)
class ShardingPlan:
    """A mesh and the rule table that places every parameter on it."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...] = DEFAULT_PARAM_RULES
    warn: bool = field(default=True, compare=False)

    # -- parameters ----------------------------------------------------------------------------
    def param_specs(self, config) -> dict:
        """Tree (like the params) of PartitionSpec, from the config's logical axes."""
        from vlm_jax.models import llava
        from vlm_jax.models.params import is_spec

        specs = llava.param_specs(config)
        return jax.tree.map(lambda s: spec_for(s.shape, s.axes, self.mesh, self.rules)[0], specs, is_leaf=is_spec)

    def param_shardings(self, config) -> dict:
        """Tree of NamedSharding for `config`'s parameters."""
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self.param_specs(config),
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    def shardings_like(self, params: dict, config) -> dict:
        """NamedShardings for a parameter tree, nested or flat (keys 'a/b/c' or path tuples, as
        the trainer splits it), that may hold extra leaves (LoRA factors, a soft prompt):
        known parameters follow the rules, LoRA factors their kernel, the rest is replicated."""
        known = self.param_shardings(config)
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def pick(path, leaf):
            names = _path_names(path)
            node = known
            for name in names:
                if not isinstance(node, dict) or name not in node:
                    return _lora_sharding(names, leaf, known, self.mesh) or replicated
                node = node[name]
            return node if isinstance(node, NamedSharding) else replicated

        return jax.tree_util.tree_map_with_path(pick, params)

    def describe(self, config) -> str:
        """One line per parameter: its logical axes, spec, and any replication fallback."""
        from vlm_jax.models import llava
        from vlm_jax.models.params import flatten

        lines = [f"mesh {dict(self.mesh.shape)}"]
        for path, s in flatten(llava.param_specs(config)).items():
            spec, notes = spec_for(s.shape, s.axes, self.mesh, self.rules)
            note = f"   ! {'; '.join(notes)}" if notes else ""
            lines.append(f"{'.'.join(path)}: {s.shape} {s.axes} -> {tuple(spec)}{note}")
        return "\n".join(lines)

    def fallbacks(self, config) -> list[str]:
        from vlm_jax.models import llava
        from vlm_jax.models.params import flatten

        out = []
        for path, s in flatten(llava.param_specs(config)).items():
            out += [f"{'.'.join(path)}: {n}" for n in spec_for(s.shape, s.axes, self.mesh, self.rules)[1]]
        return out

    def shard_params(self, params: dict, config) -> dict:
        """Moves an in-memory parameter tree onto the mesh (each device gets its shard)."""
        return jax.device_put(params, self.shardings_like(params, config))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    # -- inputs --------------------------------------------------------------------------------
    @property
    def batch_axes(self) -> tuple[str, ...]:
        return tuple(a for a in ACTIVATION_RULES["batch"] if self.mesh.shape[a] > 1)

    def batch_sharding(self, array_shape: Sequence[int], batch_axis: int = 0) -> NamedSharding:
        """Split dimension `batch_axis` over (data, fsdp) when it divides evenly; else replicate."""
        axes = self.batch_axes
        if not axes or len(array_shape) <= batch_axis or array_shape[batch_axis] % _axis_size(self.mesh, axes):
            if axes and len(array_shape) > batch_axis and self.warn:
                warnings.warn(
                    f"batch dimension {array_shape[batch_axis]} is not divisible by data x fsdp = "
                    f"{_axis_size(self.mesh, axes)}, so it is replicated on every device (correct but "
                    "slower). Fix: use batch sizes that are multiples of it.", stacklevel=3)
            return NamedSharding(self.mesh, PartitionSpec())
        spec = axes[0] if len(axes) == 1 else axes
        return NamedSharding(self.mesh, PartitionSpec(*([None] * batch_axis), spec))

    def place_batch(self, arrays: Mapping[str, Any], batch_axis: int = 0) -> dict:
        """device_put every input array with its batch dimension split over data x fsdp."""
        return {k: (jax.device_put(v, self.batch_sharding(np.shape(v), batch_axis)) if v is not None else None)
                for k, v in arrays.items()}

    def context(self):
        """The mesh context sharded computations trace under (jax.set_mesh)."""
        return jax.set_mesh(self.mesh)


def _path_names(path) -> list:
    """Parameter names along a pytree path; 'a/b' string keys and tuple keys are expanded."""
    names = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", None)))
        if isinstance(key, tuple):
            names.extend(key)
        elif isinstance(key, str) and "/" in key:
            names.extend(key.split("/"))
        else:
            names.append(key)
    return names


def _lora_sharding(names: list, leaf, known: dict, mesh) -> NamedSharding | None:
    """LoRA factors follow their kernel: A [L?, in..., r] takes the kernel's input-side spec
    and B [L?, r, out...] its output side, so the low-rank product adds no communication."""
    if not names or names[-1] not in ("lora_a", "lora_b"):
        return None
    node = known
    for name in names[:-1]:
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    kernel = node.get("kernel") if isinstance(node, dict) else None
    if kernel is None:
        return None
    kspec = tuple(kernel.spec)
    n_lead = 1 if "layers" in names else 0
    n_factor = len(leaf.shape) - 1 - n_lead  # input dims of A, or output dims of B
    if names[-1] == "lora_a":
        parts = kspec[:n_lead] + kspec[n_lead:n_lead + n_factor] + (None,)
    else:
        parts = kspec[:n_lead] + (None,) + kspec[len(kspec) - n_factor:]
    return NamedSharding(mesh, PartitionSpec(*parts))


def as_plan(sharding) -> ShardingPlan | None:
    """Accepts None, a ShardingPlan, or a Mesh (default rules)."""
    if sharding is None or isinstance(sharding, ShardingPlan):
        return sharding
    if isinstance(sharding, Mesh):
        missing = set(MESH_AXES) - set(sharding.axis_names)
        if missing:
            raise ValueError(f"the mesh needs axes {MESH_AXES} (missing {sorted(missing)}). "
                             "Fix: build it with vlm_jax.sharding.make_mesh(data=, fsdp=, tensor=).")
        return ShardingPlan(sharding)
    raise TypeError(f"sharding must be a ShardingPlan or a jax Mesh, not {type(sharding).__name__}")


def parse_mesh(text: str) -> ShardingPlan:
    """'fsdp=4,tensor=2' (data takes the remaining devices) -> ShardingPlan with default rules."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.isdigit():
            raise ValueError(f"bad mesh spec {text!r}: write e.g. 'data=2,fsdp=2,tensor=2' "
                             f"(axes {', '.join(MESH_AXES)}; unnamed data takes the remaining devices)")
        sizes[name] = int(value)
    return ShardingPlan(make_mesh(sizes.get("data"), sizes.get("fsdp", 1), sizes.get("tensor", 1)))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs) -> None:
    """jax.distributed.initialize for multi-host runs (call once per process, before any
    other JAX call). On Cloud TPU VMs every argument is discovered automatically."""
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)


def mesh_context(plan: ShardingPlan | None):
    return plan.context() if plan is not None else contextlib.nullcontext()
