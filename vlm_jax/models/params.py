"""Parameter specs: the shape, logical axes and initialiser of every parameter.

Each component declares its parameters once (a nested dict of ParamSpec mirroring
transformers' attribute names). From that single declaration come random init, abstract
shapes (jax.eval_shape, no allocation), logical-axis trees for sharding rules, parameter
counts, and the checks the weight loader runs before it reads a byte.

Layout conventions: dense kernels are [in, out] (flax style); attention projections keep the
head axis explicit: q/k/v kernels [D, H, E], output kernels [H, E, D]; parameters of
repeated layers are stacked with a leading layer axis named 'layers'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis name per dimension
    init: str = "normal"  # normal | zeros | ones | constant
    value: float = 0.0  # for init == "constant"

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")

    def stacked(self, n_layers: int) -> "ParamSpec":
        return ParamSpec((n_layers, *self.shape), ("layers", *self.axes), self.init, self.value)


def dense(d_in: int, d_out: int, in_axis: str, out_axis: str, bias: bool) -> dict:
    spec = {"kernel": ParamSpec((d_in, d_out), (in_axis, out_axis))}
    if bias:
        spec["bias"] = ParamSpec((d_out,), (out_axis,), "zeros")
    return spec


def norm(dim: int, axis: str, bias: bool) -> dict:
    spec = {"scale": ParamSpec((dim,), (axis,), "ones")}
    if bias:
        spec["bias"] = ParamSpec((dim,), (axis,), "zeros")
    return spec


def stack(tree: dict, n_layers: int) -> dict:
    return jax.tree.map(lambda s: s.stacked(n_layers), tree, is_leaf=is_spec)


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def init_from_specs(specs: dict, rng: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random parameters for `specs` (normal(0, std) weights, zero biases, unit norms)."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(rng, len(leaves))

    def make(spec: ParamSpec, key):
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "constant":
            return jnp.full(spec.shape, spec.value, dtype)
        return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def abstract_from_specs(specs: dict, dtype=jnp.float32) -> dict:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=is_spec)


def logical_axes_from_specs(specs: dict) -> dict:
    return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


def count(tree: dict) -> int:
    """Number of scalars in a tree of arrays, ShapeDtypeStructs or ParamSpecs."""
    leaves = jax.tree.leaves(tree, is_leaf=is_spec)
    return sum(math.prod(leaf.shape) for leaf in leaves)


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """{path tuple: leaf} for a nested dict (ParamSpec counts as a leaf)."""
    out: dict[tuple, Any] = {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def map_with_path(fn: Callable[[tuple, Any], Any], tree: dict) -> dict:
    return unflatten({path: fn(path, leaf) for path, leaf in flatten(tree).items()})
