"""The fused attention's TPU kernel (nn/tpu_attention.py: splash attention), run on CPU through
Pallas's interpreter (VLM_JAX_TPU_ATTENTION=interpret), against the explicit attention.

Real positions must agree to float32 rounding, forward and backward; padded positions only need
to be finite (the kernel's padded queries read other keys than the bias's, and nothing real reads
them). The sharded runs (shard_map on 8 host devices) are in test_sharding.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.nn import tpu_attention
from vlm_jax.nn.attention import attention, causal_mask, mask_to_bias
from vlm_jax.nn.tpu_attention import MaskStructure

TOL = 1e-5


@pytest.fixture
def interpret(monkeypatch):
    """The kernel through Pallas's interpreter, with no program traced before (jit caches are
    keyed on the arguments, not on the setting) carried in or out."""
    monkeypatch.setenv("VLM_JAX_TPU_ATTENTION", "interpret")
    jax.clear_caches()
    yield
    jax.clear_caches()


def heads(rng, batch, t_len, n, e=16):
    return jnp.asarray(rng.standard_normal((batch, t_len, n, e)), jnp.float32)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 2), (3, 3)])
@pytest.mark.parametrize("case", ["left_padded", "right_padded", "window", "no_mask"])
def test_kernel_equals_the_explicit_attention_forward_and_backward(interpret, n_heads, n_kv, case):
    rng = np.random.default_rng(0)
    batch, t_len, e = 2, 150, 16  # 150: the kernel pads to 256 rows (two of its blocks)
    q, k, v = heads(rng, batch, t_len, n_heads), heads(rng, batch, t_len, n_kv), heads(rng, batch, t_len, n_kv)
    real = np.ones((batch, t_len), bool)
    if case == "left_padded":
        real[0, :7] = False
    elif case == "right_padded":
        real[1, -20:] = False
    real = jnp.asarray(real)
    index = jnp.arange(t_len)
    window = 9 if case == "window" else None
    if case == "no_mask":
        bias, structure = None, None
    else:
        bias, structure = mask_to_bias(causal_mask(real, index, index, window)), MaskStructure(real, True, window)

    def loss(q, k, v, fused, weights):
        out = attention(q, k, v, scale=e**-0.5, bias=bias, fused=fused, structure=structure)[0]
        return jnp.sum(out * weights), out

    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * real[..., None, None]
    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    (ref_q, ref_k, ref_v), ref = grad(q, k, v, False, weights)
    (d_q, d_k, d_v), out = grad(q, k, v, True, weights)
    assert "pallas_call" in str(jax.make_jaxpr(lambda q: loss(q, k, v, True, weights))(q))
    rows = np.asarray(real)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=TOL)
    assert np.isfinite(np.asarray(out)).all()
    for got, want in ((d_q, ref_q), (d_k, ref_k), (d_v, ref_v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL)


def test_bfloat16_heads_with_left_padding(interpret):
    """The accelerators' dtype: bfloat16 in and out, within bfloat16 rounding of float32's result
    at real positions, and finite where a padded query sees only padding."""
    rng = np.random.default_rng(3)
    q, k = heads(rng, 2, 200, 4, 32).astype(jnp.bfloat16), heads(rng, 2, 200, 2, 32).astype(jnp.bfloat16)
    real = np.ones((2, 200), bool)
    real[0, :30] = False
    index = jnp.arange(200)
    bias = mask_to_bias(causal_mask(jnp.asarray(real), index, index))
    out = attention(q, k, k, scale=32**-0.5, bias=bias, fused=True, structure=MaskStructure(jnp.asarray(real)))[0]
    wide = [x.astype(jnp.float32) for x in (q, k)]
    ref = attention(wide[0], wide[1], wide[1], scale=32**-0.5, bias=bias)[0]
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[real], np.asarray(ref)[real], atol=2e-2)


def _pallas_calls(jaxpr) -> int:
    from jax._src import core

    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "pallas_call"
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                count += _pallas_calls(sub.jaxpr) if isinstance(sub, core.ClosedJaxpr) else (
                    _pallas_calls(sub) if isinstance(sub, core.Jaxpr) else 0)
    return count


@pytest.mark.parametrize("remat,backward_calls", [("none", 2), ("dots", 2), ("full", 3)])
def test_remat_dots_keeps_the_kernels_residuals(interpret, remat, backward_calls):
    """The backward runs the dq and dkv kernels; under remat "dots" it finds the forward's output
    and log-sum-exp saved (named like the blocked attention's), under "full" it runs the forward
    kernel again. Counted in the backward's program after dead-code elimination, as XLA runs it."""
    from jax._src.interpreters import partial_eval

    from vlm_jax.models.layers import remat_policy

    rng = np.random.default_rng(2)
    q, k = heads(rng, 2, 130, 4), heads(rng, 2, 130, 2)
    real = jnp.ones((2, 130), bool)

    def layer(q):
        return jnp.sum(jnp.sin(attention(q * 2.0, k, k, scale=0.25, fused=True, structure=MaskStructure(real))[0]))

    policy = remat_policy(remat)
    _, backward = jax.vjp(layer if remat == "none" else jax.checkpoint(layer, policy=policy), q)
    program = jax.make_jaxpr(backward)(1.0).jaxpr
    program, _ = partial_eval.dce_jaxpr(program, [True] * len(program.outvars))
    assert _pallas_calls(program) == backward_calls


def test_a_bias_without_its_structure_keeps_xla_kernel(interpret):
    rng = np.random.default_rng(1)
    q = heads(rng, 1, 130, 2)
    bias = jnp.asarray(rng.standard_normal((1, 1, 130, 130)), jnp.float32)  # not a mask the kernel can build
    text = str(jax.make_jaxpr(lambda q: attention(q, q, q, scale=0.25, bias=bias, fused=True)[0])(q))
    assert "pallas_call" not in text and "dot_general" in text


def test_decode_steps_and_edits_keep_the_other_paths(interpret):
    assert not tpu_attention.usable(1, 64)  # one query against a cache
    assert not tpu_attention.usable(8, 64)
    assert tpu_attention.usable(64, 64)


def test_the_setting_is_checked(monkeypatch):
    monkeypatch.setenv("VLM_JAX_TPU_ATTENTION", "off")
    assert tpu_attention.mode() == "off" and not tpu_attention.usable(64, 64)
    monkeypatch.setenv("VLM_JAX_TPU_ATTENTION", "kernal")
    with pytest.raises(ValueError, match="VLM_JAX_TPU_ATTENTION='kernal'"):
        tpu_attention.mode()
    monkeypatch.delenv("VLM_JAX_TPU_ATTENTION")
    assert tpu_attention.mode() == ("kernel" if jax.default_backend() == "tpu" else "off")


def test_model_forward_gradient_and_generation_with_the_kernel(random_llava, interpret):
    """The whole model with fused attention on the kernel (vision tower unmasked, decoder causal
    over a padded batch): logits at real positions, the gradient of a loss on them, and greedy
    tokens (the prefill runs the kernel; decode steps stay on XLA's) equal the default path's."""
    import vlm_jax as vj
    from vlm_jax.models import llava

    model = vj.load(random_llava, progress=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(3)]
    batch = model.prepare(["<image> what shape is this and what colour is it", "<image> hi", "<image> where"],
                          images=images)
    arrays = dict(batch)
    real = np.asarray(batch.attention_mask).astype(bool)
    assert (~real).any()
    vocab = model.config.text.vocab_size
    weights = jnp.asarray(rng.standard_normal((*real.shape, vocab)), jnp.float32) * real[..., None]

    def loss(params, fused):
        logits = llava.forward(params, model.config, arrays, fused_attention=fused).logits
        return jnp.sum(logits * weights), logits

    assert str(jax.make_jaxpr(lambda p: loss(p, True))(model.params)).count("pallas_call") >= 2  # both towers
    (_, ref), ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, False), has_aux=True))(model.params)
    (_, out), grad = jax.jit(jax.value_and_grad(lambda p: loss(p, True), has_aux=True))(model.params)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=TOL)
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grad))
    for a, b in zip(jax.tree.leaves(ref_grad), jax.tree.leaves(grad)):
        assert float(jnp.abs(a - b).max()) < TOL * largest

    tokens = model.generate(batch, 6, eos_token_ids=(), fused_attention=True).tokens
    np.testing.assert_array_equal(tokens, model.generate(batch, 6, eos_token_ids=()).tokens)


