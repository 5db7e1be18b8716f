"""CPU kernels for fitting logistic probes (vlm_jax/native/logistic_probe.cc), as JAX ops.

- `logistic_eval(X, layer, W, bias, labels, share)`: one evaluation of a softmax probe's data
  term in one pass over a layer's features: the loss, X^T G and the column sums of G. XLA's own
  products read the features twice per evaluation, from a transposed copy, and the logits product
  runs at about half the matmul rate; the kernel reads X once, as it is
  (benchmarks/RESULTS.md has the measurements).
- `column_moments(X, layer)`: each feature's mean and standard deviation, in one pass.
- `lbfgs_direction(S, Y, rho, g, stored)`: L-BFGS's two-loop recursion (probe/lbfgs.py) in one
  call, where XLA runs its ~40 dependent dot products and updates as separate small ops.

Both run as XLA FFI custom calls on the CPU backend, on the threads of XLA's intra-op pool.

The kernel (vlm_jax/native/logistic_probe.cc) is compiled on first use for the machine's own
instruction set and cached (vlm_jax/native/build.py). Where it cannot be built (no compiler),
`available()` says so once with a warning and the probes use XLA's products;
`VLM_JAX_CPU_KERNELS=0` turns the kernel off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.native.build import CpuKernelLibrary, KernelBuildWarning

__all__ = ["KernelBuildWarning", "LIBRARY", "available", "column_moments", "lbfgs_direction", "library_path",
           "logistic_eval"]

LIBRARY = CpuKernelLibrary(
    "logistic_probe", {"vlm_jax_logistic_eval": "VlmJaxLogisticEval", "vlm_jax_column_moments": "VlmJaxColumnMoments",
                       "vlm_jax_lbfgs_direction": "VlmJaxLbfgsDirection"},
    fallback="probes use XLA's products (slower on CPU)")


def available() -> bool:
    """Builds (once per machine, cached), loads and registers the kernel; False if it cannot."""
    return LIBRARY.available()


def library_path():
    """Where the compiled kernel for this machine is (or will be) cached."""
    return LIBRARY.library_path()


def _require(X: jax.Array) -> None:
    if not available():
        raise RuntimeError("the probe CPU kernels are not available on this machine (see the KernelBuildWarning, "
                           "or VLM_JAX_CPU_KERNELS=0); fit_logistic falls back to XLA's products by itself")
    if X.ndim != 3 or X.dtype != jnp.float32:
        raise ValueError(f"the probe CPU kernels take X as float32 [layers, examples, features]; got {X.dtype} "
                         f"{tuple(X.shape)}. Fix: X.astype(jnp.float32)")


def logistic_eval(X: jax.Array, layer: jax.Array, W: jax.Array, bias: jax.Array, labels: jax.Array,
                  share: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One evaluation of a softmax probe's data term on layer `layer` of X [L, N, D] (float32).

    W [D, C] and bias [C] act on X's raw rows: z_n = W^T x_n + bias. labels [N] int32,
    share [N] example weights summing to 1. Returns (loss [], gx [D, C], gb [C]):
    loss = -sum_n share_n log softmax(z_n)[labels_n], gx = sum_n x_n g_n^T, gb = sum_n g_n,
    with g_n = share_n (softmax(z_n) - onehot(labels_n)). Raises RuntimeError where the kernel
    cannot be built (see `available()`).
    """
    _require(X)
    d, n_classes = W.shape
    out = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((d, n_classes), jnp.float32),
           jax.ShapeDtypeStruct((n_classes,), jnp.float32))
    call = jax.ffi.ffi_call("vlm_jax_logistic_eval", out, vmap_method="sequential")
    f32 = jnp.float32
    return call(X, jnp.asarray(layer, jnp.int32), jnp.asarray(W, f32), jnp.asarray(bias, f32),
                jnp.asarray(labels, jnp.int32), jnp.asarray(share, f32))


def column_moments(X: jax.Array, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean [D] and standard deviation [D] (ddof 0) of layer `layer` of X [L, N, D] (float32),
    accumulated in float64. Raises RuntimeError where the kernel cannot be built."""
    _require(X)
    d = X.shape[2]
    out = (jax.ShapeDtypeStruct((d,), jnp.float32), jax.ShapeDtypeStruct((d,), jnp.float32))
    return jax.ffi.ffi_call("vlm_jax_column_moments", out, vmap_method="sequential")(X, jnp.asarray(layer, jnp.int32))


def lbfgs_direction(S: jax.Array, Y: jax.Array, rho: jax.Array, g: jax.Array, stored: jax.Array) -> jax.Array:
    """L-BFGS's search direction -H g [P] by the two-loop recursion, as probe/lbfgs.py forms it.

    S, Y [M, P] float32: the stored steps and gradient changes, slot (stored - 1 - i) mod M the
    i-th newest; rho [M] = 1 / (s . y), 0 for an empty slot; g [P] the gradient; stored [] int32
    the number of pairs stored so far. H's initial scale is s.y / y.y of the newest pair (1 when
    none is stored). Raises RuntimeError where the kernel cannot be built (see `available()`).
    """
    if not available():
        raise RuntimeError("the probe CPU kernels are not available on this machine (see the KernelBuildWarning, "
                           "or VLM_JAX_CPU_KERNELS=0); lbfgs.minimize runs the recursion in XLA without it")
    if S.ndim != 2 or S.shape != Y.shape or rho.shape != S.shape[:1] or g.shape != S.shape[1:]:
        raise ValueError(f"lbfgs_direction takes S, Y [M, P], rho [M] and g [P]; got S {S.shape}, Y {Y.shape}, "
                         f"rho {rho.shape}, g {g.shape}")
    f32 = jnp.float32
    call = jax.ffi.ffi_call("vlm_jax_lbfgs_direction", jax.ShapeDtypeStruct(g.shape, f32), vmap_method="sequential")
    return call(jnp.asarray(S, f32), jnp.asarray(Y, f32), jnp.asarray(rho, f32), jnp.asarray(g, f32),
                jnp.asarray(stored, jnp.int32))
