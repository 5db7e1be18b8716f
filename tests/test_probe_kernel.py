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
from vlm_jax.probe import cpu_kernel, linear
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


@needs_compiler
@pytest.mark.parametrize("n, d, classes", [(400, 37, 3), (300, 64, 11)])
def test_kernel_fit_runs_lbfgs_minimize_step_for_step(n, d, classes):
    """cpu_kernel.logistic_fit against lbfgs.minimize on the same evaluations (the kernel's), from
    zero and warm-started: the same iterates for the first iterations, the same solution."""
    rng = np.random.default_rng(d)
    labels = rng.integers(0, classes, n).astype(np.int32)
    X = rng.standard_normal((2, n, d)).astype(np.float32)
    X[1] = 2.0 * X[1] + 0.5 * rng.standard_normal((classes, d)).astype(np.float32)[labels] + 3.0
    Xj, yj = jnp.asarray(X), jnp.asarray(labels)
    weights = rng.uniform(0.5, 1.5, n) * (rng.uniform(size=n) > 0.2)
    share = jnp.asarray(weights / weights.sum(), jnp.float32)
    mean, std = cpu_kernel.column_moments(Xj, 1)
    scale = jnp.where(std > 1e-8, std, 1.0)

    def in_jnp(lam, W0, b0, max_iter):
        def data_term(W_raw, bias):
            return cpu_kernel.logistic_eval(Xj, 1, W_raw, bias, yj, share)

        return linear._fit_logistic_one(data_term, d, classes, mean, scale, lam, W0, b0, max_iter=max_iter, tol=1e-4)

    def in_kernel(lam, W0, b0, max_iter):
        return cpu_kernel.logistic_fit(Xj, 1, yj, share, mean, scale, lam, W0, b0, 1e-4, max_iter=max_iter)

    zero = (jnp.zeros((d, classes)), jnp.zeros(classes))
    kernel, jnp_fit = jax.jit(in_kernel, static_argnums=3), jax.jit(in_jnp, static_argnums=3)
    W_first, b_first, _ = kernel(1e-2, *zero, 500)
    for lam, start in [(1e-2, zero), (1e-3, (W_first, b_first))]:  # from zero, and warm-started
        # the first iterations, far from float32's resolution of the loss: step for step
        for max_iter in (3, 8):
            W_k, b_k, counts_k = kernel(lam, *start, max_iter)
            W_j, b_j, counts_j = jnp_fit(lam, *start, max_iter)
            assert np.asarray(counts_k)[0] == max_iter and np.array_equal(np.asarray(counts_k), np.asarray(counts_j))
            np.testing.assert_allclose(np.asarray(W_k), np.asarray(W_j), atol=1e-4 * np.abs(np.asarray(W_j)).max())
            np.testing.assert_allclose(np.asarray(b_k), np.asarray(b_j), atol=1e-4 * max(1.0, np.abs(np.asarray(b_j)).max()))
        # to convergence: near the optimum the loss changes by about its float32 rounding, where
        # the two line searches (sums in another order) may backtrack differently
        W_k, b_k, counts_k = kernel(lam, *start, 500)
        W_j, b_j, counts_j = jnp_fit(lam, *start, 500)
        assert np.asarray(counts_k)[0] < 500 and np.asarray(counts_j)[0] < 500
        np.testing.assert_allclose(np.asarray(W_k), np.asarray(W_j), atol=2e-3 * np.abs(np.asarray(W_j)).max())
        np.testing.assert_allclose(np.asarray(b_k), np.asarray(b_j), atol=2e-3 * max(1.0, np.abs(np.asarray(b_j)).max()))


@needs_compiler
def test_kernel_fit_rejects_mismatched_shapes():
    X = jnp.zeros((2, 10, 6))
    args = (X, 0, jnp.zeros(10, jnp.int32), jnp.full(10, 0.1), jnp.zeros(6), jnp.ones(6), 1e-3)
    with pytest.raises(ValueError, match=r"W0 \[D, C\] with D = 6"):
        cpu_kernel.logistic_fit(*args, jnp.zeros((5, 3)), jnp.zeros(3), 1e-4, max_iter=10)
    with pytest.raises(ValueError, match="one L2 strength and one tolerance"):
        cpu_kernel.logistic_fit(*args[:6], jnp.ones(2), jnp.zeros((6, 3)), jnp.zeros(3), 1e-4, max_iter=10)
    with pytest.raises(ValueError, match=r"mean and scale \[D\]"):
        cpu_kernel.logistic_fit(*args[:4], jnp.zeros(5), *args[5:], jnp.zeros((6, 3)), jnp.zeros(3), 1e-4, max_iter=10)


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