def test_a_jax_without_the_kernel_keeps_xla_with_a_warning(monkeypatch):
    real_import = tpu_attention.importlib.import_module

    def missing(name, *args):
        if "splash_attention" in name:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(tpu_attention.importlib, "import_module", missing)
    monkeypatch.setenv("VLM_JAX_TPU_ATTENTION", "interpret")
    tpu_attention._splash_available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Fix: upgrade jax"):
            assert tpu_attention.mode() == "off" and not tpu_attention.usable(64, 64)
    finally:
        tpu_attention._splash_available.cache_clear()


def test_sweeps_vmap_the_kernel(random_llava, interpret):
    """run_sweep vmaps the forward over edit sets: the kernel runs batched, and each swept
    forward's logits at real positions equal the explicit path's."""
    import vlm_jax as vj

    model = vj.load(random_llava, progress=False)
    rng = np.random.default_rng(4)
    batch = model.prepare(["<image> what shape is it", "<image> hi"],
                          images=[rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)] * 2)
    real = np.asarray(batch.attention_mask).astype(bool)
    edit_sets = [model.edits().zero("vision.resid_post", layers=[i]) for i in range(2)]
    fused = np.asarray(model.run_sweep(batch, edit_sets, fused_attention=True).logits)
    explicit = np.asarray(model.run_sweep(batch, edit_sets, fused_attention=False).logits)
    np.testing.assert_allclose(fused[:, real], explicit[:, real], atol=TOL)


