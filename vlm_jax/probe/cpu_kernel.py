"""CPU kernels for fitting logistic probes (vlm_jax/native/logistic_probe.cc), as JAX ops.

- `logistic_eval(X, layer, W, bias, labels, share)`: one evaluation of a softmax probe's data
  term in one pass over a layer's features: the loss, X^T G and the column sums of G. XLA's own
  products read the features twice per evaluation, from a transposed copy, and the logits product
  runs at about half the matmul rate; the kernel reads X once, as it is
  (benchmarks/RESULTS.md has the measurements).
- `column_moments(X, layer)`: each feature's mean and standard deviation, in one pass.
- `logistic_fit(...)`: a whole probe fit on one layer, probe/lbfgs.py's L-BFGS run step for step
  around the evaluations above. In XLA, each iteration's bookkeeping (the two-loop recursion, the
  line search, the curvature pairs) was ~120 small ops, ~145 us beside a ~0.3 ms evaluation at
  3000 x 1024 features and 8 classes; here it is ~27 us.

Both run as XLA FFI custom calls on the CPU backend, on the threads of XLA's intra-op pool.

The kernel (vlm_jax/native/logistic_probe.cc) is compiled on first use for the machine's own
instruction set and cached (vlm_jax/native/build.py). Where it cannot be built (no compiler),
`available()` says so once with a warning and the probes use XLA's products;
`VLM_JAX_CPU_KERNELS=0` turns the kernel off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.native.build import CpuKernelLibrary, KernelBuildWarning
from vlm_jax.probe import lbfgs

__all__ = ["KernelBuildWarning", "LIBRARY", "available", "column_moments", "library_path", "logistic_eval",
           "logistic_fit"]

LIBRARY = CpuKernelLibrary(
    "logistic_probe", {"vlm_jax_logistic_eval": "VlmJaxLogisticEval", "vlm_jax_column_moments": "VlmJaxColumnMoments",
                       "vlm_jax_logistic_fit": "VlmJaxLogisticFit"},
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


def logistic_fit(X: jax.Array, layer: jax.Array, labels: jax.Array, share: jax.Array, mean: jax.Array,
                 scale: jax.Array, lam: jax.Array, W0: jax.Array, b0: jax.Array, tol: jax.Array, *, max_iter: int,
                 memory: int = lbfgs.MEMORY, max_backtracks: int = lbfgs.MAX_BACKTRACKS
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A softmax-regression probe fitted on layer `layer` of X [L, N, D] (float32), in one call.

    Minimises sum_n share_n CE(W^T (x_n - mean) / scale + b, labels_n) + lam / 2 ||W||^2 from
    (W0 [D, C], b0 [C]) with probe/lbfgs.py's algorithm (the same direction, first step, Armijo
    backtracking, curvature test and stopping rule: largest gradient entry <= tol, or max_iter
    iterations). labels [N] int32, share [N] example weights summing to 1, mean/scale [D] the
    standardisation. Returns (W [D, C], b [C], counts [2] int32: iterations, loss evaluations).
    Raises RuntimeError where the kernel cannot be built (see `available()`).
    """
    _require(X)
    d = X.shape[2]
    if W0.ndim != 2 or W0.shape[0] != d or jnp.shape(b0) != W0.shape[1:]:
        raise ValueError(f"logistic_fit takes W0 [D, C] with D = {d} (X's features) and b0 [C]; got W0 "
                         f"{tuple(W0.shape)}, b0 {tuple(jnp.shape(b0))}")
    if jnp.shape(mean) != (d,) or jnp.shape(scale) != (d,):
        raise ValueError(f"logistic_fit takes mean and scale [D] = [{d}]; got {jnp.shape(mean)} and {jnp.shape(scale)}")
    if jnp.ndim(lam) or jnp.ndim(tol):
        raise ValueError(f"logistic_fit takes one L2 strength and one tolerance (scalars); got lam of shape "
                         f"{jnp.shape(lam)} and tol of shape {jnp.shape(tol)}. Fix: vmap over strengths instead.")
    n_classes = W0.shape[1]
    out = (jax.ShapeDtypeStruct((d, n_classes), jnp.float32), jax.ShapeDtypeStruct((n_classes,), jnp.float32),
           jax.ShapeDtypeStruct((2,), jnp.int32))
    call = jax.ffi.ffi_call("vlm_jax_logistic_fit", out, vmap_method="sequential")
    f32 = jnp.float32
    return call(X, jnp.asarray(layer, jnp.int32), jnp.asarray(labels, jnp.int32), jnp.asarray(share, f32),
                jnp.asarray(mean, f32), jnp.asarray(scale, f32), jnp.asarray(lam, f32), jnp.asarray(W0, f32),
                jnp.asarray(b0, f32), jnp.asarray(tol, f32), max_iter=np.int64(max_iter), memory=np.int64(memory),
                max_backtracks=np.int64(max_backtracks))
