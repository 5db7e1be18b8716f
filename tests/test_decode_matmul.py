"""The CPU kernels for the products of decode steps (nn/decode_matmul.py): stacked weights read in
place and weights packed in column panels, and their use in generate."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_factory
import kernel_builds
import vlm_jax as vj
from vlm_jax import generate as gen
from vlm_jax.models import layers, text_decoder
from vlm_jax.native import build
from vlm_jax.nn import decode_matmul


@pytest.mark.parametrize("form", ["stacked", "packed"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 11])
@pytest.mark.parametrize("depth,width", [(48, 40), (64, 16), (5, 100), (13, 7), (32, 300)])
def test_products_equal_float64_reference(form, rows, depth, width):
    """Any row count (more than 8 in passes of 8), depths and widths that are not whole blocks,
    vectors or panels, a layer inside a stack, under jit."""
    rng = np.random.default_rng(rows * 1000 + depth + width)
    x = rng.standard_normal((rows, depth)).astype(np.float32)
    stack = rng.standard_normal((3, depth, width)).astype(np.float32)
    if form == "stacked":
        kernel = decode_matmul.layer_of(jnp.asarray(stack), 1, 1)
        assert kernel.shape == (depth, width) and kernel.stack.shape == stack.shape  # no slice taken
    else:
        kernel = decode_matmul.pack(jnp.asarray(stack[1]), 1)
        assert kernel.panels.shape == (-(-width // 16), depth, 16) and kernel.shape == (depth, width)
    y = np.asarray(jax.jit(decode_matmul.matmul)(jnp.asarray(x), kernel))
    reference = x.astype(np.float64) @ stack[1].astype(np.float64)
    assert y.shape == (rows, width)
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("form", ["stacked", "packed"])
def test_projections_with_kernel_forms_equal_plain_ones(form):
    """layers._project multiplies with either form as with the array: several contracted axes
    (o_proj's [H, E, D]), several output axes (q_proj's [D, H, E]), a bias and LoRA adapters."""
    rng = np.random.default_rng(0)
    f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731

    def as_form(kernel, n_in):
        return decode_matmul.layer_of(kernel[None], 0, n_in) if form == "stacked" else decode_matmul.pack(kernel, n_in)

    x = f32(3, 1, 24)
    q_proj = {"kernel": f32(24, 4, 6), "bias": f32(4, 6), "lora_a": f32(24, 2), "lora_b": f32(2, 4, 6),
              "lora_scale": jnp.float32(0.5)}
    converted = {**q_proj, "kernel": as_form(q_proj["kernel"], 1)}
    np.testing.assert_allclose(layers.project_heads(x, converted), layers.project_heads(x, q_proj),
                               rtol=1e-5, atol=1e-5)
    heads = f32(3, 1, 4, 6)
    o_proj = {"kernel": f32(4, 6, 24)}
    converted = {"kernel": as_form(o_proj["kernel"], 2)}
    np.testing.assert_allclose(jax.jit(layers.merge_heads)(heads, converted), layers.merge_heads(heads, o_proj),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="float32 kernels"):
        decode_matmul.pack(jnp.zeros((8, 16), jnp.bfloat16), 1)
    with pytest.raises(ValueError, match="float32 kernels"):
        decode_matmul.layer_of(jnp.zeros((2, 8, 16), jnp.bfloat16), 0, 1)
    with pytest.raises(ValueError, match="outside the stack of 2 layers"):
        decode_matmul.layer_of(jnp.zeros((2, 8, 16), jnp.float32), 2, 1)
    packed = decode_matmul.pack(jnp.zeros((8, 16), jnp.float32), 1)
    with pytest.raises(ValueError, match=r"rows \[M, 8\]"):
        decode_matmul.matmul(jnp.zeros((2, 9), jnp.float32), packed)
    lm = {"layers": ({},), "embed_tokens": {"embedding": jnp.zeros((4, 8))}}
    with pytest.raises(ValueError, match="stacked layers"):
        text_decoder.decode_kernels(lm, None, "stacked")


@pytest.mark.parametrize("form", ["stacked", "packed"])
def test_decoder_with_kernel_forms_equals_plain_decoder(form):
    """decode_kernels on a whole decoder (lm_head or tied embeddings): every layer's products and
    the unembedding equal those of the unstacked parameters."""
    from vlm_jax.config import TextConfig
    from vlm_jax.models.params import init_from_specs

    for tied in (False, True):
        cfg = TextConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=4, tie_word_embeddings=tied)
        lm = init_from_specs(text_decoder.param_specs(cfg), jax.random.key(1), std=0.3)
        lm_head = None if tied else {"kernel": jax.random.normal(jax.random.key(2), (16, 40))}
        converted, head = text_decoder.decode_kernels(lm, lm_head, form)
        plain = text_decoder.unstack_layers(lm)
        h = jax.random.normal(jax.random.key(3), (2, 1, 16))
        for i, layer in enumerate(converted["layers"]):
            for (module, name), n_in in text_decoder.PROJECTIONS.items():
                ours, theirs = layer[module][name], plain["layers"][i][module][name]
                assert isinstance(ours["kernel"], decode_matmul.KERNEL_FORMS)
                x = jax.random.normal(jax.random.key(i), (2, 1, *theirs["kernel"].shape[:n_in]))
                np.testing.assert_allclose(layers._project(x, ours, n_in), layers._project(x, theirs, n_in),
                                           rtol=1e-5, atol=1e-5)
            assert layer["input_layernorm"]["scale"].shape == (16,)  # small parameters sliced per layer
        if tied and form == "stacked":
            assert head is None  # XLA's product of the tied embedding stays
        np.testing.assert_allclose(text_decoder.unembed(converted, head, h), text_decoder.unembed(lm, lm_head, h),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lanes", [8, 16])
def test_decode_form_by_rows_tokens_and_vector_width(monkeypatch, hf_checkpoints, lanes):
    """AVX2 kernels (8 lanes): 1-2 rows stacked weights in place; 3-4 the same for short
    generations, packed for long ones; 5-8 packed. AVX-512 kernels (16 lanes): stacked for 1-8
    rows. More rows: XLA's products."""
    folder = hf_checkpoints("clip-llama-mha")[0]
    model = vj.load(folder, progress=False)
    monkeypatch.setattr(decode_matmul, "vector_lanes", lambda: lanes)
    forms = {rows: gen.decode_kernel_form(model.params, rows) for rows in (1, 2, 4, 5, 8, 9)}
    if lanes == 16:
        assert forms == {1: "stacked", 2: "stacked", 4: "stacked", 5: "stacked", 8: "stacked", 9: None}
        return
    assert forms == {1: "stacked", 2: "stacked", 4: "packed", 5: "packed", 8: "packed", 9: None}
    # 3-4 rows copy the weights into panels only for generations long enough to repay the copy
    assert [gen.decode_kernel_form(model.params, rows, 32) for rows in (3, 4, 5)] == ["stacked", "stacked", "packed"]
    assert gen.decode_kernel_form(model.params, 4, gen.PACKED_FROM_TOKENS) == "packed"


