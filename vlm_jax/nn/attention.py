"""Scaled dot-product attention with grouped-query heads, in two interchangeable paths.

* explicit: scores, float32 softmax, weighted sum; can return the pattern [B, H, T, S] and
  is the path where attention edges can be edited. Without a pattern, an edit or a cache it
  runs query block by query block (causal blocks skip the keys after them) with a custom,
  flash-style backward (_blocked_attention); on CPU in float32 that forward and backward are
  C++ kernels reading q, k and v where they lie (_kernel_attention, nn/cpu_attention.py);
* fused: used when nothing needs the pattern. On TPU it is the splash-attention kernel
  (nn/tpu_attention.py, which reads the mask's structure instead of the bias); elsewhere
  jax.nn.dot_product_attention, whose forward on GPU is cuDNN's flash kernel and whose gradient
  is XLA's (see fused_forward_kernel).

Both follow transformers' eager attention numerics (scores in the activation dtype, scaled,
plus the additive mask, softmax in float32, rounded back before the weighted sum) and agree
to float32 rounding. Masks are additive biases (0 or the dtype's minimum, as transformers
builds them): besides matching its numerics this keeps the softmax fusible (a select inside
the softmax was 4x slower on CPU).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vlm_jax.nn import cpu_attention, tpu_attention
from vlm_jax.sharding import splits


def default_fused_attention() -> bool:
    """Whether `fused_attention=None` means fused: the fused kernels (cuDNN flash attention on
    GPU, splash attention on TPU: nn/tpu_attention.py) pay off on accelerators; on CPU the
    explicit path is faster."""
    return jax.default_backend() in ("gpu", "tpu")


def fused_forward_kernel(dtype, query_len: int) -> str:
    """'cudnn' or 'xla': the kernel the fused path's forward runs for queries of this dtype and
    length. implementation=None would always mean XLA's materialised softmax, so the kernel is
    picked here: on GPU, bf16/fp16 prompts (T > 1) run cuDNN's flash kernel (68% against 58% MFU
    for the 7B's prefill on an H100, benchmarks/RESULTS.md); single-token decode steps keep XLA's.
    VLM_JAX_FUSED_ATTENTION=xla forces XLA's kernel everywhere.
    """
    use_cudnn = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and query_len > 1
                 and os.environ.get("VLM_JAX_FUSED_ATTENTION", "").lower() != "xla")
    return "cudnn" if use_cudnn else "xla"


def fused_gradient_kernel(forward_kernel: str, query_len: int, key_len: int) -> str:
    """'cudnn' or 'xla': the kernel the fused path's gradient runs. XLA's by default (the measured
    one, see cudnn_forward_xla_gradient). VLM_JAX_FUSED_GRADIENT=cudnn asks for cuDNN's own
    backward where it takes the shapes: after a cuDNN forward, with even query and key lengths
    (its rule for masked attention; the trainer's token buckets are multiples of 64). That
    setting is the experiment for the next GPU run (benchmarks/gpu.py --train-pad-to 64): its
    speed is not measured yet.
    """
    wanted = os.environ.get("VLM_JAX_FUSED_GRADIENT", "").strip().lower()
    if wanted not in ("", "xla", "cudnn"):
        raise ValueError(f"VLM_JAX_FUSED_GRADIENT={wanted!r}: expected 'cudnn', 'xla' or unset")
    even = query_len % 2 == 0 and key_len % 2 == 0
    return "cudnn" if wanted == "cudnn" and forward_kernel == "cudnn" and even else "xla"


def _fused_kernel(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, scale: float) -> jax.Array:
    """jax.nn.dot_product_attention with fused_forward_kernel's kernel; gradients through XLA's
    (cudnn_forward_xla_gradient) unless fused_gradient_kernel picks cuDNN's own."""
    forward = fused_forward_kernel(q.dtype, q.shape[1])
    if forward == "cudnn" and fused_gradient_kernel(forward, q.shape[1], k.shape[1]) == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="cudnn")
    if forward == "cudnn":
        return cudnn_forward_xla_gradient(q, k, v, bias, scale, "cudnn")
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="xla")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def cudnn_forward_xla_gradient(q, k, v, bias, scale: float, forward_implementation: str):
    """Attention computed by `forward_implementation`, differentiated through XLA's kernel.

    cuDNN's backward with a mask has narrower rules than its forward: on an H100 it refused the
    601-token sequences (even lengths only), and whether it builds the mask's gradient is
    unchecked. XLA's backward is the measured one (benchmarks/RESULTS.md: the LoRA and full
    steps). Under grad the forward runs through XLA too, so the saved residuals match its backward.
    """
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=forward_implementation)


