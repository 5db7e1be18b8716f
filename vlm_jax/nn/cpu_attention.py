"""The blocked attention's forward on CPU as one fused C++ kernel (vlm_jax/native/blocked_attention.cc).

XLA CPU runs the blocked attention (nn/attention.py) as a score product per query block, a softmax
fusion and a second product, writing each block's scores out and reading them back; its products
there reach about 27 GFLOP/s per thread. The kernel computes a few query rows at a time, scores,
mask, softmax, log-sum-exp and weighted sum, without leaving L1, and reads the projections where
they are (no transposes around it). It is the forward of attention._kernel_attention (whose
backward is the blocked attention's, in XLA) wherever `usable` says so: float32 on
the CPU backend, outside a mesh of several devices (the kernel is not partitioned), head sizes a
multiple of 8, and a kernel that could be built (`VLM_JAX_CPU_KERNELS=0` turns it off).
benchmarks/RESULTS.md has the measurements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.native.build import CpuKernelLibrary

LIBRARY = CpuKernelLibrary("blocked_attention", {"vlm_jax_blocked_attention": "VlmJaxBlockedAttention"},
                           fallback="attention runs as XLA's products (slower on CPU)")


def available() -> bool:
    """Builds (once per machine, cached), loads and registers the kernel; False if it cannot."""
    return LIBRARY.available()


def usable(dtype, head_dim: int) -> bool:
    """Whether attention of this dtype and head size runs its blocked forward in the kernel, as
    traced now: float32 on the CPU backend, not under a mesh of several devices, head_dim a
    multiple of 8, and the kernel built."""
    if jnp.dtype(dtype) != jnp.float32 or head_dim % 8 or jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return False
    return available()


def blocked_attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, scale: float,
                              block: int) -> tuple[jax.Array, jax.Array]:
    """attention._blocked_attention_forward in the kernel, on the projections' layout: query t sees
    the keys up to the end of its block of `block` queries (every key when block >= T), with the
    additive bias.

    q [B, T, K, G, E] (G query heads per kv head), k/v [B, T, K, E] (float32), bias broadcastable
    to [B, 1, T, T] or None. Returns out [B, T, K, G, E] and the log-sum-exp of every query's
    scores [B, K, G, T] (float32).
    """
    if not available():
        raise RuntimeError("the blocked-attention CPU kernel is not available on this machine (see the "
                           "KernelBuildWarning, or VLM_JAX_CPU_KERNELS=0); attention uses XLA's products by itself "
                           "in that case")
    if q.ndim != 5 or k.shape != v.shape or k.shape != (*q.shape[:3], q.shape[4]):
        raise ValueError(f"blocked_attention_forward takes q [B, T, K, G, E] and k, v [B, T, K, E]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if any(x.dtype != jnp.float32 for x in (q, k, v)) or q.shape[-1] % 8:
        raise ValueError(f"the blocked-attention CPU kernel takes float32 heads of a multiple of 8 values; got "
                         f"{q.dtype} heads of {q.shape[-1]}. Fix: use XLA's path (attention does where `usable` "
                         "says no)")
    batch, t_len, kv, groups, _ = q.shape
    if bias is None:
        bias = jnp.zeros((0, 1, t_len, t_len), jnp.float32)  # no elements: no mask
    else:
        # the kernel reads one mask per sequence or one for all (leading entries dividing the batch)
        bias = jnp.broadcast_to(bias, (bias.shape[0] if bias.ndim == 4 else 1, 1, t_len, t_len))
        if batch % bias.shape[0]:
            bias = jnp.broadcast_to(bias, (batch, 1, t_len, t_len))
        bias = bias.astype(jnp.float32)
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((batch, kv, groups, t_len), jnp.float32))
    # vmapped: the vmapped axis leads every operand and the kernel takes the leading axes as sequences
    call = jax.ffi.ffi_call("vlm_jax_blocked_attention", out, vmap_method="broadcast_all")
    return call(q, k, v, bias, scale=np.float32(scale), block=np.int64(block))
