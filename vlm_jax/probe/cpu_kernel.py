"""CPU kernels for fitting logistic probes (kernels/logistic_probe.cc), as JAX ops.

- `logistic_eval(X, layer, W, bias, labels, share)`: one evaluation of a softmax probe's data
  term in one pass over a layer's features: the loss, X^T G and the column sums of G. XLA's own
  products read the features twice per evaluation, from a transposed copy, and the logits product
  runs at about half the matmul rate; the kernel reads X once, as it is
  (benchmarks/RESULTS.md has the measurements).
- `column_moments(X, layer)`: each feature's mean and standard deviation, in one pass.

Both run as XLA FFI custom calls on the CPU backend, on the threads of XLA's intra-op pool.

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`) for the
machine's own instruction set, and cached under `$VLM_JAX_CACHE` (default ~/.cache/vlm_jax),
keyed by the source, the compiler flags, jaxlib's version and the CPU. Where it cannot be built
(no compiler), `available()` says so once with a warning and the probes use XLA's products;
`VLM_JAX_CPU_KERNELS=0` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

TARGETS = {"vlm_jax_logistic_eval": "VlmJaxLogisticEval", "vlm_jax_column_moments": "VlmJaxColumnMoments"}
SOURCE = Path(__file__).parent / "kernels" / "logistic_probe.cc"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_status: dict[str, object] = {}  # "ok": bool, "library": the loaded library (kept alive)


class KernelBuildWarning(UserWarning):
    """The CPU kernel could not be built; probes fall back to XLA's products (slower on CPU)."""


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def library_path() -> Path:
    """Where the compiled kernel for this machine is (or will be) cached."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                 _cpu_signature().encode(), os.environ.get("CXX", "c++").encode()):
        key.update(part)
        key.update(b"\0")
    cache = Path(os.environ.get("VLM_JAX_CACHE", Path.home() / ".cache" / "vlm_jax"))
    return cache / "kernels" / f"logistic_probe-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    """Compiles the kernel into `target`, atomically: a failed or interrupted build leaves nothing there."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler!r}); install one (e.g. g++) or set $CXX")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, target)


def available() -> bool:
    """Builds (once per machine, cached), loads and registers the kernel; False if it cannot."""
    with _lock:
        if "ok" in _status:
            return bool(_status["ok"])
        if os.environ.get("VLM_JAX_CPU_KERNELS", "1") == "0":
            _status["ok"] = False
            return False
        try:
            path = library_path()
            if not path.exists():
                _build(path)
            library = ctypes.cdll.LoadLibrary(str(path))
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        except Exception as error:  # noqa: BLE001 - any failure means: use XLA's products
            warnings.warn(f"the CPU kernels for logistic probes could not be built, so probes use XLA's "
                          f"products (slower on CPU). Cause: {error}", KernelBuildWarning, stacklevel=3)
            _status["ok"] = False
            return False
        _status.update(ok=True, library=library)
        return True


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