def _cudnn_forward_xla_gradient_fwd(q, k, v, bias, scale, forward_implementation):
    return jax.vjp(lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, bias=b, scale=scale, implementation="xla"),
                   q, k, v, bias)


def _cudnn_forward_xla_gradient_bwd(scale, forward_implementation, vjp, cotangent):
    return vjp(cotangent)


cudnn_forward_xla_gradient.defvjp(_cudnn_forward_xla_gradient_fwd, _cudnn_forward_xla_gradient_bwd)


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


# Every product below runs as a 3-D batched matmul: one batch entry per (sequence, kv head), the
# group's queries stacked as rows ("rows" layout [B*K, G*T, E], "heads" layout [B*K, S, E]).
# Measured on XLA CPU against the same contractions written as 5-D einsums (one layer, 601
# tokens, 8 heads, batch 1): causal attention 7.2 -> 5.4 ms, its gradient 21.7 -> 17.2 ms; the
# scale, mask and row max fuse into the score product instead of following a copy of it. The
# whole LLaVA-shaped CPU model's forward went 0.49 -> 0.39-0.41 s.
#
# Under a mesh that splits the kv heads (tensor parallelism), B and K stay separate axes
# ([B, K, G*T, E] and [B, K, S, E]): one axis of B*K split over both the batch's and the heads'
# devices cannot hold a shard of several sequences' heads, so XLA gathered q, k and v over the
# tensor axis in every attention (tests/test_sharding.py counts the gathers). Unsharded, the
# merged form measured 2-5% faster for the whole CPU model's forward.


def merged_heads() -> bool:
    """Whether the products merge the batch and kv-head axes (no mesh splits the kv heads)."""
    return not splits("act_kv_heads")


def _rows(x):
    """[B, K, G, T, E] -> [B*K, G*T, E] (merged_heads) or [B, K, G*T, E]."""
    b, kv, g, t, e = x.shape
    return x.reshape(b * kv, g * t, e) if merged_heads() else x.reshape(b, kv, g * t, e)


def _heads(y):
    """[B, K, S, E] -> [B*K, S, E] (merged_heads) or unchanged."""
    return y.reshape(-1, *y.shape[2:]) if merged_heads() else y


def _row_scores(q_rows, k_heads, scale):
    """float32 (or wider) scores [..., G*T, S] of queries [..., G*T, E] (rows layout) against
    keys [..., S, E] (heads layout) before any edit or mask: the product in the activation
    dtype, scaled, as transformers' eager attention computes it."""
    scores = jnp.einsum("...me,...se->...ms", q_rows, k_heads) * jnp.asarray(scale, q_rows.dtype)
    return scores.astype(jnp.promote_types(q_rows.dtype, jnp.float32))


def _raw_scores(qg, k, scale):
    """_row_scores of qg [B, K, G, T, E] against k [B, K, S, E], as [B, K, G, T, S]."""
    return _row_scores(_rows(qg), _heads(k), scale).reshape(*qg.shape[:4], -1)


def _scores_softmax(qg, k, v, scale, bias, score_edit, want_pattern):
    """qg [B, K, G, T, E], k/v [B, K, S, E] -> out [B, K, G, T, E], probs or None."""
    scores = _raw_scores(qg, k, scale)
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
    out = jnp.einsum("...ms,...se->...me", _rows(probs), _heads(v)).reshape(qg.shape)
    return out, (probs if want_pattern else None)


