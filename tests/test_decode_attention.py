"""The CPU kernel for a decode step's attention over the cache (nn/decode_attention.py), against
the explicit attention, and its use in generate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_factory
import vlm_jax as vj
from vlm_jax import generate as gen
from vlm_jax.nn import decode_attention
from vlm_jax.nn.attention import attention

MIN = np.finfo(np.float32).min


def explicit(q, k_cache, v_cache, bias, scale):
    """The explicit attention on the same cache ([B*K, S, E] -> [B, S, K, E])."""
    batch = q.shape[0]
    k, v = (jnp.asarray(c).reshape(batch, -1, *c.shape[1:]).transpose(0, 2, 1, 3) for c in (k_cache, v_cache))
    return attention(jnp.asarray(q), k, v, scale=scale, bias=jnp.asarray(bias)[:, None, None, :])[0]


@pytest.mark.parametrize("batch,kv_heads,groups,width", [(1, 8, 1, 64), (3, 2, 4, 24), (2, 1, 3, 13)])
def test_kernel_equals_explicit_attention(batch, kv_heads, groups, width):
    """GQA groups, head widths that are not whole vectors, left padding, a sliding window (slots
    masked in the middle), and slots after `length` that hold garbage (never read)."""
    rng = np.random.default_rng(batch * 100 + groups)
    slots, length = 40, 29
    q = rng.standard_normal((batch, 1, kv_heads * groups, width)).astype(np.float32)
    k = rng.standard_normal((batch * kv_heads, slots, width)).astype(np.float32)
    v = rng.standard_normal((batch * kv_heads, slots, width)).astype(np.float32)
    valid = np.zeros((batch, slots), bool)
    valid[:, :length] = True
    valid[0, :3] = False  # left padding
    valid[-1, 5:12] = False  # outside a window
    bias = np.where(valid, 0.0, MIN).astype(np.float32)
    k[:, length:] = 1e30  # unfilled slots: the kernel must not read them
    ours = jax.jit(decode_attention.decode_attention, static_argnums=5)(q, k, v, bias, jnp.int32(length), 0.125)
    k[:, length:] = 0.0
    reference = explicit(q, k, v, bias, 0.125)
    assert ours.shape == q.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_explained():
    q = jnp.zeros((2, 1, 4, 8))
    cache = jnp.zeros((4, 10, 8))
    with pytest.raises(ValueError, match=r"q \[B, 1, H, E\]"):
        decode_attention.decode_attention(jnp.zeros((2, 2, 4, 8)), cache, cache, jnp.zeros((2, 10)), 3, 1.0)
    with pytest.raises(ValueError, match="bias"):
        decode_attention.decode_attention(q, cache, cache, jnp.zeros((2, 9)), 3, 1.0)
    with pytest.raises(ValueError, match="float32"):
        decode_attention.decode_attention(q.astype(jnp.bfloat16), cache, cache, jnp.zeros((2, 10)), 3, 1.0)


def test_generate_runs_the_decode_attention_in_the_kernel(hf_checkpoints):
    """With the decode kernels (1-8 rows on CPU) the decode loop's attention is the kernel's; the
    prefill keeps XLA's blocked attention. Tokens: test_decode_matmul.py and test_generate.py."""
    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"), padding="left")
    hlo = gen.decode_program_text(model.params, model.config, batch["input_ids"], batch["attention_mask"],
                                  batch["pixel_values"], new_slots=8)
    assert hlo.count('custom_call_target="vlm_jax_decode_attention"') == model.config.text.num_layers
