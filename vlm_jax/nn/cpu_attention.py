"""The blocked attention on CPU as fused C++ kernels, forward and backward
(vlm_jax/native/blocked_attention.cc).

XLA CPU runs the blocked attention (nn/attention.py) as a score product per query block, a softmax
fusion and a second product, writing each block's scores out and reading them back; its products
there reach about 27 GFLOP/s per thread, its backward's five products about as much. The kernels
work on a few query rows at a time, scores, mask, softmax (or its gradient) and products without
leaving L1, and read the projections where they are (no transposes around them). They are
attention._kernel_attention's forward and backward wherever `usable` says so: float32 on the CPU
backend, outside a mesh of several devices (the kernels are not partitioned), head sizes a
multiple of 8, and kernels that could be built (`VLM_JAX_CPU_KERNELS=0` turns them off).
benchmarks/RESULTS.md has the measurements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.native.build import CpuKernelLibrary

LIBRARY = CpuKernelLibrary("blocked_attention", {"vlm_jax_blocked_attention": "VlmJaxBlockedAttention",
                                                 "vlm_jax_blocked_attention_backward": "VlmJaxBlockedAttentionBackward"},
                           fallback="attention runs as XLA's products (slower on CPU)")


def available() -> bool:
    """Builds (once per machine, cached), loads and registers the kernel; False if it cannot."""
    return LIBRARY.available()


def usable(dtype, head_dim: int) -> bool:
    """Whether attention of this dtype and head size runs its blocked forward in the kernel, as
    traced now: float32 on the CPU backend, not under a mesh of several devices, head_dim a
    multiple of 8, and the kernel built."""
    return head_dim % 8 == 0 and LIBRARY.usable_for(dtype)


def _mask_for_kernel(bias: jax.Array | None, batch: int, t_len: int) -> jax.Array:
    """The bias as the kernels read it: [Nb, 1, T, T] float32 with Nb dividing the batch (one mask
    per sequence or one for all), or no elements for no mask."""
    if bias is None:
        return jnp.zeros((0, 1, t_len, t_len), jnp.float32)
    bias = jnp.broadcast_to(bias, (bias.shape[0] if bias.ndim == 4 else 1, 1, t_len, t_len))
    if batch % bias.shape[0]:
        bias = jnp.broadcast_to(bias, (batch, 1, t_len, t_len))
    return bias.astype(jnp.float32)


def _check(q: jax.Array, k: jax.Array, v: jax.Array, what: str) -> None:
    if not available():
        raise RuntimeError("the blocked-attention CPU kernel is not available on this machine (see the "
                           "KernelBuildWarning, or VLM_JAX_CPU_KERNELS=0); attention uses XLA's products by itself "
                           "in that case")
    if q.ndim != 5 or k.shape != v.shape or k.shape != (*q.shape[:3], q.shape[4]):
        raise ValueError(f"{what} takes q [B, T, K, G, E] and k, v [B, T, K, E]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if any(x.dtype != jnp.float32 for x in (q, k, v)) or q.shape[-1] % 8:
        raise ValueError(f"the blocked-attention CPU kernel takes float32 heads of a multiple of 8 values; got "
                         f"{q.dtype} heads of {q.shape[-1]}. Fix: use XLA's path (attention does where `usable` "
                         "says no)")


def blocked_attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, scale: float,
                              block: int) -> tuple[jax.Array, jax.Array]:
    """attention._blocked_attention_forward in the kernel, on the projections' layout: query t sees
    the keys up to the end of its block of `block` queries (every key when block >= T), with the
    additive bias.

    q [B, T, K, G, E] (G query heads per kv head), k/v [B, T, K, E] (float32), bias broadcastable
    to [B, 1, T, T] or None. Returns out [B, T, K, G, E] and the log-sum-exp of every query's
    scores [B, K, G, T] (float32).
    """
    _check(q, k, v, "blocked_attention_forward")
    batch, t_len, kv, groups, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((batch, kv, groups, t_len), jnp.float32))
    # vmapped: the vmapped axis leads every operand and the kernel takes the leading axes as sequences
    call = jax.ffi.ffi_call("vlm_jax_blocked_attention", out, vmap_method="broadcast_all")
    return call(q, k, v, _mask_for_kernel(bias, batch, t_len), scale=np.float32(scale), block=np.int64(block))


def blocked_attention_backward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, out: jax.Array,
                               lse: jax.Array, d_out: jax.Array, scale: float,
                               block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients (d_q, d_k, d_v) of blocked_attention_forward's output, given its inputs, its
    output and log-sum-exp, and the output's cotangent d_out [B, T, K, G, E]: the blocked
    attention's flash-style backward (attention._blocked_attention_backward) in the kernel."""
    _check(q, k, v, "blocked_attention_backward")
    batch, t_len = q.shape[:2]
    if out.shape != q.shape or d_out.shape != q.shape or lse.shape != (batch, *q.shape[2:4], t_len):
        raise ValueError(f"blocked_attention_backward takes out and d_out shaped as q {tuple(q.shape)} and lse "
                         f"[B, K, G, T]; got {tuple(out.shape)}, {tuple(d_out.shape)}, {tuple(lse.shape)}")
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
              jax.ShapeDtypeStruct(v.shape, jnp.float32))
    call = jax.ffi.ffi_call("vlm_jax_blocked_attention_backward", shapes, vmap_method="broadcast_all")
    f32 = jnp.float32
    return call(q, k, v, _mask_for_kernel(bias, batch, t_len), out.astype(f32), lse.astype(f32), d_out.astype(f32),
                scale=np.float32(scale), block=np.int64(block))
