"""Building blocks shared by the vision tower and the text decoder.

`scan_layers` runs a stack of identical layers with lax.scan over their stacked parameters:
compile time stays flat in depth, and whatever a layer reports (captured activations,
updated caches) comes out stacked with a leading layer axis. `unrolled_layers` runs the same
layer function over per-layer parameters in a Python loop (decoding, where lax.scan's slicing
of the stack costs a weight copy per layer and step).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from vlm_jax.errors import SettingError
from vlm_jax.nn import decode_matmul
from vlm_jax.nn.activations import activation
from vlm_jax.nn.attention import ATTENTION_RESIDUALS
from vlm_jax.nn.low_rank import low_rank_update
from vlm_jax.sharding import constrain


def _project(x: jax.Array, params: dict, n_in: int) -> jax.Array:
    """x [..., *in] @ kernel [*in, *out] (+ LoRA) (+ bias [*out]) -> [..., *out], where the
    kernel's first n_in axes are the contracted ones.

    Runs as one 2-D product [rows, In] x [In, Out]: contracted over several leading axes
    ([B, T] for a weight gradient), XLA CPU copied both operands transposed before every weight
    gradient; flat, the MLP's gradient at 2 x 601 tokens measured 150 -> 108 ms
    (benchmarks/RESULTS.md).

    The kernel may be one of decode_matmul.KERNEL_FORMS (generate's decode steps on CPU).

    LoRA: A [*in, r] and B [r, *out] (vlm_jax.train.lora adds them next to the kernel) add
    (x A) B * scale (nn/low_rank.py, whose backward forms A's gradient faster on CPU); the frozen
    kernel gets no weight gradient, only A and B do.
    """
    kernel = params["kernel"]
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    lead = x.shape[: x.ndim - n_in]
    rows = x.reshape(-1, math.prod(in_shape))
    if isinstance(kernel, decode_matmul.KERNEL_FORMS):  # decode steps on CPU (generate)
        y = decode_matmul.matmul(rows, kernel)
    else:
        y = rows @ kernel.reshape(rows.shape[1], -1)
    if "lora_a" in params:
        a = params["lora_a"].reshape(rows.shape[1], -1).astype(x.dtype)
        b = params["lora_b"].reshape(a.shape[1], -1).astype(x.dtype)
        y = y + low_rank_update(rows, a, b, params["lora_scale"].astype(x.dtype))
    y = y.reshape(*lead, *out_shape)
    if "bias" in params:
        y = y + params["bias"]
    return y


def linear(x: jax.Array, params: dict) -> jax.Array:
    """x [..., In] @ kernel [In, Out] (+ LoRA) (+ bias [Out])."""
    return _project(x, params, 1)


def project_heads(x: jax.Array, params: dict) -> jax.Array:
    """x [B, T, D] -> [B, T, H, E] with kernel [D, H, E] (+ LoRA) (+ bias [H, E])."""
    return _project(x, params, 1)


def merge_heads(x: jax.Array, params: dict) -> jax.Array:
    """x [B, T, H, E] -> [B, T, D] with kernel [H, E, D] (+ LoRA) (+ bias [D])."""
    return _project(x, params, 2)


@jax.named_scope("mlp")
def gated_mlp(x: jax.Array, params: dict, act: str) -> jax.Array:
    """down(act(gate(x)) * up(x)): Llama's SwiGLU MLP (and DINOv2-giant's)."""
    hidden = activation(act)(linear(x, params["gate_proj"])) * linear(x, params["up_proj"])
    return linear(_constrain_width(hidden), params["down_proj"])


@jax.named_scope("mlp")
def plain_mlp(x: jax.Array, params: dict, act: str) -> jax.Array:
    """fc2(act(fc1(x))): the ViT MLP."""
    return linear(_constrain_width(activation(act)(linear(x, params["fc1"]))), params["fc2"])


def _constrain_width(hidden: jax.Array) -> jax.Array:
    """The MLP's inner width [B, ..., F] is split on the tensor axis (under a mesh)."""
    return constrain(hidden, ("batch",) + (None,) * (hidden.ndim - 2) + ("act_mlp",))


def scan_layers(
    layer_fn: Callable,
    h: jax.Array,
    stacked_params: dict,
    per_layer: dict | None = None,
    n_layers: int | None = None,
    remat: bool | str = False,
):
    """Applies `layer_fn(params_i, h, per_layer_i, i) -> (h, report)` for i < n_layers; h is the
    scan carry (an array, or a pytree such as (hidden states, key/value cache)).

    stacked_params and per_layer have a leading layer axis; only the first `n_layers`
    entries are used (a vision tower stops at the feature layer). Returns the final h and
    the reports stacked over layers. remat: what each layer keeps for the backward pass
    (remat_policy).
    """
    layer_fn = _rematerialised(layer_fn, remat)
    total = jax.tree.leaves(stacked_params)[0].shape[0]
    n_layers = total if n_layers is None else n_layers
    if n_layers == 0:
        return h, {}
    if n_layers != total:
        stacked_params = jax.tree.map(lambda a: a[:n_layers], stacked_params)
        per_layer = jax.tree.map(lambda a: a[:n_layers], per_layer)

    def body(carry, xs):
        params_i, extra_i, index = xs
        return layer_fn(params_i, carry, extra_i, index)

    xs = (stacked_params, per_layer if per_layer is not None else {}, jnp.arange(n_layers))
    return jax.lax.scan(body, h, xs)


def unrolled_layers(
    layer_fn: Callable,
    h: jax.Array,
    layers: tuple,
    per_layer: dict,
    states: tuple | None = None,
    remat: bool | str = False,
):
    """Applies `layer_fn(params_i, carry, per_layer_i, i) -> (carry, report)` in a Python loop
    over `layers`, a tuple of per-layer parameter trees (nothing is sliced out of a stack: on
    CPU, lax.scan copies each layer's weights out of the stack before its dots read them, which
    doubles the memory traffic of a decode step). The carry is h, or (h, states[i]) with
    per-layer states (key/value caches).

    Returns (h, the reports stacked over layers, the new states as a tuple or None).
    """
    layer_fn = _rematerialised(layer_fn, remat, static_index=True)
    new_states, reports = [], []
    for i, params_i in enumerate(layers):
        extra = jax.tree.map(lambda a, i=i: a[i], per_layer)
        if states is None:
            h, report = layer_fn(params_i, h, extra, i)
        else:
            (h, state), report = layer_fn(params_i, (h, states[i]), extra, i)
            new_states.append(state)
        reports.append(report)
    report = jax.tree.map(lambda *a: jnp.stack(a), *reports) if reports else {}
    return h, report, (None if states is None else tuple(new_states))


# rematerialisation policies by name (remat_policy); True means "full", False / None "none"
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # The weight products are flat 2-D products (_project), so "no batch dims" picks them out.
    # The attention's output and log-sum-exp (named in nn/attention.py) are kept too: without
    # them the backward pass ran the whole attention forward again (3-5% of the CPU model's
    # full and LoRA steps, for 6% more temporary memory).
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS)),
}


