"""The weight products of models/layers.py: flat 2-D products equal the per-axis einsums (with
LoRA and biases), and their gradients never copy an activation transposed."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import layers


def _params(keys, kernel_shape, n_in, rank=3):
    """A kernel with bias and LoRA A [*in, r] / B [r, *out], as lora.add_lora lays them out."""
    in_shape, out_shape = kernel_shape[:n_in], kernel_shape[n_in:]
    return {"kernel": jax.random.normal(keys[0], kernel_shape), "bias": jax.random.normal(keys[1], out_shape),
            "lora_a": jax.random.normal(keys[2], (*in_shape, rank)), "lora_b": jax.random.normal(keys[3], (rank, *out_shape)),
            "lora_scale": jnp.float32(0.5)}


CASES = {  # function, kernel shape, contracted axes, einsum of the kernel, of LoRA A, of LoRA B
    "linear": (layers.linear, (8, 12), 1, "...i,io->...o", "...i,ir->...r", "...r,ro->...o"),
    "project_heads": (layers.project_heads, (8, 4, 3), 1, "...d,dhe->...he", "...d,dr->...r", "...r,rhe->...he"),
    "merge_heads": (layers.merge_heads, (4, 3, 8), 2, "...he,hed->...d", "...he,her->...r", "...r,rd->...d"),
}


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("name", sorted(CASES))
def test_flat_products_equal_the_einsums(name, tokens):
    """Each projection (kernel + LoRA + bias) equals its einsum form, for one token (a decode
    step) and several, in value and in every gradient."""
    fn, shape, n_in, main, low_a, low_b = CASES[name]
    keys = jax.random.split(jax.random.key(0), 5)
    params = _params(keys, shape, n_in)
    x = jax.random.normal(keys[4], (2, tokens, *shape[:n_in]))

    def reference(params, x):
        low = jnp.einsum(low_b, jnp.einsum(low_a, x, params["lora_a"]), params["lora_b"]) * params["lora_scale"]
        return jnp.einsum(main, x, params["kernel"]) + low + params["bias"]

    np.testing.assert_allclose(np.asarray(fn(x, params)), np.asarray(reference(params, x)), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda p, x: jnp.sum(jnp.sin(fn(x, p))), argnums=(0, 1))(params, x)
    theirs = jax.grad(lambda p, x: jnp.sum(jnp.sin(reference(p, x))), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_weight_gradients_never_transpose_an_activation():
    """The compiled gradient of the SwiGLU MLP and of the attention projections has no buffer with
    the B*T token rows as its minor axis: the weight gradients read the activations as they are.
    Contracted over [B, T] as two axes, XLA CPU copied activations transposed before each weight
    gradient (the MLP's gradient at 2 x 601 tokens: 150 vs 108 ms; benchmarks/RESULTS.md)."""
    batch, t_len, d, f, heads, e = 2, 24, 16, 40, 4, 4
    rows = batch * t_len
    keys = jax.random.split(jax.random.key(1), 8)
    mlp = {"gate_proj": {"kernel": jax.random.normal(keys[0], (d, f))},
           "up_proj": {"kernel": jax.random.normal(keys[1], (d, f))},
           "down_proj": {"kernel": jax.random.normal(keys[2], (f, d))}}
    attn = {"q_proj": {"kernel": jax.random.normal(keys[3], (d, heads, e))},
            "o_proj": {"kernel": jax.random.normal(keys[4], (heads, e, d))}}
    x = jax.random.normal(keys[5], (batch, t_len, d))

    def loss(mlp, attn, x):
        h = x + layers.merge_heads(jnp.tanh(layers.project_heads(x, attn["q_proj"])), attn["o_proj"])
        return jnp.sum(jnp.sin(layers.gated_mlp(h, mlp, "silu")))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    program = grad.lower(mlp, attn, x).compile().as_text()
    program = program[program.index("ENTRY"):]
    transposed = [line.strip()[:160] for line in program.splitlines()
                  if re.search(rf"= f32\[\d+,{rows}\]", line)]
    assert not transposed, f"activations copied transposed in the gradient: {transposed}"
