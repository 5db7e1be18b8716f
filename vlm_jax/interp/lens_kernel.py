"""The logit lens's per-row statistics on CPU as a C++ kernel (vlm_jax/native/logit_stats.cc).

For each row of a chunk of logits [N, V] the lens needs the log-sum-exp (for probabilities) and
the maximum of every block of `block` logits (block_top_k's first step). XLA CPU computes them in
three passes over the chunk (74 MB at 576 positions x 32064 tokens); the kernel does one, with
a vector exponential. logit_lens uses it wherever `usable` says so: float32 on the CPU backend,
outside a mesh of several devices, a block that is a whole number of the kernel's vectors, and a
kernel that could be built (`VLM_JAX_CPU_KERNELS=0` turns it off). benchmarks/RESULTS.md has the
measurements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.native.build import CpuKernelLibrary

LIBRARY = CpuKernelLibrary("logit_stats", {"vlm_jax_logit_stats": "VlmJaxLogitStats"},
                           fallback="the logit lens uses XLA's reductions (slower on CPU)")


def vector_lanes() -> int:
    """The lanes of the kernel's vectors as built for this machine (16 with AVX-512, else 8); 0
    where the kernel is not available."""
    lanes = LIBRARY.c_function("VlmJaxLogitStatsVectorLanes")
    return int(lanes()) if lanes is not None else 0


def usable(dtype, block: int) -> bool:
    """Whether logits of this dtype, in blocks of `block`, can go through the kernel as traced now."""
    return LIBRARY.usable_for(dtype) and block % vector_lanes() == 0


def logit_stats(logits: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """logits [N, V] float32 -> (block maxima [N, V / block], log-sum-exp [N]), in the kernel.

    block must divide V and be a multiple of `vector_lanes()` (see `usable`).
    """
    if logits.ndim != 2 or logits.dtype != jnp.float32:
        raise ValueError(f"logit_stats takes float32 logits [N, V]; got {logits.dtype} {tuple(logits.shape)}")
    if not usable(logits.dtype, block) or logits.shape[1] % block:
        raise ValueError(f"logit_stats cannot take blocks of {block} over {logits.shape[1]} logits here (it needs "
                         "the CPU kernel built, float32 on the CPU backend, and a block that divides the vocabulary "
                         f"into whole vectors of {vector_lanes() or 'its'} lanes). Fix: use XLA's reductions, as "
                         "logit_lens does where `usable` says no")
    n, vocab = logits.shape
    out = (jax.ShapeDtypeStruct((n, vocab // block), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32))
    return jax.ffi.ffi_call("vlm_jax_logit_stats", out, vmap_method="sequential")(logits, block=np.int64(block))
