"""The low-rank (LoRA) update of a projection, (x A) B s, with its own backward.

Autodiff forms A's gradient as x^T dU, [N, In]^T x [N, r]: a product with r (8) output columns,
which XLA CPU runs at ~15 GFLOP/s (0.63 ms for 1202 tokens x 512 x 8, 16 of them in a LoRA step of
the CPU preset). The same numbers as dU^T x, [r, N] x [N, In], are a few rows times a matrix read
row by row, the decode steps' product: nn/decode_matmul.py's stacked kernel takes 0.05 ms. The
backward here runs that kernel wherever it can (`kernel_usable`: float32 on the CPU backend,
outside a mesh of several devices, the kernel built), else XLA's product. benchmarks/RESULTS.md
has the measurements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.nn import decode_matmul


def kernel_usable(dtype) -> bool:
    """Whether A's gradient runs in the decode kernel, as traced now."""
    return decode_matmul.LIBRARY.usable_for(dtype)


@jax.custom_vjp
def low_rank_update(rows: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """(rows A) B scale: rows [N, In], a [In, r], b [r, Out], scale a scalar -> [N, Out]."""
    return (rows @ a) @ b * scale


def _forward(rows, a, b, scale):
    down = rows @ a  # [N, r]
    return down @ b * scale, (rows, a, b, scale, down)


def _backward(residuals, d_out):
    rows, a, b, scale, down = residuals
    d_down_unscaled = d_out @ b.T  # [N, r]
    d_down = d_down_unscaled * scale
    d_scale = jnp.sum(d_down_unscaled * down).astype(scale.dtype).reshape(scale.shape)
    d_b = (down.T @ d_out) * scale  # [r, Out]: a few rows times d_out, XLA's fast form
    if kernel_usable(rows.dtype):
        d_a = decode_matmul.matmul(d_down.T, decode_matmul.layer_of(rows[None], 0, 1)).T
    else:
        d_a = rows.T @ d_down
    return d_down @ a.T, d_a.astype(a.dtype), d_b.astype(b.dtype), d_scale


low_rank_update.defvjp(_forward, _backward)