def _block_scores(q_rows, k_heads, bias_block, scale, kv_heads):
    """float32 scores [..., G*tb, s] of a block of queries (rows layout) against keys
    [..., s, E] (heads layout), as _scores_softmax computes them (without edits), plus the
    block's mask bias_block [B, 1, tb, s] (or None)."""
    scores = _row_scores(q_rows, k_heads, scale)
    if bias_block is None:
        return scores
    # added in a [B, K, G, tb, s] view: a mask broadcast to the rows layout would be materialised
    m, s = scores.shape[-2:]
    tb = bias_block.shape[2]
    view = scores.reshape(-1, kv_heads, m // tb, tb, s) + bias_block[:, :, None].astype(scores.dtype)
    return view.reshape(scores.shape)


def _blocked_attention_forward(qg, kt, vt, bias, scale, block):
    """Attention query block by query block, each block against the keys up to its end: causal
    attention with skipped work when block < T, plain attention over all keys when block >= T
    (the bias does any masking).

    qg [B, K, G, T, E], kt/vt [B, K, T, E], bias [B, 1, T, T] or None. Returns out
    [B, K, G, T, E] and the float32 log-sum-exp of every query's scores [B, K, G, T] (what the
    backward needs to rebuild the probabilities). On CPU in float32, _kernel_attention runs this
    in one fused kernel instead (nn/cpu_attention.py)."""
    batch, kv, groups, t_len, _ = qg.shape
    k_heads, v_heads = _heads(kt), _heads(vt)
    outs, lses = [], []
    for start in range(0, t_len, block):
        end = min(start + block, t_len)
        scores = _block_scores(_rows(qg[:, :, :, start:end]), k_heads[..., :end, :],
                               None if bias is None else bias[:, :, start:end, :end], scale, kv)
        top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        unnormalised = jnp.exp(scores - top)
        total = jnp.sum(unnormalised, axis=-1, keepdims=True)
        probs = (unnormalised / total).astype(qg.dtype)  # as jax.nn.softmax, then the dtype round
        out = jnp.einsum("...ms,...se->...me", probs, v_heads[..., :end, :])
        outs.append(out.reshape(batch, kv, groups, end - start, -1))
        lses.append((top + jnp.log(total)).reshape(batch, kv, groups, end - start))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_attention(qg, kt, vt, bias, scale: float, block: int):
    """_blocked_attention_forward's output [B, K, G, T, E], with a flash-style backward.

    Autodiff through the blocks kept every block's probabilities and took ~4.7x the forward
    for the backward on CPU (batch 2 x 601 tokens); the custom backward rebuilds each block's
    probabilities from the saved log-sum-exp and needs five products per block."""
    return _blocked_attention_forward(qg, kt, vt, bias, scale, block)[0]


# The names of the blocked attention's outputs that its backward needs besides q, k and v:
# a rematerialisation policy that keeps them (layers.REMAT_POLICIES["dots"]) spares the
# backward pass a second attention forward. The TPU kernel names both of its residuals (its
# output and log-sum-exp) with the first.
ATTENTION_RESIDUALS = ("attention_output", "attention_log_sum_exp")


def _blocked_attention_fwd(qg, kt, vt, bias, scale, block):
    out, lse = _blocked_attention_forward(qg, kt, vt, bias, scale, block)
    out, lse = (checkpoint_name(x, name) for x, name in zip((out, lse), ATTENTION_RESIDUALS))
    return out, (qg, kt, vt, bias, out, lse)


def _blocked_attention_bwd(scale, block, residuals, d_out):
    qg, kt, vt, bias, out, lse = residuals
    dtype = qg.dtype
    batch, kv, groups, t_len, _ = qg.shape
    acc = jnp.promote_types(dtype, jnp.float32)
    # D_t = sum_e dO_te O_te = sum_s P_ts dP_ts: the softmax backward's row term
    row_term = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1)  # [B, K, G, T]
    k_heads, v_heads = _heads(kt), _heads(vt)
    d_q, d_k, d_v = [], jnp.zeros(k_heads.shape, acc), jnp.zeros(v_heads.shape, acc)
    for start in range(0, t_len, block):
        end = min(start + block, t_len)
        q_rows, d_out_rows = _rows(qg[:, :, :, start:end]), _rows(d_out[:, :, :, start:end])
        scores = _block_scores(q_rows, k_heads[..., :end, :], None if bias is None else bias[:, :, start:end, :end],
                               scale, kv)
        probs = jnp.exp(scores - lse[:, :, :, start:end].reshape(*q_rows.shape[:-1], 1))  # float32, as the forward
        d_v = d_v.at[..., :end, :].add(jnp.einsum("...ms,...me->...se", probs.astype(dtype), d_out_rows).astype(acc))
        d_probs = jnp.einsum("...me,...se->...ms", d_out_rows, v_heads[..., :end, :]).astype(acc)
        row = row_term[:, :, :, start:end].reshape(*q_rows.shape[:-1], 1)
        d_scores = (probs * (d_probs - row) * scale).astype(dtype)
        d_q.append(jnp.einsum("...ms,...se->...me", d_scores, k_heads[..., :end, :])
                   .reshape(batch, kv, groups, end - start, -1))
        d_k = d_k.at[..., :end, :].add(jnp.einsum("...ms,...me->...se", d_scores, q_rows).astype(acc))
    d_bias = None if bias is None else jnp.zeros_like(bias)  # the mask is a constant
    return (jnp.concatenate(d_q, axis=3), d_k.reshape(kt.shape).astype(kt.dtype),
            d_v.reshape(vt.shape).astype(vt.dtype), d_bias)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _kernel_attention(q, k, v, bias, scale: float, block: int):
    """_blocked_attention on the projections' layout, forward and backward in the CPU kernels
    (nn/cpu_attention.py): q [B, T, K, G, E], k/v [B, T, K, E] -> out [B, T, K, G, E]."""
    return cpu_attention.blocked_attention_forward(q, k, v, bias, scale, block)[0]


