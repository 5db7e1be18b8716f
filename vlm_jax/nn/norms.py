"""LayerNorm and RMSNorm with transformers' rounding behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.named_scope("norm")
def layer_norm(x: jax.Array, params: dict, eps: float) -> jax.Array:
    """LayerNorm over the last axis. x [..., D]; params {'scale' [D], 'bias' [D]}.

    Statistics and the affine map are computed in (at least) float32 and rounded once, like
    torch.nn.functional.layer_norm on bf16 inputs.
    """
    compute = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(compute)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * params["scale"].astype(compute) + params["bias"].astype(compute)
    return y.astype(x.dtype)


@jax.named_scope("norm")
def rms_norm(x: jax.Array, params: dict, eps: float) -> jax.Array:
    """Llama RMSNorm. x [..., D]; params {'scale' [D]}.

    Normalised in float32, rounded to x's dtype, then multiplied by the weight: the order
    transformers' LlamaRMSNorm uses (it matters in bf16).
    """
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return params["scale"] * y
