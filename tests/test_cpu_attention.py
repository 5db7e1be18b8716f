"""The blocked attention's forward as one CPU kernel (nn/cpu_attention.py) against XLA's blocked
path (attention._blocked_attention_forward with the kernel off), and where attention uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_factory
import kernel_builds
import vlm_jax as vj
from vlm_jax.native import build
from vlm_jax.nn import attention as A
from vlm_jax.nn import cpu_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU attention kernel cannot be built here")


def xla_blocked_forward(q, k, v, bias, scale, block):
    """XLA's path (attention._blocked_attention_forward) for the kernel's layout: q [B, T, K, G, E],
    k, v [B, T, K, E] -> out [B, T, K, G, E], lse [B, K, G, T]."""
    out, lse = jax.jit(A._blocked_attention_forward, static_argnums=(4, 5))(
        q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias, scale, block)
    return out.transpose(0, 3, 1, 2, 4), lse


def inputs(batch, kv, groups, t_len, head_dim, seed=0):
    """q [B, T, K, G, E], k, v [B, T, K, E] (float32, standard normal)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                 for shape in ((batch, t_len, kv, groups, head_dim), (batch, t_len, kv, head_dim),
                               (batch, t_len, kv, head_dim)))


def causal_bias(batch, t_len, left_padding=0, right_padding=0):
    valid = np.ones((batch, t_len), bool)
    valid[-1, :left_padding] = False  # the last sequence left-padded: queries that see no key at all
    if right_padding:
        valid[0, t_len - right_padding:] = False
    index = jnp.arange(t_len)
    return A.mask_to_bias(A.causal_mask(jnp.asarray(valid), index, index))


@pytest.mark.parametrize("batch,kv,groups,t_len,head_dim,block", [
    (1, 2, 1, 37, 16, 8),     # causal blocks, a ragged last block and tile
    (2, 2, 3, 50, 24, 16),    # grouped-query heads, a head size that is not whole 16-key tiles
    (2, 1, 2, 29, 8, 7),      # the smallest head size, blocks of 7
    (1, 3, 1, 300, 64, 128),  # several 128-row chunks per block, the model's head size
    (1, 2, 2, 41, 56, 16),    # a head size that takes every column path: pairs of vectors, one, 8 lanes
    (2, 2, 1, 45, 16, 45),    # one block of every key (plain attention)
    (1, 1, 1, 1, 8, 1),       # a single token
])
@pytest.mark.parametrize("mask", ["per-sequence", "shared", "none", "left-padded", "right-padded"])
def test_kernel_equals_the_xla_blocked_path(batch, kv, groups, t_len, head_dim, block, mask):
    """Outputs and log-sum-exps agree to float32 rounding, also for queries that see no key
    (left padding: the kernel then keeps every key of the block, as XLA's path averages them)."""
    q, k, v = inputs(batch, kv, groups, t_len, head_dim)
    bias = {"per-sequence": causal_bias(batch, t_len), "shared": causal_bias(1, t_len), "none": None,
            "left-padded": causal_bias(batch, t_len, left_padding=min(5, t_len)),
            "right-padded": causal_bias(batch, t_len, right_padding=t_len // 3)}[mask]
    scale = head_dim ** -0.5
    out, lse = jax.jit(cpu_attention.blocked_attention_forward, static_argnums=(4, 5))(q, k, v, bias, scale, block)
    want_out, want_lse = xla_blocked_forward(q, k, v, bias, scale, block)
    assert out.shape == q.shape and lse.shape == (batch, kv, groups, t_len)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("batch,kv,groups,t_len,head_dim,block", [
    (1, 2, 1, 37, 16, 8), (2, 2, 3, 50, 24, 16), (1, 3, 1, 300, 64, 128), (1, 2, 2, 41, 56, 16), (2, 1, 2, 29, 8, 7),
    (2, 2, 1, 45, 16, 45)])
@pytest.mark.parametrize("mask", ["per-sequence", "shared", "none", "left-padded"])
def test_backward_kernel_equals_the_xla_backward(batch, kv, groups, t_len, head_dim, block, mask):
    """d_q, d_k and d_v from the kernel equal the XLA path's custom backward
    (attention._blocked_attention_bwd), for every row, padding rows included."""
    q, k, v = inputs(batch, kv, groups, t_len, head_dim, seed=5)
    d_out = inputs(batch, kv, groups, t_len, head_dim, seed=6)[0]
    bias = {"per-sequence": causal_bias(batch, t_len), "shared": causal_bias(1, t_len), "none": None,
            "left-padded": causal_bias(batch, t_len, left_padding=5)}[mask]
    scale = head_dim ** -0.5
    out, lse = cpu_attention.blocked_attention_forward(q, k, v, bias, scale, block)
    got = jax.jit(cpu_attention.blocked_attention_backward, static_argnums=(7, 8))(
        q, k, v, bias, out, lse, d_out, scale, block)
    rows, heads = (0, 2, 3, 1, 4), (0, 2, 1, 3)
    want_q, want_k, want_v, _ = jax.jit(A._blocked_attention_bwd, static_argnums=(0, 1))(
        scale, block, (q.transpose(rows), k.transpose(heads), v.transpose(heads), bias, out.transpose(rows), lse),
        d_out.transpose(rows))
    for name, g, w in zip("qkv", got, (want_q.transpose(0, 3, 1, 2, 4), want_k.transpose(heads),
                                       want_v.transpose(heads))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()), err_msg=f"d{name}")


def test_a_mask_that_is_not_the_float_minimum_is_not_skipped():
    """Keys masked with -1e9 (not mask_to_bias's minimum) still count as exp(-1e9 - max) = 0 in
    both paths, and a row masked that way everywhere averages every key in both."""
    q, k, v = inputs(2, 2, 1, 40, 16, seed=3)
    bias = jnp.where(causal_bias(2, 40, left_padding=4) < 0, -1e9, 0.0)
    got = cpu_attention.blocked_attention_forward(q, k, v, bias, 0.25, 16)
    want = xla_blocked_forward(q, k, v, bias, 0.25, 16)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_vmapped_kernel_equals_one_call_per_item():
    """Under vmap (as the ablation sweeps run) the kernel takes the vmapped axis as more
    sequences; an unbatched mask is shared by every item."""
    q, k, v = inputs(6, 2, 2, 33, 8, seed=1)
    q, k, v = (x.reshape(3, 2, *x.shape[1:]) for x in (q, k, v))
    bias = causal_bias(2, 33, left_padding=3)

    def one(q, k, v):
        return cpu_attention.blocked_attention_forward(q, k, v, bias, 0.5, 8)

    batched = jax.jit(jax.vmap(one))(q, k, v)
    for i in range(3):
        single = xla_blocked_forward(q[i], k[i], v[i], bias, 0.5, 8)
        for got, want in zip(batched, single):
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=2e-6)