def _kernel_attention_fwd(q, k, v, bias, scale, block):
    out, lse = cpu_attention.blocked_attention_forward(q, k, v, bias, scale, block)
    out, lse = (checkpoint_name(x, name) for x, name in zip((out, lse), ATTENTION_RESIDUALS))
    return out, (q, k, v, bias, out, lse)


def _kernel_attention_bwd(scale, block, residuals, d_out):
    q, k, v, bias, out, lse = residuals
    d_q, d_k, d_v = cpu_attention.blocked_attention_backward(q, k, v, bias, out, lse, d_out, scale, block)
    return d_q, d_k, d_v, None if bias is None else jnp.zeros_like(bias)  # the mask is a constant


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


@jax.named_scope("attention")  # names its ops in profiles (benchmarks/profile_step.py)
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
    structure: tpu_attention.MaskStructure | None = None,
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
      structure: the same mask as `bias`, described by its structure, for kernels that build
        their mask themselves (the TPU kernel). With a bias but no structure, the fused path on
        TPU runs XLA's kernel.

    Returns:
      out [B, T, H, E] and the pattern (or None).
    """
    batch, t_len, n_heads, head_dim = q.shape
    n_kv, s_len = k.shape[2], k.shape[1]
    if fused:
        if return_pattern or score_edit is not None:
            raise ValueError("the fused attention path cannot return the pattern or edit attention edges")
        if tpu_attention.usable(t_len, s_len) and (bias is None or structure is not None):
            try:
                return tpu_attention.splash_attention(q, k, v, scale=scale, structure=structure,
                                                      residual_name=ATTENTION_RESIDUALS[0]), None
            except NotImplementedError as error:  # shapes this JAX's kernel refuses (raised while tracing)
                tpu_attention.warn_unsupported(str(error), tuple(q.shape))
        if bias is not None:
            # The kernels take the bias in the activation dtype. float32's minimum overflows to
            # -inf in bfloat16, and a query with every key masked (left padding) then gets NaN,
            # which spreads through the cache: clip to the dtype's own minimum, as eager does.
            bias = jnp.maximum(bias, jnp.finfo(q.dtype).min).astype(q.dtype)
        out = _fused_kernel(q, k, v, bias, scale)
        return out.astype(q.dtype), None

    groups = n_heads // n_kv
    blocked = score_edit is None and not return_pattern and t_len == s_len
    # query blocks against the keys up to each block's end, or one block of all keys
    block = causal_block if causal_block is not None and t_len > causal_block else t_len
    if blocked and cpu_attention.usable(q.dtype, head_dim):  # the fused CPU kernel, on q/k/v as they are
        out = _kernel_attention(q.reshape(batch, t_len, n_kv, groups, head_dim), k, v, bias, float(scale), block)
        return out.reshape(q.shape), None
    qg = q.reshape(batch, t_len, n_kv, groups, head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, E]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, E]
    if not blocked:  # the explicit softmax
        out, probs = _scores_softmax(qg, kt, vt, scale, bias, score_edit, return_pattern)
    else:
        if block == t_len or batch == 1:
            out = _blocked_attention(qg, kt, vt, bias, float(scale), block)
        else:  # one sequence at a time keeps the blocks' scores in cache (2x faster on CPU at B=4)
            full_bias = None if bias is None else jnp.broadcast_to(bias, (batch, *bias.shape[1:]))
            out = jax.lax.map(
                lambda x: _blocked_attention(*(None if a is None else a[None] for a in x), float(scale), block)[0],
                (qg, kt, vt, full_bias))
        probs = None
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, t_len, n_heads, head_dim)
    pattern = probs.reshape(batch, n_heads, t_len, s_len) if probs is not None else None
    return out, pattern