def test_vector_lanes_follow_the_build():
    wide = build.cpu_has("avx512f") and "-mno-avx512f" not in build.compiler_flags()
    assert decode_matmul.vector_lanes() == (16 if wide else 8)


def test_generate_keeps_the_tokens_in_every_form(hf_checkpoints):
    """Stacked weights in place (no copy of a layer's weights in the program), packed panels and
    XLA's products give the same tokens (and transformers': test_generate.py)."""
    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"), padding="left")
    text = model.config.text
    mlp_kernel = re.compile(rf"= f32\[(1,)?({text.hidden_size},{text.intermediate_size}|"
                            rf"{text.intermediate_size},{text.hidden_size})\]")

    def program(form):
        gen.decode_kernel_form = lambda params, rows, new_tokens=None: form
        return gen.decode_program_text(model.params, model.config, batch["input_ids"], batch["attention_mask"],
                                       batch["pixel_values"], new_slots=8)

    chosen = gen.decode_kernel_form
    tokens = {}
    try:
        hlo = {form: program(form) for form in ("stacked", None)}
        for form in ("stacked", "packed", None):
            gen.decode_kernel_form = lambda params, rows, new_tokens=None, form=form: form
            tokens[form] = model.generate(batch, 12, eos_token_ids=()).tokens
    finally:
        gen.decode_kernel_form = chosen
    assert "vlm_jax_stacked_matmul" in hlo["stacked"] and "vlm_jax_panel_matmul" not in hlo["stacked"]
    # the per-layer copies of the MLP weights (3 per layer) are gone; the prefill's scan keeps its slices
    copies = {form: len(mlp_kernel.findall(text_)) for form, text_ in hlo.items()}
    assert copies[None] - copies["stacked"] >= 3 * text.num_layers, copies
    np.testing.assert_array_equal(tokens["stacked"], tokens[None])
    np.testing.assert_array_equal(tokens["packed"], tokens[None])


def test_switched_off_kernels_mean_xla_products(monkeypatch, hf_checkpoints):
    folder, _, _ = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    monkeypatch.setenv("VLM_JAX_CPU_KERNELS", "0")
    monkeypatch.setattr(decode_matmul.LIBRARY, "_status", {})
    assert not decode_matmul.available()
    assert gen.decode_kernel_form(model.params, 4) is None
    with pytest.raises(RuntimeError, match="not available"):
        decode_matmul.matmul(jnp.zeros((2, 8)), decode_matmul.pack(jnp.zeros((8, 16)), 1))


@pytest.mark.skipif(not kernel_builds.both_widths_here(), reason=kernel_builds.SKIP_REASON)
def test_the_eight_lane_build_agrees_too(tmp_path):
    """On an AVX-512 machine the stacked kernel runs column strips of 16-lane vectors; built with
    -mno-avx512f it takes the row-block path of AVX2 machines. The reference tests pass with that
    build too."""
    kernel_builds.check_eight_lane_build(__file__, "float64_reference or vector_lanes", "decode_matmul",
                                         tmp_path / "cache")
