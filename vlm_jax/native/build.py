"""Building, caching and registering the C++ XLA FFI kernels of this folder (CPU backend only).

A `CpuKernelLibrary` is one source file compiled into one shared library, on first use, with the
machine's C++ compiler (`$CXX`, else `c++`) for the machine's own instruction set. The library is
cached under `$VLM_JAX_CACHE` (default ~/.cache/vlm_jax), keyed by the sources (the .cc file and
the headers of this folder), the compiler and its flags, jaxlib's version and the CPU, and its
handlers are registered as FFI targets of the CPU platform. Where it cannot be built (no
compiler, a failed build), `available()` says so once with a warning and the callers use XLA's
own ops; `VLM_JAX_CPU_KERNELS=0` turns every kernel off. `$VLM_JAX_CXXFLAGS` adds compiler flags
after the defaults (and to the cache key): `-mno-avx512f` builds the AVX2 kernels on an AVX-512
machine, `-march=x86-64-v3` kernels that run on any AVX2 host of a fleet.
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

FOLDER = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")


def compiler_flags() -> tuple[str, ...]:
    """FLAGS, then the extra flags of $VLM_JAX_CXXFLAGS (whitespace-separated)."""
    return (*FLAGS, *os.environ.get("VLM_JAX_CXXFLAGS", "").split())


class KernelBuildWarning(UserWarning):
    """A CPU kernel could not be built; its callers fall back to XLA's ops (slower on CPU)."""


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def cpu_has(feature: str) -> bool:
    """Whether /proc/cpuinfo lists this feature flag (e.g. "avx512f"); False where it cannot be read."""
    return feature in _cpu_signature().split()


class CpuKernelLibrary:
    """One kernel source (FOLDER / f"{name}.cc") and the FFI targets it defines
    ({target name: handler symbol}); `fallback` says in the warning what runs instead."""

    def __init__(self, name: str, targets: dict[str, str], fallback: str):
        self.name, self.targets, self.fallback = name, targets, fallback
        self.source = FOLDER / f"{name}.cc"
        self._lock = threading.Lock()
        self._status: dict[str, object] = {}  # "ok": bool, "library": the loaded library (kept alive)

    def reset(self) -> None:
        """Forgets whether the kernel was built (the next `available()` tries again)."""
        with self._lock:
            self._status.clear()

    def library_path(self) -> Path:
        """Where the compiled library for this machine is (or will be) cached."""
        key = hashlib.sha256()
        headers = sorted(FOLDER.glob("*.h"))
        for part in (self.source.read_bytes(), *(h.read_bytes() for h in headers),
                     " ".join(compiler_flags()).encode(), jaxlib.__version__.encode(), _cpu_signature().encode(),
                     os.environ.get("CXX", "c++").encode()):
            key.update(part)
            key.update(b"\0")
        cache = Path(os.environ.get("VLM_JAX_CACHE", Path.home() / ".cache" / "vlm_jax"))
        return cache / "kernels" / f"{self.name}-{key.hexdigest()[:16]}.so"

    def _build(self, target: Path) -> None:
        """Compiles the library into `target`, atomically: a failed or interrupted build leaves nothing there."""
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler found ({compiler!r}); install one (e.g. g++) or set $CXX")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            command = [compiler, *compiler_flags(), f"-I{jax.ffi.include_dir()}", f"-I{FOLDER}", str(self.source),
                       "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
            os.replace(built, target)

    def c_function(self, symbol: str):
        """A plain C function the library exports (ctypes), once `available()`; None if it is not."""
        return getattr(self._status["library"], symbol) if self.available() else None

    def usable_for(self, dtype) -> bool:
        """Whether a call traced now may use this library's kernels for operands of `dtype`: float32
        on the CPU backend, not under a mesh of several devices (the kernels are not partitioned),
        and the library built (`available`)."""
        if jnp.dtype(dtype) != jnp.float32 or jax.default_backend() != "cpu":
            return False
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.size > 1:
            return False
        return self.available()

    def available(self) -> bool:
        """Builds (once per machine, cached), loads and registers the kernel; False if it cannot."""
        with self._lock:
            if "ok" in self._status:
                return bool(self._status["ok"])
            if os.environ.get("VLM_JAX_CPU_KERNELS", "1") == "0":
                self._status["ok"] = False
                return False
            try:
                path = self.library_path()
                if not path.exists():
                    self._build(path)
                library = ctypes.cdll.LoadLibrary(str(path))
                for target, symbol in self.targets.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
            except Exception as error:  # noqa: BLE001 - any failure means: use XLA's ops
                warnings.warn(f"the CPU kernel {self.name} could not be built, so {self.fallback}. Cause: {error}",
                              KernelBuildWarning, stacklevel=3)
                self._status["ok"] = False
                return False
            self._status.update(ok=True, library=library)
            return True
