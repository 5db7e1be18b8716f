"""The logit lens's CPU kernel (interp/lens_kernel.py): block maxima and log-sum-exp of each row
of logits, against float64 references, at the edges, inside logit_lens, and in its 8-lane build."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import kernel_builds
import vlm_jax as vj
from vlm_jax.interp import lens_kernel
from vlm_jax.interp.logit_lens import logit_lens

pytestmark = pytest.mark.skipif(not lens_kernel.LIBRARY.available(), reason="no C++ compiler for the CPU kernel")


def _reference(logits: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[:, 0]
    return x.reshape(len(x), -1, block).max(-1), lse


@pytest.mark.parametrize("rows, vocab, block", [(37, 4096, 64), (5, 32064, 64), (3, 1024, 128), (2, 48, 16)])
def test_stats_equal_float64_reference(rows, vocab, block):
    rng = np.random.default_rng(vocab + rows)
    logits = (rng.standard_normal((rows, vocab)) * 8 + rng.standard_normal((rows, 1)) * 50).astype(np.float32)
    logits[0, ::7] = -np.inf  # masked entries
    logits[-1, -1] = logits[-1].max() + 40  # the maximum in the last block: every earlier sum is rescaled
    block_max, lse = lens_kernel.logit_stats(jnp.asarray(logits), block)
    want_max, want_lse = _reference(logits, block)
    np.testing.assert_array_equal(np.asarray(block_max), want_max.astype(np.float32))
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=2e-6)


def test_rows_of_infinities_and_nans_follow_logsumexp():
    logits = np.zeros((4, 64), np.float32)
    logits[0] = -np.inf  # every token masked: -inf
    logits[1, 20] = np.nan  # a NaN: NaN
    logits[2, 50] = np.inf  # +inf: +inf
    logits[3, :16] = -np.inf  # a first block of -inf only, then finite values
    _, lse = lens_kernel.logit_stats(jnp.asarray(logits), 16)
    want = np.asarray(jax.nn.logsumexp(jnp.asarray(logits), axis=-1))
    np.testing.assert_array_equal(np.asarray(lse)[:3], want[:3])
    np.testing.assert_allclose(np.asarray(lse)[3], want[3], rtol=1e-6)


def test_lens_with_the_kernel_equals_the_lens_without(random_llava, monkeypatch):
    """A vocabulary large enough for block maxima (8192 tokens: blocks of 64) sends logit_lens
    through the kernel; with the kernels off it takes XLA's reductions. Same top-k, probabilities
    and target ranks."""
    model = vj.load(random_llava, progress=False)
    width = model.config.text.hidden_size
    rng = np.random.default_rng(0)
    params = dict(model.params, lm_head={"kernel": jnp.asarray(rng.standard_normal((width, 8192)), jnp.float32)})
    resid = jnp.asarray(rng.standard_normal((3, 2, 11, width)), jnp.float32)
    targets = np.array([[5, 4000, -1], [8191, -1, -1]], np.int32)
    assert lens_kernel.usable(jnp.float32, 64)
    with_kernel = logit_lens(params, model.config, resid, k=5, targets=targets, chunk=8)
    monkeypatch.setenv("VLM_JAX_CPU_KERNELS", "0")
    monkeypatch.setattr(lens_kernel.LIBRARY, "_status", {})
    assert not lens_kernel.usable(jnp.float32, 64)
    jax.clear_caches()  # the lens was compiled with the kernel
    without = logit_lens(params, model.config, resid, k=5, targets=targets, chunk=8)
    np.testing.assert_array_equal(np.asarray(with_kernel.top_ids), np.asarray(without.top_ids))
    for field in ("top_probs", "first_prob", "best_prob"):
        np.testing.assert_allclose(np.asarray(getattr(with_kernel, field)), np.asarray(getattr(without, field)),
                                   rtol=1e-5, err_msg=field)
    for field in ("first_rank", "best_rank"):
        np.testing.assert_array_equal(np.asarray(getattr(with_kernel, field)), np.asarray(getattr(without, field)))


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="float32 logits"):
        lens_kernel.logit_stats(jnp.zeros((2, 64), jnp.bfloat16), 16)
    with pytest.raises(ValueError, match="cannot take blocks of 24 over 64 logits"):
        lens_kernel.logit_stats(jnp.zeros((2, 64)), 24)
    with pytest.raises(ValueError, match="cannot take blocks of 64 over 96 logits"):
        lens_kernel.logit_stats(jnp.zeros((2, 96)), 64)


def test_vector_lanes_follow_the_build():
    from vlm_jax.native import build

    assert lens_kernel.vector_lanes() == (16 if build.cpu_has("avx512f") and "-mno-avx512f" not in
                                          build.compiler_flags() else 8)


@pytest.mark.skipif(not kernel_builds.both_widths_here(), reason=kernel_builds.SKIP_REASON)
def test_the_eight_lane_build_agrees_too(tmp_path):
    kernel_builds.check_eight_lane_build(__file__, "float64_reference or infinities or vector_lanes", "logit_stats",
                                         tmp_path / "cache")