def remat_policy(remat: bool | str | None):
    """The jax.checkpoint policy a `remat` setting names, or None (no rematerialisation).

    False / None / "none": every layer keeps all its activations for the backward pass (the
      fastest step, the most memory).
    True / "full": each layer keeps only its input and runs again in the backward pass
      (activation memory ~ one layer; about one more forward pass of work).
    "dots": each layer keeps the outputs of its weight products (q/k/v/o projections, MLP,
      LoRA) and of its attention (output and log-sum-exp, what the blocked attention's backward
      needs), and recomputes the norms and activations from them. The attention's score
      matrices are never kept; the fused attention (jax.nn.dot_product_attention, the default
      on accelerators) is recomputed.
    """
    name = "full" if remat is True else "none" if remat is None or remat is False else remat
    if not isinstance(name, str) or name not in REMAT_POLICIES:
        raise SettingError(f"remat={remat!r} is not a rematerialisation policy: use one of "
                           f"{', '.join(map(repr, REMAT_POLICIES))}, or True ('full') / False ('none')")
    return REMAT_POLICIES[name]


def _rematerialised(layer_fn: Callable, remat: bool | str | None, static_index: bool = False) -> Callable:
    """layer_fn under remat_policy(remat) (itself when that is None); static_index when the layer
    index is a Python int (unrolled layers)."""
    policy = remat_policy(remat)
    if policy is None:
        return layer_fn
    return jax.checkpoint(layer_fn, policy=policy, static_argnums=(3,) if static_index else ())
