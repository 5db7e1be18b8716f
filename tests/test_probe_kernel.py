"""The fused CPU kernel for logistic probes (probe/cpu_kernel.py): against a float64 reference,
inside the fit, and what happens where it cannot be built."""

from __future__ import annotations

import os
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_builds
from vlm_jax.probe import cpu_kernel, lbfgs, linear
from vlm_jax.probe.linear import _fit_logistic_layers, evaluate, fit_logistic

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                    reason="no C++ compiler on this machine to build the kernel")


def reference(X, W, bias, labels, share):
    """The data term in float64 numpy: (loss, X^T G, sum_n G)."""
    X, W, bias = (np.asarray(a, np.float64) for a in (X, W, bias))
    z = X @ W + bias
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    onehot = np.eye(W.shape[1])[labels]
    loss = -np.sum(share * logp[np.arange(len(labels)), labels])
    G = (np.exp(logp) - onehot) * share[:, None]
    return loss, X.T @ G, G.sum(axis=0)


@needs_compiler
@pytest.mark.parametrize("n, d, classes", [
    (3000, 1024, 8),  # the probe benchmark's shape
    (203, 37, 3),  # a partial block, a partial tile of examples, a partial tile of rows, padded classes
    (77, 64, 11),  # two class vectors
    (5, 9, 2),  # fewer examples than a tile
    (50, 3, 4),  # fewer features than a quad
])
def test_kernel_matches_a_float64_reference(n, d, classes):
    assert cpu_kernel.available()
    rng = np.random.default_rng(n)
    X = rng.standard_normal((3, n, d)).astype(np.float32)
    W = (rng.standard_normal((d, classes)) / np.sqrt(d)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    labels = rng.integers(0, classes, n).astype(np.int32)
    weights = rng.uniform(0.5, 1.5, n) * (rng.uniform(size=n) > 0.2)  # some examples held out
    share = (weights / weights.sum()).astype(np.float32)
    for layer in (0, 2):
        loss, gx, gb = jax.jit(cpu_kernel.logistic_eval)(jnp.asarray(X), layer, jnp.asarray(W), jnp.asarray(bias),
                                                        jnp.asarray(labels), jnp.asarray(share))
        ref_loss, ref_gx, ref_gb = reference(X[layer], W, bias, labels, share.astype(np.float64))
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(gx), ref_gx, atol=1e-5 * np.abs(ref_gx).max())
        np.testing.assert_allclose(np.asarray(gb), ref_gb, atol=1e-6)


def two_loop_reference(S, Y, rho, g, stored):
    """L-BFGS's -H g by the two-loop recursion in float64 numpy (slot (stored - 1 - i) % M the i-th newest)."""
    S, Y, rho, q = (np.asarray(a, np.float64) for a in (S, Y, rho, g))
    memory = len(rho)
    newest = (stored - 1) % memory
    gamma = S[newest] @ Y[newest] / (Y[newest] @ Y[newest]) if stored > 0 else 1.0
    alphas = []
    for i in range(memory):
        slot = (stored - 1 - i) % memory
        alphas.append((slot, rho[slot] * (S[slot] @ q)))
        q = q - alphas[-1][1] * Y[slot]
    r = gamma * q
    for slot, alpha in reversed(alphas):
        r = r + (alpha - rho[slot] * (Y[slot] @ r)) * S[slot]
    return -r


@needs_compiler
@pytest.mark.parametrize("memory, size", [(10, 8200), (3, 37), (1, 5)])
@pytest.mark.parametrize("stored", [0, 1, 2, 10, 23])  # none yet, a partial memory, full and wrapped around
def test_lbfgs_direction_matches_a_float64_reference(memory, size, stored):
    rng = np.random.default_rng(memory + stored)
    S = rng.standard_normal((memory, size)).astype(np.float32)
    Y = (0.5 * S + 0.1 * rng.standard_normal((memory, size))).astype(np.float32)  # s . y > 0, as stored pairs
    rho = (1.0 / np.einsum("mp,mp->m", S, Y)).astype(np.float32)
    rho[min(stored, memory):] = 0.0  # slots not yet filled
    S[min(stored, memory):] = 0.0
    Y[min(stored, memory):] = 0.0
    g = rng.standard_normal(size).astype(np.float32)
    direction = jax.jit(cpu_kernel.lbfgs_direction)(S, Y, rho, g, stored)
    expected = two_loop_reference(S, Y, rho, g, stored)
    np.testing.assert_allclose(np.asarray(direction), expected, atol=2e-6 * np.abs(expected).max())
    if stored == 0:  # no curvature yet: steepest descent
        np.testing.assert_array_equal(np.asarray(direction), -g)


