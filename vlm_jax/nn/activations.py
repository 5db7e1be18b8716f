"""Activation functions under transformers' ACT2FN names.

Each is evaluated in at least float32 and cast back, as PyTorch's CPU/GPU kernels do for
bf16/fp16 inputs, so low-precision runs round the same way as transformers (float64 stays
float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _in_f32(fn):
    def wrapped(x):
        return fn(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(x.dtype)

    return wrapped


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": _in_f32(lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_python": _in_f32(lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_new": _in_f32(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu_pytorch_tanh": _in_f32(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu_fast": _in_f32(lambda x: jax.nn.gelu(x, approximate=True)),
    "quick_gelu": _in_f32(_quick_gelu),
    "silu": _in_f32(jax.nn.silu),
    "swish": _in_f32(jax.nn.silu),
    "relu": jax.nn.relu,
    "tanh": _in_f32(jnp.tanh),
}


def activation(name: str):
    """The activation called `name` in transformers (KeyError lists the supported ones)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise KeyError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None
