"""The query-blocked attention and its custom (flash-style) backward against plain autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.nn import attention as A
from vlm_jax.nn import cpu_attention


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("causal_block", [16, None])  # 16: causal blocks; None: one block (plain attention)
@pytest.mark.parametrize("merged", [True, False])  # False: B and K kept apart, as under a tensor-split mesh
@pytest.mark.parametrize("cpu_kernel", [True, False])  # the forward in nn/cpu_attention.py's kernel, or XLA's
def test_custom_backward_matches_autodiff_of_the_explicit_softmax(batch, causal_block, merged, cpu_kernel,
                                                                  monkeypatch):
    monkeypatch.setattr(A, "merged_heads", lambda: merged)
    if not cpu_kernel:
        monkeypatch.setattr(cpu_attention, "usable", lambda dtype, head_dim: False)
    elif not cpu_attention.usable(jnp.float32, 8):
        pytest.skip("the CPU attention kernel cannot be built here")
    t_len, n_heads, n_kv, head_dim = 37, 4, 2, 8  # 37 tokens in blocks of 16: a ragged last block
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, t_len, n_heads, head_dim))
    k = jax.random.normal(keys[1], (batch, t_len, n_kv, head_dim))
    v = jax.random.normal(keys[2], (batch, t_len, n_kv, head_dim))
    cotangent = jax.random.normal(keys[3], (batch, t_len, n_heads, head_dim))
    valid = jnp.ones((batch, t_len), bool).at[-1, :5].set(False)  # left padding on the last row
    index = jnp.arange(t_len)
    bias = A.mask_to_bias(A.causal_mask(valid, index, index))
    # A padding query sees no valid key: its output is arbitrary (uniform over whatever keys a
    # path looks at) and unused, so it is left out of the loss and the comparison.
    cotangent = cotangent * valid[:, :, None, None]

    def loss(q, k, v, reference):
        # return_pattern=True takes the explicit softmax, differentiated by autodiff
        out, _ = A.attention(q, k, v, scale=head_dim**-0.5, bias=bias, causal_block=causal_block,
                             return_pattern=reference)
        return jnp.sum(out * cotangent), out

    (_, got), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
    (_, want), ref = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, True)
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], rtol=1e-5, atol=1e-6)
    for name, g, r in zip("qkv", grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")
    # the fast path really took the custom backward, and the reference did not
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda q: loss(q, k, v, False)[0])(q))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda q: loss(q, k, v, True)[0])(q))
    assert ("vlm_jax_blocked_attention" in str(jax.make_jaxpr(lambda q: loss(q, k, v, False)[0])(q))) == cpu_kernel


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_path_equals_the_explicit_one_with_fully_masked_queries(dtype):
    # Generation left-pads prompts to a bucket, so some queries see no valid key at all. float32's
    # minimum (the bias) overflows to -inf in bfloat16; unclipped, the fused path gave those rows
    # NaN, which the cache carried to every later token.
    batch, t_len, n_heads, n_kv, head_dim = 2, 12, 4, 2, 8
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (batch, t_len, n_heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, t_len, n_kv, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, t_len, n_kv, head_dim), dtype)
    valid = jnp.ones((batch, t_len), bool).at[1, :5].set(False)
    index = jnp.arange(t_len)
    bias = A.mask_to_bias(A.causal_mask(valid, index, index))  # float32, as the decoder builds it
    fused, _ = A.attention(q, k, v, scale=head_dim**-0.5, bias=bias, fused=True)
    explicit, _ = A.attention(q, k, v, scale=head_dim**-0.5, bias=bias, return_pattern=True)
    assert np.isfinite(np.asarray(fused, np.float32)).all()
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(explicit, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("with_bias", [True, False])
def test_cudnn_forward_xla_gradient_has_the_xla_kernels_gradients(with_bias):
    # On GPU the fused path runs cuDNN's forward and XLA's backward (a custom_vjp). Here the
    # forward is XLA's too, so values and gradients must equal plain autodiff of XLA's kernel.
    batch, t_len, n_heads, n_kv, head_dim = 2, 9, 4, 2, 8
    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (batch, t_len, n_heads, head_dim))
    k = jax.random.normal(keys[1], (batch, t_len, n_kv, head_dim))
    v = jax.random.normal(keys[2], (batch, t_len, n_kv, head_dim))
    cotangent = jax.random.normal(keys[3], (batch, t_len, n_heads, head_dim))
    index = jnp.arange(t_len)
    valid = jnp.ones((batch, t_len), bool).at[1, :3].set(False)
    bias = A.mask_to_bias(A.causal_mask(valid, index, index)) if with_bias else None
    scale = head_dim**-0.5

    def loss(q, k, v, wrapped):
        if wrapped:
            out = A.cudnn_forward_xla_gradient(q, k, v, bias, scale, "xla")
        else:
            out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="xla")
        return jnp.sum(out * cotangent), out

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    (_, got), grads = jax.jit(grad_fn, static_argnums=3)(q, k, v, True)
    (_, want), ref = grad_fn(q, k, v, False)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for name, g, r in zip("qkv", grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6, err_msg=f"d{name}")


def test_cudnn_gradient_is_opt_in_and_needs_even_lengths(monkeypatch):
    # cuDNN's own backward refused 601-token masked attention on an H100; it is asked for with
    # VLM_JAX_FUSED_GRADIENT=cudnn and taken only after a cuDNN forward, on even lengths
    monkeypatch.delenv("VLM_JAX_FUSED_GRADIENT", raising=False)
    assert A.fused_gradient_kernel("cudnn", 640, 640) == "xla"
    monkeypatch.setenv("VLM_JAX_FUSED_GRADIENT", "cudnn")
    assert A.fused_gradient_kernel("cudnn", 640, 640) == "cudnn"
    assert A.fused_gradient_kernel("cudnn", 601, 601) == "xla"
    assert A.fused_gradient_kernel("xla", 640, 640) == "xla"
    monkeypatch.setenv("VLM_JAX_FUSED_GRADIENT", "cudn")
    with pytest.raises(ValueError, match="VLM_JAX_FUSED_GRADIENT='cudn'"):
        A.fused_gradient_kernel("cudnn", 640, 640)
