"""The attention of a decode step on CPU: one new token per sequence over its key/value cache.

XLA's attention reads every slot of the cache, filled or not, and runs the scores, the softmax and
the weighted sum of the values as separate ops. The C++ kernel of
vlm_jax/native/decode_attention.cc reads each kv head's keys and values once, and only the slots
filled so far. generate uses it together with the decode products' kernels (nn/decode_matmul.py):
text_decoder's layers take this path when their weight kernels are in one of those forms, a
cache is being extended by one token, and no pattern or edit is asked for. Inference only.
benchmarks/RESULTS.md has the measurements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.native.build import CpuKernelLibrary

LIBRARY = CpuKernelLibrary("decode_attention", {"vlm_jax_decode_attention": "VlmJaxDecodeAttention"},
                           fallback="decoding uses XLA's attention (slower on CPU)")


def available() -> bool:
    """Builds (once per machine, cached), loads and registers the kernel; False if it cannot."""
    return LIBRARY.available()


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, bias: jax.Array, length: jax.Array,
                     scale: float) -> jax.Array:
    """softmax(scale q k^T + bias) v of one new token per sequence, over the first `length` slots.

    q [B, 1, H, E]; k_cache, v_cache [B*K, S, E] (text_decoder.init_cache's layout: row b*K + j is
    sequence b's kv head j; query head h reads kv head h // (H // K)); bias [B, S] additive (0
    where a slot may be attended, the float32 minimum elsewhere); length: slots to read (int,
    1..S; every slot after it must be masked). All float32. Returns out [B, 1, H, E].
    """
    if not available():
        raise RuntimeError("the decode-attention CPU kernel is not available on this machine (see the "
                           "KernelBuildWarning, or VLM_JAX_CPU_KERNELS=0); generate uses XLA's attention by "
                           "itself in that case")
    batch, t_len, n_heads, width = q.shape
    rows, slots = k_cache.shape[0], k_cache.shape[1]
    if t_len != 1 or rows % batch or n_heads % (rows // batch) or k_cache.shape != v_cache.shape \
            or k_cache.shape[2] != width or bias.shape != (batch, slots):
        raise ValueError(f"decode_attention takes q [B, 1, H, E], caches [B*K, S, E] and bias [B, S]; got q "
                         f"{tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}, bias "
                         f"{tuple(bias.shape)}")
    if any(a.dtype != jnp.float32 for a in (q, k_cache, v_cache, bias)):
        raise ValueError("decode_attention takes float32 arrays (the CPU kernel's type); decode in float32 or "
                         "with XLA's attention")
    groups = n_heads // (rows // batch)
    out = jax.ShapeDtypeStruct((rows, groups, width), jnp.float32)
    result = jax.ffi.ffi_call("vlm_jax_decode_attention", out, vmap_method="sequential")(
        q.reshape(rows, groups, width), k_cache, v_cache, bias, jnp.asarray(length, jnp.int32).reshape(()),
        scale=np.float32(scale))
    return result.reshape(batch, 1, n_heads, width)
