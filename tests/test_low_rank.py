"""nn/low_rank.py: the LoRA update's custom backward equals autodiff of (x A) B s."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.nn import decode_matmul
from vlm_jax.nn.low_rank import kernel_usable, low_rank_update


def plain(rows, a, b, scale):
    return (rows @ a) @ b * scale


def operands(n, d_in, rank, d_out, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in ((n, d_in), (d_in, rank), (rank, d_out), (n, d_out))]
    rows, a, b, weights = (jnp.asarray(x, dtype) for x in arrays)
    return rows, a, b, jnp.asarray(1.7, dtype), weights


def loss(fn):
    return lambda rows, a, b, scale, weights: jnp.sum(fn(rows, a, b, scale) * weights)


@pytest.mark.parametrize("n, d_in, rank, d_out", [(37, 30, 8, 40), (64, 48, 12, 16), (5, 8, 1, 3)])
def test_gradients_equal_autodiff(n, d_in, rank, d_out):
    """float32 on CPU: A's gradient in the decode kernel (ranks above 8 in passes, widths with a
    scalar tail); every cotangent, the scale's included, against autodiff of the plain formula."""
    args = operands(n, d_in, rank, d_out)
    ours = jax.jit(jax.grad(loss(low_rank_update), argnums=(0, 1, 2, 3)))(*args)
    ref = jax.jit(jax.grad(loss(plain), argnums=(0, 1, 2, 3)))(*args)
    for got, want in zip(ours, ref):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    np.testing.assert_array_equal(low_rank_update(*args[:4]), plain(*args[:4]))


@pytest.mark.skipif(not decode_matmul.available(), reason="no C++ compiler: the XLA path only")
def test_a_gradient_runs_in_the_kernel_for_float32_only():
    args = operands(37, 30, 8, 40)
    grad = jax.jit(jax.grad(loss(low_rank_update), argnums=1))
    assert kernel_usable(jnp.float32) and "vlm_jax_stacked_matmul" in grad.lower(*args).as_text()
    args16 = operands(37, 30, 8, 40, dtype=jnp.bfloat16)
    assert not kernel_usable(jnp.bfloat16) and "vlm_jax_stacked_matmul" not in grad.lower(*args16).as_text()


def test_bfloat16_uses_xla_and_matches_autodiff():
    args = operands(37, 30, 8, 40, dtype=jnp.bfloat16)
    ours = jax.grad(loss(low_rank_update), argnums=(0, 1, 2, 3))(*args)
    ref = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(*args)
    for got, want in zip(ours, ref):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-2,
                                   atol=3e-2 * float(jnp.abs(want.astype(jnp.float32)).max()))


def test_vmapped_gradients_equal_one_at_a_time():
    """Under vmap (a batch of adapters) the kernel's sequential batching gives each one's gradient."""
    stacks = [operands(37, 30, 8, 40, seed=s) for s in range(3)]
    batched = [jnp.stack(x) for x in zip(*stacks)]
    grads = jax.jit(jax.vmap(jax.grad(loss(low_rank_update), argnums=(1, 2, 3))))(*batched)
    for i, args in enumerate(stacks):
        for got, want in zip(grads, jax.grad(loss(plain), argnums=(1, 2, 3))(*args)):
            np.testing.assert_allclose(got[i], want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
