"""The blocked causal attention and its custom (flash-style) backward against plain autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.nn import attention as A


@pytest.mark.parametrize("batch", [1, 2])
def test_blocked_causal_attention_gradients_match_autodiff_of_the_unblocked_path(batch):
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

    def loss(q, k, v, block):
        out, _ = A.attention(q, k, v, scale=head_dim**-0.5, bias=bias, causal_block=block)
        return jnp.sum(out * cotangent), out

    (_, blocked), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, 16)
    (_, plain), ref = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, None)
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(blocked)[rows], np.asarray(plain)[rows], rtol=1e-5, atol=1e-6)
    for name, got, want in zip("qkv", grads, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")
    # the blocked path really took the custom backward (no autodiff through its blocks)
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda q: loss(q, k, v, 16)[0])(q))
