"""The CPU kernel for few-row products with column-panel weights (nn/panel_matmul.py), and its use
in generate's decode steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_factory
import vlm_jax as vj
from vlm_jax import generate as gen
from vlm_jax.models import layers, text_decoder
from vlm_jax.nn import panel_matmul


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 11])
@pytest.mark.parametrize("depth,width", [(48, 40), (64, 16), (5, 100)])
def test_packed_product_equals_float64_reference(rows, depth, width):
    """Any row count (more than 8 in passes of 8), widths that are not whole panels (zero
    columns padded and dropped), under jit."""
    rng = np.random.default_rng(rows * 1000 + depth + width)
    x = rng.standard_normal((rows, depth)).astype(np.float32)
    w = rng.standard_normal((depth, width)).astype(np.float32)
    packed = panel_matmul.pack(jnp.asarray(w), 1)
    assert packed.panels.shape == (-(-width // 16), depth, 16) and packed.shape == (depth, width)
    y = np.asarray(jax.jit(panel_matmul.matmul)(jnp.asarray(x), packed))
    reference = x.astype(np.float64) @ w.astype(np.float64)
    assert y.shape == (rows, width)
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_projections_with_packed_kernels_equal_plain_ones():
    """layers._project multiplies with a packed kernel as with the array: several contracted axes
    (o_proj's [H, E, D]), several output axes (q_proj's [D, H, E]), a bias and LoRA adapters."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    x = f32(3, 1, 24)
    q_proj = {"kernel": f32(24, 4, 6), "bias": f32(4, 6), "lora_a": f32(24, 2), "lora_b": f32(2, 4, 6),
              "lora_scale": jnp.float32(0.5)}
    packed = {**q_proj, "kernel": panel_matmul.pack(q_proj["kernel"], 1)}
    np.testing.assert_allclose(layers.project_heads(x, packed), layers.project_heads(x, q_proj), rtol=1e-5, atol=1e-5)
    heads = f32(3, 1, 4, 6)
    o_proj = {"kernel": f32(4, 6, 24)}
    packed = {"kernel": panel_matmul.pack(o_proj["kernel"], 2)}
    np.testing.assert_allclose(jax.jit(layers.merge_heads)(heads, packed), layers.merge_heads(heads, o_proj),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="float32 kernels"):
        panel_matmul.pack(jnp.zeros((8, 16), jnp.bfloat16), 1)
    packed = panel_matmul.pack(jnp.zeros((8, 16), jnp.float32), 1)
    with pytest.raises(ValueError, match=r"rows \[M, 8\]"):
        panel_matmul.matmul(jnp.zeros((2, 9), jnp.float32), packed)
    lm = {"layers": {"mlp": {}}, "embed_tokens": {"embedding": jnp.zeros((4, 8))}}
    with pytest.raises(ValueError, match="unstack_layers"):
        text_decoder.pack_kernels(lm, None)


def test_generate_packs_the_decode_weights_for_few_rows_and_keeps_the_tokens(hf_checkpoints):
    """At 2 rows the compiled decode loop multiplies in the kernel, at 1 row with XLA's products;
    the tokens are those of XLA's products (and of transformers: test_generate.py)."""
    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"), padding="left")
    assert gen.uses_packed_kernels(model.params, 2) and not gen.uses_packed_kernels(model.params, 1)
    assert not gen.uses_packed_kernels(model.params, panel_matmul.MAX_ROWS + 1)
    for rows, expected in ((2, True), (1, False)):
        hlo = gen.decode_program_text(model.params, model.config, batch["input_ids"][:rows],
                                      batch["attention_mask"][:rows], batch["pixel_values"][:rows], new_slots=8)
        assert ("vlm_jax_panel_matmul" in hlo) == expected, rows

    packed = model.generate(batch, 12, eos_token_ids=()).tokens
    plain = gen.uses_packed_kernels
    try:
        gen.uses_packed_kernels = lambda params, batch_size: False
        unpacked = model.generate(batch, 12, eos_token_ids=()).tokens
    finally:
        gen.uses_packed_kernels = plain
    np.testing.assert_array_equal(packed, unpacked)


def test_tied_embeddings_get_a_packed_unembedding():
    """Without an lm_head the packed unembedding is the embedding's transpose."""
    rng = np.random.default_rng(3)
    embedding = jnp.asarray(rng.standard_normal((40, 8)), jnp.float32)
    lm = {"layers": (), "embed_tokens": {"embedding": embedding}}
    _, head = text_decoder.pack_kernels(lm, None)
    h = jnp.asarray(rng.standard_normal((2, 1, 8)), jnp.float32)
    np.testing.assert_allclose(text_decoder.unembed(lm, head, h), text_decoder.unembed(lm, None, h),
                               rtol=1e-5, atol=1e-5)


def test_switched_off_kernel_means_xla_products(monkeypatch, hf_checkpoints):
    folder, _, _ = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    monkeypatch.setenv("VLM_JAX_CPU_KERNELS", "0")
    monkeypatch.setattr(panel_matmul.LIBRARY, "_status", {})
    assert not panel_matmul.available()
    assert not gen.uses_packed_kernels(model.params, 4)
    with pytest.raises(RuntimeError, match="not available"):
        panel_matmul.matmul(jnp.zeros((2, 8)), panel_matmul.pack(jnp.zeros((8, 16)), 1))