@needs_compiler
def test_lbfgs_direction_is_the_recursion_minimize_runs_in_jnp():
    """The same minimisation with the kernel's recursion and with lbfgs.minimize's own: the same
    iterates up to float32 rounding, so the same iteration count and the same solution."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((60, 40)).astype(np.float32)
    H = jnp.asarray(A.T @ A / 60 + 0.1 * np.eye(40, dtype=np.float32))
    optimum = jnp.asarray(rng.standard_normal(40).astype(np.float32))

    def value_and_grad(x):
        """A convex quadratic plus a smooth convex term, both 0 at the optimum: float32 resolves
        the line search's decreases down to the tolerance."""
        e = x - optimum
        return 0.5 * e @ H @ e + jnp.sum(jnp.log(jnp.cosh(e))), H @ e + jnp.tanh(e)

    x_jnp, k_jnp, e_jnp = jax.jit(lambda x0: lbfgs.minimize(value_and_grad, x0, tol=1e-5))(jnp.zeros(40))
    x_ker, k_ker, e_ker = jax.jit(lambda x0: lbfgs.minimize(value_and_grad, x0, tol=1e-5,
                                                            two_loop=cpu_kernel.lbfgs_direction))(jnp.zeros(40))
    assert 10 < int(k_ker) < 200
    assert abs(int(k_ker) - int(k_jnp)) <= 1 and abs(int(e_ker) - int(e_jnp)) <= 1
    np.testing.assert_allclose(np.asarray(x_ker), np.asarray(x_jnp), atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_ker), np.asarray(optimum), atol=1e-3)


@needs_compiler
def test_lbfgs_direction_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"S, Y \[M, P\], rho \[M\] and g \[P\]"):
        cpu_kernel.lbfgs_direction(jnp.zeros((4, 6)), jnp.zeros((4, 6)), jnp.zeros(4), jnp.zeros(5), 1)


@needs_compiler
def test_kernel_rejects_features_that_are_not_float32_layers():
    with pytest.raises(ValueError, match="float32"):
        cpu_kernel.column_moments(jnp.zeros((4, 3), jnp.float32), 0)  # no layer axis
    with pytest.raises(ValueError, match="float32"):
        cpu_kernel.column_moments(jnp.zeros((1, 4, 3), jnp.int32), 0)


@needs_compiler
def test_kernel_rejects_labels_outside_the_classes():
    X = jnp.zeros((1, 10, 4), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3, 0, 9], jnp.int32)  # 9 >= 4 classes
    with pytest.raises(Exception, match="label is outside"):
        jax.block_until_ready(cpu_kernel.logistic_eval(X, 0, jnp.zeros((4, 4)), jnp.zeros(4), labels,
                                                       jnp.full((10,), 0.1)))


@needs_compiler
@pytest.mark.parametrize("n, d", [(3000, 1024), (203, 37), (1, 5)])
def test_column_moments_match_numpy_in_float64(n, d):
    rng = np.random.default_rng(d)
    X = rng.standard_normal((2, n, d)).astype(np.float32)
    X[1] = X[1] * 0.01 + 1000.0  # mean >> std: a naive sum of squares in float32 would cancel
    for layer in range(2):
        mean, std = jax.jit(cpu_kernel.column_moments)(jnp.asarray(X), layer)
        np.testing.assert_allclose(np.asarray(mean), X[layer].astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(std), X[layer].astype(np.float64).std(axis=0), rtol=1e-4, atol=1e-6)