def test_shapes_the_kernel_refuses_fall_back_to_xla_with_a_warning(interpret, monkeypatch):
    # older JAX kernels raised NotImplementedError while tracing head sizes below 128
    def refuse(*args, **kwargs):
        raise NotImplementedError("head_dim_v=16 should be a multiple of 128")

    monkeypatch.setattr(tpu_attention, "_attention_here", refuse)
    rng = np.random.default_rng(5)
    q, k = heads(rng, 1, 130, 4), heads(rng, 1, 130, 2)
    real = jnp.ones((1, 130), bool)
    index = jnp.arange(130)
    bias = mask_to_bias(causal_mask(real, index, index))
    with pytest.warns(UserWarning, match="refused queries .*head_dim_v=16.*Fix: upgrade jax"):
        out = attention(q, k, k, scale=0.25, bias=bias, fused=True, structure=MaskStructure(real))[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(attention(q, k, k, scale=0.25, bias=bias)[0]), atol=TOL)


def test_training_with_the_kernel_matches_the_explicit_path(random_llava, interpret, tmp_path):
    """Three LoRA steps (remat "dots": the kernel's residuals kept; scanned layers; donated
    state) with the kernel and with the explicit attention: the same losses and parameters."""
    import train_task

    import vlm_jax as vj
    from vlm_jax.models import params as P
    from vlm_jax.train import LoraConfig, TrainConfig, Trainer

    model = vj.load(random_llava, dtype="float32", progress=False)

    def trainer(fused, name):
        config = TrainConfig(model=random_llava, train_data=train_task.examples(24, 0), output_dir=str(tmp_path / name),
                             param_dtype="float32", learning_rate=3e-3, batch_size=8, max_steps=3, checkpoint_every=100,
                             remat="dots", lora=LoraConfig(rank=4), fused_attention=fused, progress=False)
        return Trainer(config, model=model)

    runs = {fused: trainer(fused, f"fused-{fused}") for fused in (False, True)}
    results = {fused: t.run() for fused, t in runs.items()}
    assert "pallas_call" in str(jax.make_jaxpr(runs[True]._step)(runs[True].initial_state(), runs[True].frozen,
                                                                  runs[True].batch(0)))
    np.testing.assert_allclose([results[True].losses[s] for s in (1, 2, 3)],
                               [results[False].losses[s] for s in (1, 2, 3)], rtol=1e-5)
    explicit, fused = (P.flatten(t.params(t.state)) for t in (runs[False], runs[True]))
    for path in explicit:  # AdamW moves near-zero gradients by up to ~lr: an absolute tolerance (test_train.py)
        np.testing.assert_allclose(np.asarray(fused[path]), np.asarray(explicit[path]), rtol=1e-4, atol=5e-5,
                                   err_msg=str(path))


@pytest.mark.parametrize("case,padding", [("clip-llama-mha", "left"), ("siglip-mistral-sliding-full-nobias", "left"),
                                          ("siglip-mistral-sliding-full-nobias", "right"),
                                          ("dinov2reg-swiglu-llama-bias-linear-rope", "left"),
                                          ("dinov2-qwen2-mixed-sliding-interpolated", "right")])
def test_parity_with_transformers_through_the_kernel(hf_checkpoints, interpret, case, padding):
    """The fused path on the kernel against transformers' PyTorch model: logits and every text and
    vision hidden state at real positions (1e-5). Covers MHA, GQA with a sliding window (the
    kernel's local mask), SigLIP / DINOv2 towers and head sizes that are not multiples of 8; the
    Qwen2 case mixes window kinds across layers, so its decoder keeps XLA's kernel (no structure)
    while its vision tower runs the kernel."""
    import hf_factory

    import vlm_jax as vj
    from vlm_jax.models import llava

    folder, hf_model, hf_config = hf_checkpoints(case)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(case), padding=padding)
    ref_logits, ref_text, ref_vision = hf_factory.hf_forward(hf_model, batch)
    model = vj.load(folder, progress=False)
    out = model.run(batch, capture=("text.hidden_states", "vision.hidden_states"), fused_attention=True)
    real = batch["attention_mask"].astype(bool)
    assert hf_factory.rel_err(out.logits, ref_logits, real) <= TOL
    for layer, ref in enumerate(ref_text):
        assert hf_factory.rel_err(np.asarray(out.acts["text.hidden_states"])[layer], ref, real) <= TOL, layer
    for layer, ref in enumerate(ref_vision):
        assert hf_factory.rel_err(np.asarray(out.acts["vision.hidden_states"])[layer], ref) <= TOL, layer
    arrays = {k: jnp.asarray(v) for k, v in model.place(dict(batch)).items()}
    calls = str(jax.make_jaxpr(lambda p: llava.forward(p, model.config, arrays, fused_attention=True).logits)(
        model.params)).count("pallas_call")
    assert calls == (1 if case.startswith("dinov2-qwen2") else 2)  # one per tower (layers are scanned)


def test_the_kernel_takes_queries_and_keys_over_the_same_slots(interpret):
    rng = np.random.default_rng(6)
    q, k = heads(rng, 1, 130, 2), heads(rng, 1, 140, 2)
    with pytest.raises(ValueError, match="same slots; got T=130, S=140"):
        tpu_attention.splash_attention(q, k, k, scale=0.25, structure=None)
