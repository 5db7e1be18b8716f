"""Logit lens: the model's own final norm and unembedding applied to intermediate states.

`logit_lens_topk` maps [L, B, T, D] residuals to the top-k tokens and probabilities per
layer and position without materialising [L, B, T, V]: layers are processed one at a time
inside one compiled call (lax.map), so memory is one layer's logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlm_jax.config import LlavaConfig
from vlm_jax.models import text_decoder


def lens_logits(params: dict, config: LlavaConfig, h: jax.Array) -> jax.Array:
    """Logits [..., V] of residual states h [..., D] (final norm, then unembedding)."""
    lm = params["language_model"]
    return text_decoder.unembed(lm, params.get("lm_head"), text_decoder.final_norm(lm, config.text, h))


@functools.partial(jax.jit, static_argnames=("config", "k"))
def logit_lens_topk(params: dict, config: LlavaConfig, resid: jax.Array, k: int = 5):
    """Top-k token ids and probabilities per layer.

    resid: [L, B, T, D] (e.g. concat of text.embed[None] and text.resid_post).
    Returns ids [L, B, T, k] int32 and probs [L, B, T, k] float32.
    """

    def one_layer(h):
        logits = lens_logits(params, config, h).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_i = jax.lax.top_k(probs, k)
        return top_i.astype(jnp.int32), top_p

    return jax.lax.map(one_layer, resid)