def test_where_the_kernel_is_used():
    assert cpu_attention.usable(jnp.float32, 64)
    assert not cpu_attention.usable(jnp.bfloat16, 64)  # the kernel is float32 only
    assert not cpu_attention.usable(jnp.float32, 12)  # head sizes of whole vectors only
    mesh = jax.sharding.AbstractMesh((2,), ("data",))
    with jax.sharding.use_abstract_mesh(mesh):
        assert not cpu_attention.usable(jnp.float32, 64)  # not partitioned: XLA's path under a mesh


def test_bad_inputs_are_explained():
    q, k, v = inputs(1, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="float32 heads"):
        cpu_attention.blocked_attention_forward(q.astype(jnp.bfloat16), k, v, None, 1.0, 4)
    with pytest.raises(ValueError, match=r"q \[B, T, K, G, E\]"):
        cpu_attention.blocked_attention_forward(q, k[:, :4], v, None, 1.0, 4)


def test_model_forward_and_gradient_run_the_kernel_and_agree_with_xla(monkeypatch, hf_checkpoints):
    """A whole model: the compiled forward calls the kernel (text decoder and vision tower), and its
    logits and the gradient of a loss equal those with XLA's attention."""
    case = "clip-gelu-llama3rope-gqa-tied-multilayer"
    folder, _, hf_config = hf_checkpoints(case)
    model = vj.load(folder, progress=False)
    arrays = {k: jnp.asarray(v) for k, v in hf_factory.make_batch(hf_config, hf_factory.image_size(case)).items()}

    def run():  # a new function each time: jit's cache would keep the first trace's choice of kernel
        def loss(params):
            logits = vj.forward(params, model.config, arrays).logits
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * arrays["attention_mask"]), logits

        program = jax.jit(loss).lower(model.params).as_text()
        return program.count("vlm_jax_blocked_attention"), jax.jit(jax.value_and_grad(loss, has_aux=True))(model.params)

    calls, ((_, logits), grads) = run()
    assert calls >= 2  # the text decoder's and the vision tower's attention
    with monkeypatch.context() as m:
        m.setattr(cpu_attention, "usable", lambda dtype, head_dim: False)
        calls, ((_, want_logits), want_grads) = run()
    assert calls == 0
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_switched_off_kernel_means_xla_attention(monkeypatch):
    monkeypatch.setenv("VLM_JAX_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_attention.LIBRARY, "_status", {})
    assert not cpu_attention.usable(jnp.float32, 64)
    q = jnp.ones((1, 4, 2, 8))
    out, _ = A.attention(q, q, q, scale=1.0, causal_block=2)
    assert out.shape == q.shape
    with pytest.raises(RuntimeError, match="not available"):
        cpu_attention.blocked_attention_forward(*inputs(1, 2, 1, 4, 8), None, 1.0, 2)


@pytest.mark.skipif(not kernel_builds.both_widths_here(), reason=kernel_builds.SKIP_REASON)
def test_the_eight_lane_build_agrees_too(tmp_path):
    """On an AVX-512 machine the kernels use 16-lane vectors and 12-row tiles; built with
    -mno-avx512f they use the 8-lane, 6-row form every AVX2 machine runs. The equality tests pass
    with that build too, for the head sizes and tiles of both forms."""
    kernel_builds.check_eight_lane_build(__file__, "equals and (per-sequence or left-padded)", "blocked_attention",
                                         tmp_path / "cache")


def test_extra_compiler_flags_change_the_cached_library(monkeypatch):
    plain = cpu_attention.LIBRARY.library_path()
    monkeypatch.setenv("VLM_JAX_CXXFLAGS", "-mno-avx512f -DEXAMPLE")
    assert build.compiler_flags()[-2:] == ("-mno-avx512f", "-DEXAMPLE")
    assert cpu_attention.LIBRARY.library_path() != plain