@needs_compiler
def test_fit_with_the_kernel_equals_the_fit_with_xla_products():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    X = rng.standard_normal((3, 300, 40)).astype(np.float32)
    X[1] += 0.8 * rng.standard_normal((5, 40)).astype(np.float32)[y]  # a signal at layer 1
    X[2] = 3.0 * X[2] + 7.0  # features that need the standardisation
    weights = np.ones((2, 300), np.float32)
    weights[0, :60] = 0.0
    weights[1, 60:120] = 0.0
    # both stop at a gradient below tol = 1e-5: at these strengths the optima then agree to ~1e-4
    lambdas = np.tile(np.float32([1e-1, 1e-2]), (3, 1))
    args = (jnp.asarray(X), jnp.asarray(y), jnp.asarray(weights), jnp.asarray(lambdas), 5, 1000, 1e-5)
    W_k, b_k, mean_k, scale_k, counts_k = _fit_logistic_layers(*args, use_kernel=True)
    W_x, b_x, mean_x, scale_x, counts_x = _fit_logistic_layers(*args, use_kernel=False)
    np.testing.assert_allclose(np.asarray(mean_k), np.asarray(mean_x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scale_k), np.asarray(scale_x), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(W_k), np.asarray(W_x), atol=3e-4)
    np.testing.assert_allclose(np.asarray(b_k), np.asarray(b_x), atol=3e-4)
    assert np.all(np.asarray(counts_k)[..., 0] < 1000) and np.all(np.asarray(counts_x)[..., 0] < 1000)


@needs_compiler
def test_fit_logistic_uses_the_kernel_for_float32_features_on_cpu():
    assert linear._kernel_applies(jnp.zeros((2, 10, 4), jnp.float32))
    assert linear._kernel_applies(jnp.zeros((2, 10, 4), jnp.bfloat16))  # fitted in float32
    with jax.enable_x64(True):
        assert not linear._kernel_applies(jnp.zeros((2, 10, 4), jnp.float64))  # float64 fits use XLA's products


def fake_compiler(directory, body: str) -> str:
    path = os.path.join(directory, "fake-c++")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("compiler", ["missing", "fails after writing"])
def test_a_kernel_that_cannot_be_built_leaves_nothing_and_probes_still_fit(tmp_path, monkeypatch, compiler):
    if compiler == "missing":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    else:  # writes a partial library, then fails
        script = 'for a; do case "$prev" in -o) echo partial > "$a";; esac; prev="$a"; done\nexit 1\n'
        monkeypatch.setenv("CXX", fake_compiler(str(tmp_path), script))
    monkeypatch.setenv("VLM_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernel.LIBRARY, "_status", {})
    with pytest.warns(cpu_kernel.KernelBuildWarning, match="could not be built"):
        assert not cpu_kernel.available()
    assert not cpu_kernel.library_path().exists()
    leftovers = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
    assert [p for p in leftovers if p.is_file()] == []

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    X = rng.standard_normal((2, 400, 12)).astype(np.float32)
    X[1] += 1.5 * rng.standard_normal((3, 12)).astype(np.float32)[y]
    probe = fit_logistic(X[:, :300], y[:300], lambdas=(1e-3,))  # XLA's products
    accuracy = evaluate(probe, X[:, 300:], y[300:]).accuracy
    assert accuracy[1] > 0.9 and accuracy[0] < 0.5


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("VLM_JAX_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernel.LIBRARY, "_status", {})
    assert not cpu_kernel.available()
    assert not linear._kernel_applies(jnp.zeros((1, 4, 3), jnp.float32))


@pytest.mark.skipif(not kernel_builds.both_widths_here(), reason=kernel_builds.SKIP_REASON)
def test_the_eight_lane_build_agrees_too(tmp_path):
    """On an AVX-512 machine the products run on 16-lane vectors; built with -mno-avx512f the
    kernel takes the 8-lane path of AVX2 machines. The reference tests pass with that build too."""
    kernel_builds.check_eight_lane_build(__file__, "reference or xla_products", "logistic_probe", tmp_path / "cache")
