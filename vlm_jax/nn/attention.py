"""Scaled dot-product attention with grouped-query heads, in two interchangeable paths.

* explicit: scores, float32 softmax, weighted sum; can return the pattern [B, H, T, S] and
  is the path where attention edges can be edited;
* fused: jax.nn.dot_product_attention (cuDNN flash attention on GPU), used when nothing
  needs the pattern.

Both follow transformers' eager attention numerics (scores in the activation dtype, scaled,
plus the additive mask, softmax in float32, rounded back before the weighted sum) and agree
to float32 rounding. Masks are additive biases (0 or the dtype's minimum, as transformers
builds them): besides matching its numerics this keeps the softmax fusible (a select inside
the softmax was 4x slower on CPU).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def default_fused_attention() -> bool:
    """Whether `fused_attention=None` means fused: the fused kernels (cuDNN flash attention,
    the TPU kernel) pay off on accelerators; on CPU the explicit path is faster."""
    return jax.default_backend() in ("gpu", "tpu")


def resolve_fused(fused_attention: bool | None) -> bool:
    """None -> default_fused_attention(); True/False as given."""
    return default_fused_attention() if fused_attention is None else bool(fused_attention)


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


def mask_to_bias(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Boolean mask -> additive bias (0 where allowed, the dtype's minimum elsewhere)."""
    return jnp.where(mask, 0.0, jnp.finfo(dtype).min).astype(dtype)


def _scores_softmax(qg, k, v, scale, bias, score_edit, want_pattern):
    """qg [B, K, G, T, E], k/v [B, K, S, E] -> out [B, K, G, T, E], probs or None."""
    scores = jnp.einsum("bkgte,bkse->bkgts", qg, k) * jnp.asarray(scale, qg.dtype)
    scores = scores.astype(jnp.promote_types(qg.dtype, jnp.float32))
    edit_probs = None
    if score_edit is not None:
        scores, edit_probs = score_edit(scores)
    if bias is not None:
        scores = scores + bias[:, :, None].astype(scores.dtype)  # [B, 1, 1, T, S]
        if score_edit is not None:  # an edge both blocked and masked must not overflow to -inf
            scores = jnp.maximum(scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(qg.dtype)
    if edit_probs is not None:
        probs = edit_probs(probs)
    return jnp.einsum("bkgts,bkse->bkgte", probs, v), (probs if want_pattern else None)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    bias: jax.Array | None = None,
    return_pattern: bool = False,
    fused: bool = False,
    score_edit: Callable | None = None,
    causal_block: int | None = None,
):
    """Multi-head attention.

    Args:
      q: [B, T, H, E] queries; k, v: [B, S, K, E] keys/values with K dividing H (GQA: query
        head h reads kv head h // (H // K), as transformers' repeat_kv).
      scale: multiplier of q.k (usually E ** -0.5).
      bias: additive mask, broadcastable to [B, 1, T, S] (see mask_to_bias). None = no mask.
      return_pattern: also return the softmax pattern [B, H, T, S] (explicit path only).
      fused: use jax.nn.dot_product_attention (no pattern, no score edit).
      score_edit: fn(scores [B, K, G, T, S] float32) -> (scores, fn(probs) -> probs): edits of
        attention edges before and after the softmax (explicit path only).
      causal_block: when the mask is causal and T == S, process queries in blocks of this size
        against the keys up to the block's end only (the keys after it are masked anyway):
        about half the work, and a working set that stays in cache.

    Returns:
      out [B, T, H, E] and the pattern (or None).
    """
    batch, t_len, n_heads, head_dim = q.shape
    n_kv, s_len = k.shape[2], k.shape[1]
    if fused:
        if return_pattern or score_edit is not None:
            raise ValueError("the fused attention path cannot return the pattern or edit attention edges")
        out = jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype), scale=scale)
        return out.astype(q.dtype), None

    groups = n_heads // n_kv
    qg = q.reshape(batch, t_len, n_kv, groups, head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, E]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, E]
    blocked = (causal_block is not None and t_len == s_len and t_len > causal_block
               and score_edit is None and not return_pattern)
    if not blocked:
        out, probs = _scores_softmax(qg, kt, vt, scale, bias, score_edit, return_pattern)
    else:
        def causal_blocks(qg, kt, vt, bias):
            outs = []
            for start in range(0, t_len, causal_block):
                end = min(start + causal_block, t_len)
                block_bias = None if bias is None else bias[..., start:end, :end]
                out_block, _ = _scores_softmax(qg[:, :, :, start:end], kt[:, :, :end], vt[:, :, :end], scale,
                                               block_bias, None, False)
                outs.append(out_block)
            return jnp.concatenate(outs, axis=3)

        if batch == 1:
            out = causal_blocks(qg, kt, vt, bias)
        else:  # one sequence at a time keeps the blocks' scores in cache (2x faster on CPU at B=4)
            full_bias = None if bias is None else jnp.broadcast_to(bias, (batch, *bias.shape[1:]))
            out = jax.lax.map(lambda x: causal_blocks(*(None if a is None else a[None] for a in x))[0],
                              (qg, kt, vt, full_bias))
        probs = None
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, t_len, n_heads, head_dim)
    pattern = probs.reshape(batch, n_heads, t_len, s_len) if probs is not None else None
    return out, pattern
