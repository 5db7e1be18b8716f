"""Runs a kernel's tests against its 8-lane (AVX2) build on an AVX-512 machine, where the default
build uses 16-lane vectors: so that one machine checks both forms of the C++ kernels."""

from __future__ import annotations

import os
import subprocess
import sys

from vlm_jax.native import build

SKIP_REASON = "only an AVX-512 machine builds both vector widths"


def both_widths_here() -> bool:
    return build.cpu_has("avx512f")


def check_eight_lane_build(test_file: str, selection: str, library: str, cache_dir) -> None:
    """Runs the tests of test_file matching `selection` (pytest -k) in a subprocess whose kernels are
    built with -mno-avx512f (VLM_JAX_CXXFLAGS) into cache_dir, and checks that they ran and passed
    and that the `library` kernel was built there (a kernel registers once per process, hence the
    subprocess)."""
    env = dict(os.environ, VLM_JAX_CXXFLAGS="-mno-avx512f", VLM_JAX_CACHE=str(cache_dir))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=os.path.dirname(test_file))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
    assert list((cache_dir / "kernels").glob(f"{library}-*.so")), "the 8-lane build was not made"
