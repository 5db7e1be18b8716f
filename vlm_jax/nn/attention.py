"""Scaled dot-product attention with grouped-query heads, in two interchangeable paths.

* explicit: scores, float32 softmax, weighted sum; can return the pattern [B, H, T, S] and
  is the path where attention edges can be edited;
* fused: jax.nn.dot_product_attention (cuDNN flash attention on GPU), used when nothing
  needs the pattern.

Both follow transformers' eager attention numerics (scores in the activation dtype, scaled,
masked, softmax in float32, rounded back before the weighted sum) and agree to float32
rounding.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def causal_mask(
    key_valid: jax.Array, query_index: jax.Array, key_index: jax.Array, window: int | None = None
) -> jax.Array:
    """Boolean mask [B, 1, T, S]: key s is visible to query t.

    key_valid [B, S] (False for padding), query_index [T] and key_index [S] are slot indices in
    the sequence (not position ids), as in transformers' create_causal_mask; `window` adds
    the sliding-window rule key > query - window.
    """
    allowed = key_index[None, :] <= query_index[:, None]
    if window is not None:
        allowed = allowed & (key_index[None, :] > query_index[:, None] - window)
    return allowed[None, None] & key_valid[:, None, None, :].astype(bool)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    mask: jax.Array | None = None,
    return_pattern: bool = False,
    fused: bool = False,
    score_edit: Callable | None = None,
):
    """Multi-head attention.

    Args:
      q: [B, T, H, E] queries; k, v: [B, S, K, E] keys/values with K dividing H (GQA: query
        head h reads kv head h // (H // K), as transformers' repeat_kv).
      scale: multiplier of q.k (usually E ** -0.5).
      mask: boolean, broadcastable to [B, H, T, S]; True = may attend. None = attend to all.
      return_pattern: also return the softmax pattern [B, H, T, S] (explicit path only).
      fused: use jax.nn.dot_product_attention (no pattern, no score edit).
      score_edit: fn(scores [B, K, G, T, S] float32) -> (scores, fn(probs) -> probs): edits of
        attention edges before and after the softmax (explicit path only).

    Returns:
      out [B, T, H, E] and the pattern (or None).
    """
    batch, t_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    if fused:
        if return_pattern or score_edit is not None:
            raise ValueError("the fused attention path cannot return the pattern or edit attention edges")
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
        return out.astype(q.dtype), None

    groups = n_heads // n_kv
    qg = q.reshape(batch, t_len, n_kv, groups, head_dim)
    scores = jnp.einsum("btkge,bske->bkgts", qg, k) * jnp.asarray(scale, q.dtype)
    scores = scores.astype(jnp.promote_types(q.dtype, jnp.float32))
    edit_probs = None
    if score_edit is not None:
        scores, edit_probs = score_edit(scores)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (mask.shape[0], n_heads) + scores.shape[-2:])
        mask = mask.reshape(mask.shape[0], n_kv, groups, *scores.shape[-2:])
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [B, K, G, T, S]
    if edit_probs is not None:
        probs = edit_probs(probs)
    out = jnp.einsum("bkgts,bske->btkge", probs, v).reshape(batch, t_len, n_heads, head_dim)
    pattern = probs.reshape(batch, n_heads, *probs.shape[-2:]) if return_pattern else None
    return out, pattern
